"""What every submission session shares: configuration, SubmitService, the end-of-data hook, the TLS
context and the registry of open sessions; no sockets are opened here (listener.py does that)."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from typing import Any

from cmcd import policy
from cmcd.config import Config
from cmcd.doors import Door
from cmcd.submit.service import SubmitService

log = logging.getLogger("cmcd.smtp")


class SubmissionHandler:
    """The aiosmtpd hook for end of data (MAIL and RCPT call SubmitService from the session)."""

    def __init__(self, service: SubmitService):
        self.service = service

    async def handle_DATA_BYTES(self, server: Any, session: Any, envelope: Any, body: bytes) -> str:
        result = await self.service.finish(
            session.sender,
            envelope.mail_from,
            list(envelope.rcpt_tos),
            body,
            server.session_info(smtputf8="SMTPUTF8" in envelope.mail_options),
        )
        return result.reply


@dataclass
class SessionRegistry:
    """Open sessions, per client (policy.client_group: an IPv4 address or an IPv6 /64) and in all;
    refuses past the limits with 421 4.7.0."""

    max_total: int
    max_per_ip: int
    live: set[Any] = field(default_factory=set)
    per_ip: dict[str, int] = field(default_factory=dict)  # by policy.client_group
    closing: bool = False
    door: Door | None = None  # counts refusals for /metrics

    def admit(self, proto: Any) -> str | None:
        ip = proto.client_ip
        group = policy.client_group(ip)
        if self.closing:
            return "421 4.3.2 Service shutting down"
        if self.max_total and len(self.live) >= self.max_total:
            log.warning("event=conn_refused reason=global_limit client_ip=%s", ip)
            if self.door is not None:
                self.door.refuse("max_connections")
            return "421 4.7.0 Too many connections; try again later"
        if self.max_per_ip and self.per_ip.get(group, 0) >= self.max_per_ip:
            log.warning("event=conn_refused reason=ip_limit client_ip=%s", ip)
            if self.door is not None:
                self.door.refuse("max_connections_per_ip")
            return "421 4.7.0 Too many connections from your address; try again later"
        self.live.add(proto)
        self.per_ip[group] = self.per_ip.get(group, 0) + 1
        return None

    def drop_tenant(self, tenant_id: int) -> int:
        """Close every session authenticated as TENANT_ID (its tenant is being removed)."""
        dropped = 0
        for proto in list(self.live):
            session = getattr(proto, "session", None)
            sender = getattr(session, "sender", None)
            if sender is not None and sender.tenant_id == tenant_id:
                proto._close("421 4.7.0 Your account has been closed")
                dropped += 1
        return dropped

    def release(self, proto: Any) -> None:
        if proto in self.live:
            self.live.discard(proto)
            group = policy.client_group(proto.client_ip)
            n = self.per_ip.get(group, 1) - 1
            if n:
                self.per_ip[group] = n
            else:
                self.per_ip.pop(group, None)


@dataclass
class SmtpContext:
    config: Config
    service: SubmitService
    handler: SubmissionHandler
    tls_context: ssl.SSLContext | None
    sessions: SessionRegistry
    hooks: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        h = self.handler
        self.hooks = {name[7:]: getattr(h, name) for name in dir(h) if name.startswith("handle_")}
