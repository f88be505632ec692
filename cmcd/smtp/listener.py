"""Submission listeners: sockets, TLS context, connection limits and graceful close; the rules stay in submit/.

Sessions (session.py) and this module share context.py; the session never imports this one."""

from __future__ import annotations

import asyncio
import functools
import logging

from cmcd.config import Config, split_hostport
from cmcd.crypto import server_tls_context
from cmcd.listening import Inherited
from cmcd.smtp.context import SessionRegistry, SmtpContext, SubmissionHandler
from cmcd.smtp.session import SubmissionSMTP
from cmcd.submit.service import SubmitService

log = logging.getLogger("cmcd.smtp")

HANDSHAKE_TIMEOUT_S = 10.0


class SmtpListeners:
    """Starts the submission (STARTTLS) and implicit-TLS listeners; closes them gracefully."""

    def __init__(self, config: Config, service: SubmitService, inherited: Inherited | None = None):
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
        self.inherited = inherited if inherited is not None else Inherited("{}")
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
                # implicit TLS: the handshake precedes connection_made (and so the connection
                # limits); a short handshake timeout bounds what a silent client can hold
                tls = ctx.tls_context if implicit else None
                handshake = HANDSHAKE_TIMEOUT_S if implicit else None
                factory = functools.partial(SubmissionSMTP, ctx, implicit_tls=implicit)
                servers = [
                    await loop.create_server(factory, sock=sock, ssl=tls, ssl_handshake_timeout=handshake)
                    for sock in self.inherited.take(kind, hp)  # a worker's: the supervisor bound them
                ]
                if not servers:
                    host, port = split_hostport(hp)
                    servers.append(
                        await loop.create_server(
                            factory,
                            host,
                            port,
                            ssl=tls,
                            ssl_handshake_timeout=handshake,
                            backlog=1024,
                            reuse_address=True,
                        )  # fmt: skip
                    )
                for server in servers:
                    self.servers.append(server)
                    for sock in server.sockets:
                        name = sock.getsockname()
                        self.bound[kind].append(f"[{name[0]}]:{name[1]}" if ":" in name[0] else f"{name[0]}:{name[1]}")

    def stop_accepting(self) -> None:
        """No new connection from now on (the first step of a shutdown); sessions go on."""
        for server in self.servers:
            server.close()

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


__all__ = ["SmtpListeners"]
