"""A lean SMTP client for delivery: one connection, many transactions, replies parsed from a buffer.

An asyncio.Protocol rather than streams: each reply is one future, each timeout one timer
handle, and MAIL, every RCPT and DATA go out in one write when the server offers PIPELINING
(RFC 2920). STARTTLS refuses to go on when anything follows the server's 220 in the same
read, so a server cannot inject replies that the client would read as coming over TLS
(the client-side form of CVE-2011-0411). Internationalised mail (RFC 6531) goes with the SMTPUTF8
parameter where the server offers it; elsewhere addresses go with their domains as A-labels.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass

from cmcd import intl

MAX_REPLY_LINES = 100
MAX_LINE = 4096
#: a body transfer must move at least this much per data_xfer_timeout (Postfix's smtp_data_xfer_timeout)
XFER_PROGRESS_BYTES = 64 * 1024


class SmtpError(Exception):
    """The connection is unusable: closed, timed out, garbled, or a TLS handshake failed.

    .enhanced is the RFC 3463 code the recipients' deferral is logged with. Each kind below is
    also the built-in exception it stands for (as aiosmtplib's SMTPTimeoutError is a TimeoutError):
    SmtpTimeout a TimeoutError, SmtpDisconnected and SmtpConnectError a ConnectionError.
    """

    default_enhanced = "4.4.2"

    def __init__(
        self,
        message: str,
        enhanced: str = "",
        *,
        stale: bool = False,
        after_data: bool = False,
        reply: Reply | None = None,
    ):
        super().__init__(message)
        self.enhanced = enhanced or self.default_enhanced
        #: the server's own words when it ended the session with a reply (a 421 before it closed)
        self.reply = reply
        #: the body and its final dot were sent; a retry may deliver the message twice
        self.after_data = after_data
        #: the connection failed before this transaction began (a reused connection the server had
        #: already dropped): nothing was sent for the message, so it can go on another connection
        self.stale = stale

    def again(self, message: str, *, stale: bool = False, after_data: bool = False) -> SmtpError:
        """The same kind of error, said again with what the caller knows (stale, after DATA). MESSAGE
        is all that is said then: a reply in it is no longer read as the server's last word."""
        return type(self)(message, self.enhanced, stale=stale, after_data=after_data)


class SmtpProtocolError(SmtpError):
    """The server broke the protocol: a garbled or overlong reply, a refused RSET."""


class SmtpDisconnected(SmtpError, ConnectionError):
    """The server closed the connection (after a 421 or without a word) or it was lost."""


class SmtpTimeout(SmtpError, TimeoutError):
    """No reply in time, or a body transfer that stopped moving."""


class SmtpConnectError(SmtpError, ConnectionError):
    """The TCP connection could not be made."""

    default_enhanced = "4.4.1"


class SmtpConnectTimeout(SmtpConnectError, SmtpTimeout):
    """The TCP connection was not made within connect_timeout."""

    default_enhanced = "4.4.1"


class SmtpTlsError(SmtpError):
    """STARTTLS failed, was tampered with, or is required and not offered."""

    default_enhanced = "4.7.5"


@dataclass(frozen=True)
class Reply:
    code: int
    text: str  # the lines joined by a space, codes and separators removed
    lines: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.code} {self.text}".strip()


def policy_enhanced(reply: Reply) -> str:
    """The reply's RFC 3463 code when its class matches the basic code ("4.3.2"), else ""."""
    first = reply.text.split(" ", 1)[0]
    parts = first.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts) and parts[0] == str(reply.code // 100):
        return first
    return ""


def dot_stuff(body: bytes) -> bytes:
    """The DATA payload: leading dots doubled (RFC 5321 4.5.2), CRLF-terminated, then the end marker."""
    if body.startswith(b"."):
        body = b"." + body
    body = body.replace(b"\r\n.", b"\r\n..")
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body + b".\r\n"


def client_tls_context() -> ssl.SSLContext:
    """Opportunistic TLS as MTAs do it (Postfix's "may"): encrypt, TLS 1.2 or later, no certificate check."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class _Protocol(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.lines: list[tuple[int, str]] = []
        self.replies: deque[Reply] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.error: SmtpError | None = None
        self.paused = False
        self.drained: asyncio.Future[None] | None = None
        self.closing = False  # the server said 421: it is closing the connection
        self.closing_reply: Reply | None = None  # that 421, kept for the error when the close follows

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) > MAX_LINE:
                    self._fail(SmtpProtocolError("reply line too long"))
                return
            line = bytes(self.buffer[:end]).rstrip(b"\r")
            del self.buffer[: end + 1]
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                self._fail(SmtpProtocolError(f"garbled reply {line[:80]!r}"))
                return
            self.lines.append((int(line[:3]), line[4:].decode("utf-8", "replace")))
            if line[3:4] == b"-":
                if len(self.lines) > MAX_REPLY_LINES:
                    self._fail(SmtpProtocolError("reply has too many lines"))
                    return
                continue
            code = self.lines[-1][0]
            texts = tuple(t for _, t in self.lines)
            reply = Reply(code, " ".join(t for t in texts if t), texts)
            if code == 421:
                self.closing = True
                self.closing_reply = reply
            self.replies.append(reply)
            self.lines = []
            self._wake()

    def eof_received(self) -> bool | None:
        self._fail(self._closed_error("connection closed by the server"))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(self._closed_error(f"connection lost: {exc}" if exc else "connection closed by the server"))
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def _closed_error(self, what: str) -> SmtpError:
        """The error for a close: the server's 421 when it said one first (its words, not ours)."""
        said = self.closing_reply
        if said is None:
            return SmtpDisconnected(what)
        enhanced = policy_enhanced(said) or "4.4.2"
        return SmtpDisconnected(f"{said} (then the server closed the connection)", enhanced, reply=said)

    def _fail(self, error: SmtpError) -> None:
        if self.error is None:
            self.error = error
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class SmtpClient:
    """One outbound connection; use connect(), then hello(), then transactions, then quit()."""

    def __init__(
        self,
        proto: _Protocol,
        host: str,
        address: str,
        command_timeout: float,
        data_timeout: float,
        data_xfer_timeout: float | None = None,
    ):
        self._p = proto
        self.host = host
        self.address = address
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self.data_xfer_timeout = data_xfer_timeout or data_timeout
        self.extensions: dict[str, str] = {}
        self.tls_version = ""
        self.transactions = 0

    @classmethod
    async def connect(
        cls,
        host: str,
        address: str,
        port: int,
        *,
        connect_timeout: float,
        command_timeout: float,
        data_timeout: float,
        data_xfer_timeout: float | None = None,
    ) -> SmtpClient:
        loop = asyncio.get_running_loop()
        proto = _Protocol(loop)
        try:
            await asyncio.wait_for(loop.create_connection(lambda: proto, address, port), connect_timeout)
        except TimeoutError:
            raise SmtpConnectTimeout(f"connect to {host}[{address}]:{port} timed out") from None
        except OSError as exc:
            raise SmtpConnectError(f"connect to {host}[{address}]:{port}: {exc.strerror or exc}") from None
        return cls(proto, host, address, command_timeout, data_timeout, data_xfer_timeout)

    @property
    def closed(self) -> bool:
        p = self._p
        return p.error is not None or p.closing or p.transport is None or p.transport.is_closing()

    def failure(self) -> SmtpError:
        """Why a connection that is closed (or closing) ended: the server's 421 when it said one."""
        p = self._p
        if p.closing_reply is not None:
            return p._closed_error("")
        return p.error or SmtpDisconnected("connection closed by the server")

    def abort(self) -> None:
        if self._p.transport is not None:
            self._p.transport.abort()

    async def reply(self, timeout: float | None = None) -> Reply:
        p = self._p
        if not p.replies and p.error is None:
            p.waiter = p.loop.create_future()
            timer = p.loop.call_later(
                timeout or self.command_timeout, p._fail, SmtpTimeout("timed out waiting for a reply")
            )
            try:
                await p.waiter
            finally:
                timer.cancel()
                p.waiter = None
        if p.replies:
            return p.replies.popleft()
        assert p.error is not None
        raise p.error

    def send(self, data: bytes) -> None:
        p = self._p
        if p.error is not None:
            raise p.error
        assert p.transport is not None
        p.transport.write(data)

    async def drain(self, timeout: float, min_progress: int = XFER_PROGRESS_BYTES) -> None:
        """Wait until the transport's buffer is below its high-water mark. Every TIMEOUT seconds the
        buffer must have shrunk by MIN_PROGRESS bytes (or to empty): a peer that stops reading, or
        reads a byte a second, fails the transfer instead of holding the connection for ever."""
        p = self._p
        while p.paused and p.error is None:
            assert p.transport is not None
            before = p.transport.get_write_buffer_size()
            drained = p.drained = p.loop.create_future()
            timer = p.loop.call_later(timeout, self._check_progress, drained, before, timeout, min_progress)
            try:
                await drained
            finally:
                timer.cancel()
        if p.error is not None:
            raise p.error

    def _check_progress(self, drained: asyncio.Future[None], before: int, timeout: float, min_progress: int) -> None:
        p = self._p
        now = p.transport.get_write_buffer_size() if p.transport is not None else 0
        if before - now < min(min_progress, before):
            p._fail(
                SmtpTimeout(f"timed out sending the message: the server took {before - now} bytes in {timeout:g} s")
            )
        if not drained.done():
            drained.set_result(None)  # drain() looks again: stalled (error set) or a new window

    async def command(self, line: str) -> Reply:
        self.send(line.encode("utf-8") + b"\r\n")
        return await self.reply()

    async def hello(self, helo_name: str, tls: str, tls_context: ssl.SSLContext | None) -> Reply | None:
        """Greeting, EHLO (HELO if refused), STARTTLS per the TLS mode. Returns a reply when the
        server refused the session (5xx greeting), None when ready for MAIL."""
        greeting = await self.reply()
        if greeting.code != 220:
            return greeting
        reply = await self._ehlo(helo_name)
        if reply.code != 250:
            return reply
        if "STARTTLS" in self.extensions and tls != "disabled" and tls_context is not None:
            reply = await self.command("STARTTLS")
            if reply.code == 220:
                await self._start_tls(tls_context)
                reply = await self._ehlo(helo_name)
                if reply.code != 250:
                    return reply
            elif tls == "required":
                return reply
        if tls == "required" and not self.tls_version:
            raise SmtpTlsError(f"{self.host} offers no STARTTLS and TLS is required")
        return None

    async def _ehlo(self, helo_name: str) -> Reply:
        reply = await self.command(f"EHLO {helo_name}")
        self.extensions = {}
        if reply.code == 250:
            # the first line is the greeting; every further line is one extension keyword and its parameters
            for line in reply.lines[1:]:
                keyword, _, params = line.partition(" ")
                self.extensions[keyword.upper()] = params
            return reply
        if reply.code >= 500:
            helo = await self.command(f"HELO {helo_name}")
            return helo
        return reply

    async def _start_tls(self, context: ssl.SSLContext) -> None:
        p = self._p
        if p.replies or p.buffer or p.lines:
            # bytes after "220 ready for TLS" in plain text: a server (or something in the path)
            # trying to have us read them as if they came over TLS
            raise SmtpTlsError("server sent data after its STARTTLS reply; refusing to continue")
        assert p.transport is not None
        try:
            transport = await asyncio.wait_for(
                p.loop.start_tls(p.transport, p, context, server_hostname=self.host), self.command_timeout
            )
        except OSError as exc:  # ssl.SSLError, TimeoutError and ConnectionError among them
            raise SmtpTlsError(f"TLS handshake with {self.host} failed: {exc}") from None
        if transport is None:
            raise SmtpTlsError(f"TLS handshake with {self.host} failed")
        p.transport = transport  # type: ignore[assignment]
        ssl_obj = transport.get_extra_info("ssl_object")
        self.tls_version = ssl_obj.version() if ssl_obj is not None else "TLS"

    async def transaction(
        self, sender: str, recipients: list[str], body: bytes
    ) -> tuple[Reply | None, list[Reply], Reply | None]:
        """MAIL, RCPT for each recipient, DATA and the body.

        Returns (MAIL reply if refused, one reply per RCPT, final DATA reply or None when no
        recipient was accepted). Raises SmtpError when the connection fails midway.
        """
        pipelining = "PIPELINING" in self.extensions
        reset = self.transactions > 0
        if reset and not pipelining:
            await self._reset(self.command("RSET"))
        self.transactions += 1
        params = ""
        if "SIZE" in self.extensions:
            params += f" SIZE={len(body)}"
        if "8BITMIME" in self.extensions and not body.isascii():
            params += " BODY=8BITMIME"
        if "SMTPUTF8" in self.extensions:
            if intl.needs_smtputf8(sender, recipients, body):  # RFC 6531 §3.4
                params += " SMTPUTF8"
        else:  # an A-label domain is not internationalised (RFC 6531 §3.2); the engine bounced the rest
            sender = intl.ascii_form(sender) or sender
            recipients = [intl.ascii_form(r) or r for r in recipients]
        commands = [f"MAIL FROM:<{sender}>{params}"] + [f"RCPT TO:<{r}>" for r in recipients]
        if pipelining:
            # RFC 2920: RSET, MAIL, every RCPT and DATA in one write, the replies read in order
            self.send((("RSET\r\n" if reset else "") + "\r\n".join(commands) + "\r\nDATA\r\n").encode("utf-8"))
            if reset:
                await self._reset(self.reply())
            mail = await self.reply()
            rcpt_replies = [await self.reply() for _ in recipients]
            data = await self.reply()
        else:
            mail = await self.command(commands[0])
            if mail.code != 250:
                return mail, [], None
            rcpt_replies = [await self.command(c) for c in commands[1:]]
            if not any(r.code in (250, 251) for r in rcpt_replies):
                return None, rcpt_replies, None
            data = await self.command("DATA")
        if mail.code != 250:
            if data.code == 354:  # a server that let DATA through after refusing MAIL: end it empty
                self.send(b".\r\n")
                await self.reply(self.data_timeout)
            return mail, rcpt_replies, None
        accepted = any(r.code in (250, 251) for r in rcpt_replies)
        if data.code != 354:
            return None, rcpt_replies, (data if accepted else None)
        if not accepted:
            self.send(b".\r\n")
            await self.reply(self.data_timeout)
            return None, rcpt_replies, None
        self.send(dot_stuff(body))
        await self.drain(self.data_xfer_timeout)
        try:
            return None, rcpt_replies, await self.reply(self.data_timeout)
        except SmtpError as exc:
            # the whole message went out: the server may have queued it before the connection failed
            raise exc.again(f"{exc} after the message was sent (possible duplicate)", after_data=True) from None

    async def _reset(self, reply: Awaitable[Reply]) -> None:
        try:
            rset = await reply
        except SmtpError as exc:
            raise exc.again(str(exc), stale=True) from None
        if rset.code != 250:
            raise SmtpProtocolError(f"RSET refused: {rset}", stale=True)

    async def quit(self) -> None:
        if self.closed:
            return
        try:
            self.send(b"QUIT\r\n")
            await self.reply(5.0)
        except SmtpError:
            pass
        finally:
            if self._p.transport is not None:
                self._p.transport.close()
