"""Frozen records passed between layers; plain data, no behaviour that does I/O."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tenant:
    id: int
    name: str


@dataclass(frozen=True)
class User:
    id: int
    tenant_id: int
    tenant: str
    login: str
    role: str
    enabled: bool
    created: float = 0.0


@dataclass(frozen=True)
class IpCredential:
    tenant: str
    login: str
    cidr: str
    user_id: int
    tenant_id: int


@dataclass(frozen=True)
class Domain:
    id: int
    tenant_id: int
    tenant: str
    name: str


@dataclass(frozen=True)
class Sender:
    """Who a submission session acts for, once authenticated (by password or IP credential)."""

    user_id: int
    tenant_id: int
    tenant: str
    login: str
    mechanism: str  # PLAIN, LOGIN or IP


@dataclass(frozen=True)
class Recipient:
    address: str
    domain: str


@dataclass(frozen=True)
class SpoolMessage:
    """A message ready to commit: the final bytes (headers fixed, signed) and its envelope."""

    queue_id: str
    tenant_id: int
    user_id: int
    sender: str
    recipients: tuple[Recipient, ...]
    body: bytes
    received_ts: float
    message_id: str = ""
    tags: tuple[str, ...] = ()  # chosen by the tenant through the API, kept in the mail log's tag index
