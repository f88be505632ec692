"""An HTTP listener's front door (the API's, and /metrics'): accepts connections itself, so that its
caps apply before any TLS byte is read, bounds the handshake, and holds each connection's timer;
never parses HTTP.

aiohttp bounds neither the number of connections nor the time a request's headers may take to
trickle in (its keepalive_timeout starts only at a connection's start and after a response). So
the listening socket is ours: each accepted connection is admitted by the API's Door ([api]
max_connections, max_connections_per_ip; past them it is reset at once, counted in
cmcd_listener_connections_refused_total) and only then handed to the TLS handshake, which must
end within [api] handshake_timeout. aiohttp's RequestHandler then serves it behind Connection, a
thin protocol that forwards every callback and keeps one timer for the phase the connection is in:

- headers: from the connection's start, or from the first byte of a later request, the request
  line and headers must be complete within [api] header_timeout, however slowly they trickle
  (nginx's client_header_timeout). The middleware tells Connection when a request is under way;
- idle: after a response, the next request must begin within [api] keepalive_timeout.

A request body is timed where it is read (ApiServer.read_body: [api] body_timeout, min_body_rate).
A connection whose timer runs out is reset (RST: its descriptor is free at once), logged and
counted in cmcd_listener_timeouts_total.

A malformed request (bad request line, oversize header, bad chunk) is answered by aiohttp, which
logs a traceback at level error for each: BadRequestLog folds those into one event=api_bad_request
line per REFUSAL_LOG_EVERY_S with a count, as refused connections are (per process: with
[server] workers, at most one line per worker in that time).

The metrics listener uses the same door with its own Door, its own timers (Timers: [metrics]
header_timeout for all three) and its own aiohttp logger, optionally without TLS; its log
events are named after its Door (event=metrics_timeout, metrics_conn_refused, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Any, Protocol

from aiohttp.http_exceptions import HttpProcessingError

from cmcd import writeguard
from cmcd.doors import Door

log = logging.getLogger("cmcd.api")

#: accept() found no descriptor (or memory) left: wait this long before the next accept
ACCEPT_BACKOFF_S = 0.1
#: at most one line about refused connections in this many seconds (an attack would flood the log)
REFUSAL_LOG_EVERY_S = 10.0
_NO_ROOM = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_LINGER_RESET = struct.pack("ii", 1, 0)


class Timers(Protocol):
    """The waits a front door bounds, in seconds ([api] has them all; metrics makes its own)."""

    @property
    def handshake_timeout(self) -> float: ...
    @property
    def header_timeout(self) -> float: ...
    @property
    def keepalive_timeout(self) -> float: ...


class Connection(asyncio.Protocol):
    """One admitted connection: forwards every callback to aiohttp's handler (INNER) and keeps the
    timer of its phase (headers, busy: none, idle). Gives its Door slot back when it is lost."""

    def __init__(self, inner: Any, door: Door, ip: str, config: Callable[[], Timers]):
        self.inner = inner
        self.door = door
        self.ip = ip
        self.config = config
        self.made = False
        self.transport: asyncio.Transport | None = None
        self.phase = "headers"
        self._pending = False  # bytes of a next request arrived while one was under way
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    # -- timers ----------------------------------------------------------------------------

    def _arm(self, phase: str, timeout_s: float) -> None:
        self.phase = phase
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(timeout_s, self._expire) if timeout_s else None

    def _expire(self) -> None:
        self._timer = None
        if self.transport is None:
            return
        log.info("event=%s_timeout phase=%s client_ip=%s", self.door.name, self.phase, self.ip)
        self.door.timed_out(self.phase)
        writeguard.reset(self.transport)

    def request_started(self) -> None:
        """A request's headers are in and it is being handled: no timer here (the body has its own)."""
        self._pending = False
        self._arm("busy", 0)

    def request_done(self) -> None:
        """Its response is written: wait for the next request (or its headers, already begun)."""
        if self.transport is None or self.transport.is_closing():
            return
        cfg = self.config()
        if self._pending:
            self._arm("headers", cfg.header_timeout)
        else:
            self._arm("idle", cfg.keepalive_timeout)

    # -- asyncio.Protocol, forwarded -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True
        self.transport = transport  # type: ignore[assignment]
        self._arm("headers", self.config().header_timeout)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.phase == "idle":
            self._arm("headers", self.config().header_timeout)
        elif self.phase == "busy":
            self._pending = True
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()  # type: ignore[no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.transport = None
        self.door.release(self.ip)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class BadRequestLog(logging.Filter):
    """On aiohttp's "aiohttp.server" logger: its "Error handling request" record (a traceback) for a
    request it could not parse becomes at most one event=api_bad_request line per
    REFUSAL_LOG_EVERY_S, with how many there were; anything else passes."""

    def __init__(self, event: str = "api_bad_request") -> None:
        super().__init__()
        self.event = event
        self.count = 0
        self._logged_at = -REFUSAL_LOG_EVERY_S

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError) or not str(record.msg).startswith("Error handling request"):
            return True
        self.count += 1
        if record.created - self._logged_at >= REFUSAL_LOG_EVERY_S:
            ip = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            log.warning("event=%s client_ip=%s error=%s detail=%r count=%d",
                        self.event, ip, type(exc).__name__, str(exc.message)[:100], self.count)  # fmt: skip
            self._logged_at = record.created
            self.count = 0
        return False


class FrontDoor:
    """Accepts on one listening socket; admits, handshakes (TLS: None for plain HTTP) and hands
    each connection to a new protocol from MAKE_HANDLER (aiohttp's) behind a Connection.
    SERVER_LOG is the logger MAKE_HANDLER's protocols log to (aiohttp's "logger")."""

    def __init__(
        self,
        door: Door,
        tls: ssl.SSLContext | None,
        make_handler: Callable[[], Any],
        config: Callable[[], Timers],
        *,
        server_log: str = "aiohttp.server",
    ):
        self.door = door
        self.tls = tls
        self.make_handler = make_handler
        self.config = config
        self.sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        self._refused_since_log = 0
        self._refusal_logged_at = -REFUSAL_LOG_EVERY_S
        self._server_log = logging.getLogger(server_log)
        self._bad_requests = BadRequestLog(f"{door.name}_bad_request")

    async def start(self, host: str, port: int, backlog: int, sock: socket.socket | None = None) -> int:
        """Listen on HOST:PORT, or on SOCK when one is given (bound by the supervisor); the port bound."""
        if sock is None:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.create_server((host, port), family=family, backlog=backlog)
        sock.setblocking(False)
        self.sock = sock
        self._server_log.addFilter(self._bad_requests)
        self._accepting = asyncio.get_running_loop().create_task(self._accept())
        return int(sock.getsockname()[1])

    async def close(self) -> None:
        """Stop accepting and abandon handshakes under way (open connections are aiohttp's to close)."""
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
            self._accepting = None
        for task in list(self._handshakes):
            task.cancel()
        await asyncio.gather(*self._handshakes, return_exceptions=True)
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._server_log.removeFilter(self._bad_requests)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.sock is not None
        while True:
            try:
                conn, addr = await loop.sock_accept(self.sock)
            except OSError as exc:
                if exc.errno not in _NO_ROOM:
                    log.warning("event=%s_accept_failed error=%r", self.door.name, str(exc))
                    await asyncio.sleep(ACCEPT_BACKOFF_S)
                    continue
                # no descriptor left for the process: the connection waits in the backlog
                self.door.refuse("descriptors")
                self._log_refusal(loop, "descriptors", "-")
                await asyncio.sleep(ACCEPT_BACKOFF_S)
                continue
            ip = str(addr[0])
            reason = self.door.admit(ip)
            if reason is not None:
                _reset(conn)
                self._log_refusal(loop, reason, ip)
                continue
            task = loop.create_task(self._handshake(conn, ip))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    def _log_refusal(self, loop: asyncio.AbstractEventLoop, reason: str, ip: str) -> None:
        self._refused_since_log += 1
        now = loop.time()
        if now - self._refusal_logged_at >= REFUSAL_LOG_EVERY_S:
            log.warning("event=%s_conn_refused reason=%s client_ip=%s refused=%d open=%d max=%d",
                        self.door.name, reason, ip, self._refused_since_log, self.door.open, self.door.max_total)  # fmt: skip
            self._refusal_logged_at = now
            self._refused_since_log = 0

    async def _handshake(self, conn: socket.socket, ip: str) -> None:
        loop = asyncio.get_running_loop()
        proto = Connection(self.make_handler(), self.door, ip, self.config)
        try:
            await loop.connect_accepted_socket(
                lambda: proto,
                conn,
                ssl=self.tls,
                ssl_handshake_timeout=self.config().handshake_timeout if self.tls is not None else None,
            )
        except BaseException as exc:
            if not proto.made:  # the handshake failed, timed out or was abandoned: the slot is ours to give back
                self.door.release(ip)
                if isinstance(exc, TimeoutError | ConnectionAbortedError) and "handshake" in str(exc).lower():
                    self.door.timed_out("handshake")
                    log.info("event=%s_timeout phase=handshake client_ip=%s", self.door.name, ip)
                _reset(conn)
            if not isinstance(exc, Exception):
                raise


def _reset(conn: socket.socket) -> None:
    """Close CONN at once with an RST (no FIN handshake, no TIME_WAIT): its descriptor is free now."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    conn.close()
