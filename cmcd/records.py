"""Frozen records passed between layers; plain data, no behaviour that does I/O."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class RecipientState(StrEnum):
    """Where one recipient of a queued message stands: the queue's state column, a delivery
    result's state and the mail log's status use these words (and only these)."""

    QUEUED = "queued"  # waiting for its first attempt
    DEFERRED = "deferred"  # failed for now; tried again at next_attempt
    INFLIGHT = "inflight"  # claimed by the scheduler: an attempt is under way
    HELD = "held"  # held by an operator: never scheduled until released
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    EXPIRED = "expired"  # deferred past delivery.max_lifetime
    SUPPRESSED = "suppressed"  # on the tenant's suppression list: never attempted
    DELETED = "deleted"  # by an operator (cmcctl queue delete)
    LOST = "lost"  # with a spool that could not be trusted (cmcd serve --accept-loss)


#: the states that still need work, in the order listings show them; every other state is final
PENDING_STATES = (RecipientState.QUEUED, RecipientState.DEFERRED, RecipientState.INFLIGHT, RecipientState.HELD)
FINAL_STATES = tuple(s for s in RecipientState if s not in PENDING_STATES)
#: what one delivery attempt (or the suppression check before it) can end in
RESULT_STATES = (RecipientState.DELIVERED, RecipientState.DEFERRED, RecipientState.BOUNCED, RecipientState.EXPIRED,
                 RecipientState.SUPPRESSED)  # fmt: skip


class Stream(StrEnum):
    """What kind of mail a message is (cmcd/unsubscribe.py): a broadcast carries one-click
    unsubscribe and is held back from an address that unsubscribed; transactional mail is not."""

    TRANSACTIONAL = "transactional"  # an answer to something the recipient did (a receipt, a reset)
    BROADCAST = "broadcast"  # sent to many at the sender's initiative (a newsletter, a notice)


STREAMS = tuple(s.value for s in Stream)


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
    stream: str = Stream.TRANSACTIONAL  # what the user's mail is unless a message or request says otherwise


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
    stream: str = Stream.TRANSACTIONAL
