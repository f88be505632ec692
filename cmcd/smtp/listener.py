"""Submission listeners: sockets, TLS context, connection limits and graceful close; the rules stay in submit/."""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass, field
from typing import Any

from cmcd import policy
from cmcd.config import Config, split_hostport
from cmcd.crypto import server_tls_context
from cmcd.doors import Door
from cmcd.smtp.session import SubmissionSMTP
from cmcd.submit.service import SubmitService

log = logging.getLogger("cmcd.smtp")

HANDSHAKE_TIMEOUT_S = 10.0


class SubmissionHandler:
    """The aiosmtpd hook for end of data (MAIL and RCPT call SubmitService from the session)."""

    def __init__(self, service: SubmitService):
        self.service = service

    async def handle_DATA_BYTES(self, server: Any, session: Any, envelope: Any, body: bytes) -> str:
        return await self.service.finish(
            session.sender, envelope.mail_from, list(envelope.rcpt_tos), body, server.session_info()
        )


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


class SmtpListeners:
    """Starts the submission (STARTTLS) and implicit-TLS listeners; closes them gracefully."""

    def __init__(self, config: Config, service: SubmitService):
        smtp = config.smtp
        tls = server_tls_context(str(config.path(smtp.tls_cert)), str(config.path(smtp.tls_key)))
        self.ctx = SmtpContext(
            config,
            service,
            SubmissionHandler(service),
            tls,
            SessionRegistry(smtp.max_connections, smtp.max_connections_per_ip, door=service.stats.doors["smtp"]),
        )
        self.servers: list[asyncio.AbstractServer] = []
        self.bound: dict[str, list[str]] = {"smtp": [], "smtps": []}

    def reload(self, config: Config) -> None:
        """New limits and timeouts for new commands and sessions; the certificate is read again
        (rotated in place) for new handshakes. Runs off the event loop (file reads)."""
        smtp = config.smtp
        if self.ctx.tls_context is not None and smtp.tls_cert and smtp.tls_key:
            self.ctx.tls_context.load_cert_chain(str(config.path(smtp.tls_cert)), str(config.path(smtp.tls_key)))
        self.ctx.sessions.max_total = smtp.max_connections
        self.ctx.sessions.max_per_ip = smtp.max_connections_per_ip
        self.ctx.config = config
        self.config = config

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ctx = self.ctx
        for kind, addrs, implicit in (
            ("smtp", ctx.config.smtp.listen, False),
            ("smtps", ctx.config.smtp.listen_tls, True),
        ):
            for hp in addrs:
                host, port = split_hostport(hp)
                server = await loop.create_server(
                    lambda implicit=implicit: SubmissionSMTP(ctx, implicit_tls=implicit),  # type: ignore[misc]
                    host,
                    port,
                    # implicit TLS: the handshake precedes connection_made (and so the connection
                    # limits); a short handshake timeout bounds what a silent client can hold
                    ssl=ctx.tls_context if implicit else None,
                    ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S if implicit else None,
                    backlog=1024,
                    reuse_address=True,
                )
                self.servers.append(server)
                for sock in server.sockets:
                    name = sock.getsockname()
                    self.bound[kind].append(f"[{name[0]}]:{name[1]}" if ":" in name[0] else f"{name[0]}:{name[1]}")

    async def close(self, grace_s: float) -> None:
        """Stop accepting; let sessions inside DATA finish within GRACE_S; close the rest."""
        sessions = self.ctx.sessions
        sessions.closing = True
        for server in self.servers:
            server.close()
        for proto in list(sessions.live):
            if not proto.busy:
                proto._close("421 4.3.2 Service shutting down")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while any(p.busy for p in sessions.live) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for proto in list(sessions.live):
            proto._close("421 4.3.2 Service shutting down")
        for server in self.servers:
            await server.wait_closed()
