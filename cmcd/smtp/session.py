"""One submission session: aiosmtpd's SMTP with cmcd's AUTH, DATA reading and replies; no business rules.

What aiosmtpd does not do and this adds: enhanced status codes on every reply, AUTH only
over TLS with the credential check off the event loop, IP credentials, a DATA reader that
accepts only <CRLF>.<CRLF> as the end, keeps memory bounded on overruns, enforces a
minimum data rate, and leaves pipelined commands after the dot for the next read; and replies
a client leaves unread (pipelining without reading, then perhaps QUIT) must drain within
smtp.write_timeout, measured as progress, or the connection is reset (cmcd/writeguard.py).

Over 500 lines on purpose: it is one subclass of aiosmtpd's SMTP whose methods override the
library's and share its per-connection state; split, one protocol state machine would be read
across files. Refusals come typed from submit/ and are sent as `refusal.reply`.
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import logging
import re
import ssl
from base64 import b64decode
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, Session

from cmcd import policy, writeguard
from cmcd.records import Sender
from cmcd.smtp.context import SmtpContext
from cmcd.submit import refusals
from cmcd.submit.service import SessionInfo
from cmcd.tenancy.refusals import Refusal
from cmcd.textout import has_controls

log = logging.getLogger("cmcd.smtp")

_REPLY = re.compile(r"^([245]\d\d)([ -])(.*)$", re.S)
_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}( |$)")
_DEFAULT_ENHANCED = {
    "221": "2.0.0", "235": "2.7.0", "250": "2.0.0", "252": "2.5.0",
    "421": "4.3.2", "451": "4.3.0", "452": "4.5.3", "454": "4.7.0",
    "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4",
    "530": "5.7.0", "535": "5.7.8", "538": "5.7.11", "550": "5.0.0", "552": "5.3.4",
    "553": "5.1.3", "554": "5.0.0", "555": "5.5.4",
}  # fmt: skip
#: aiosmtpd's own replies that need a better code or wording for our clients.
_REWRITE = {
    "552 Error: message size exceeds fixed maximum message size": "552 5.3.4 Message size exceeds fixed maximum message size",
    "553 5.1.3 Error: malformed address": "501 5.1.3 Bad address syntax",
    "500 Error: strict ASCII mode": "501 5.1.3 Non-ASCII characters require SMTPUTF8",
    "500 Command line too long": "500 5.5.2 Command line too long (limit 512 octets)",
}
_PLAIN_ADDRESS = re.compile(r"\s*<([^<>@\s\"(),:;\\\[\]]+@[A-Za-z0-9.-]+)>(.*)$", re.S)
_CHUNK = 65536
_WRITE_HIGH_WATER = 65536
_BOGUS_LIMIT = 5
_INLINE_CHECK_BYTES = 1024 * 1024
_CALL_LIMITS = {"NOOP": 100, "HELP": 10, "VRFY": 10, "EXPN": 10, "EHLO": 10, "HELO": 10, "STARTTLS": 2}
_CLOSE_GRACE_S = 2.0
_HANDSHAKE_TIMEOUT_S = 10.0
_DATA_READ_LIMIT = 262144


def with_enhanced_code(reply: str) -> str:
    """Give REPLY an RFC 3463 enhanced status code if it lacks one (not for 220/334/354)."""
    reply = _REWRITE.get(reply, reply)
    m = _REPLY.match(reply)
    if m is None or m.group(1) in ("220", "334", "354") or _ENHANCED.match(m.group(3)):
        return reply
    code = _DEFAULT_ENHANCED.get(m.group(1), m.group(1)[0] + ".0.0")
    return f"{m.group(1)}{m.group(2)}{code} {m.group(3)}"


def _check(buf: bytearray, bare_newlines: str) -> policy.DataVerdict:
    """Line-ending rules first, then dot-unstuffing, on the bytes after the virtual CRLF."""
    verdict = policy.check_data(bytes(memoryview(buf)[2:]), bare_newlines)
    return verdict if verdict.body is None else policy.DataVerdict(policy.unstuff(verdict.body))


class CmcdSession(Session):
    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__(loop)
        self.sender: Sender | None = None


class SubmissionSMTP(SMTP):
    """aiosmtpd's protocol with cmcd's rules; one instance per connection."""

    def __init__(self, ctx: SmtpContext, *, implicit_tls: bool):
        # aiosmtpd's own __init__ introspects the class and handler with inspect.getmembers on
        # every connection (a fifth of the CPU of a one-message connection); this sets the same
        # attributes (aiosmtpd 1.4.x) from tables computed once.
        loop = asyncio.get_running_loop()
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=loop,
        )
        cfg = ctx.config.smtp
        self.loop = loop
        self.__ident__ = "ESMTP cmcd"
        self.event_handler = ctx.handler
        self.data_size_limit = cfg.max_message_size
        self.enable_SMTPUTF8 = False
        self._decode_data = False
        self.hostname = ctx.config.server.hostname
        self.tls_context = None if implicit_tls else ctx.tls_context
        self.require_starttls = False
        self._timeout_duration = cfg.command_timeout
        self._timeout_handle = None
        self._deadline = self._timer_at = 0.0
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = None
        self._auth_required = True
        self._auth_methods = {}  # AUTH is smtp_AUTH's own, below
        self._handle_hooks = ctx.hooks
        self._ehlo_hook_ver = None
        self._smtp_methods = _COMMANDS  # shared and read-only: functions, bound when called
        self._enforce_call_limit = False  # our _handle_client applies _CALL_LIMITS
        # aiosmtpd keeps these limits in a class-wide dict that grows on every EHLO; ours are per session.
        # MAIL: SIZE= and BODY=8BITMIME (RFC 1870, 6152), and 10 more for " SMTPUTF8" (RFC 6531 §3.1 item 5)
        self.command_size_limits = collections.defaultdict(lambda: 512, {"MAIL": 512 + 26 + 10, "RCPT": 512})
        self.ctx = ctx
        self.implicit_tls = implicit_tls
        self.busy = False  # True from DATA until its reply is sent (shutdown waits for these)
        self._replies = 0
        self._data_held = 0  # bytes of DATA this session holds against smtp.max_data_in_flight
        self._eof = False
        self.client_ip = ""
        self._refused = False
        self._end_watch: writeguard.Watch | None = None  # bounds the close after the command loop

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """A regular expression for the plain <local@domain> form; aiosmtpd's parser for the rest."""
        m = _PLAIN_ADDRESS.match(arg)
        if m is not None:
            return m.group(1), m.group(2)
        return super()._getaddr(arg)

    # -- connection ------------------------------------------------------------------------

    def _create_session(self) -> Session:
        return CmcdSession(self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # the first call; STARTTLS calls it again
            peer = transport.get_extra_info("peername")
            self.client_ip = peer[0] if peer else ""
            self.ctx.service.stats.smtp_connections += 1
            refusal = self.ctx.sessions.admit(self)
            if refusal:
                self._refused = True
                transport.write((refusal + "\r\n").encode())  # type: ignore[attr-defined]
                transport.close()
                return
        if self.implicit_tls and self._tls_protocol is None:
            self._tls_protocol = transport  # type: ignore[assignment]  # the listener did the handshake
        loop_task = self._handler_coroutine
        super().connection_made(transport)
        if self._handler_coroutine is not None and self._handler_coroutine is not loop_task:
            self._handler_coroutine.add_done_callback(self._session_ended)

    def _session_ended(self, _task: asyncio.Task[None]) -> None:
        """The command loop is over (QUIT, 421, reset): the close waits for the replies still
        buffered, so they must drain within smtp.write_timeout (measured as progress) or the
        connection is reset; until then it keeps its slot in the connection limits."""
        if self.transport is not None and self._end_watch is None:
            self._end_watch = writeguard.Watch(
                self.transport, self.ctx.config.smtp.write_timeout, self._write_timed_out
            )

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self._end_watch is not None:
            self._end_watch.cancel()
        self.ctx.sessions.release(self)
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        """A client that half-closes after the dot still gets its reply and its message.

        aiosmtpd cancels the session on EOF; inside DATA (reading or committing) that would
        drop the reply to a message that may already be queued, so there EOF only ends the
        session once the reply is out.
        """
        if self.busy:
            self._eof = True
            self._reader.feed_eof()
            return True  # keep the transport open for our reply
        return super().eof_received()

    @property
    def is_tls(self) -> bool:
        return self._tls_protocol is not None

    def session_info(self, *, smtputf8: bool = False) -> SessionInfo:
        """What the Received: field says of this session; SMTPUTF8: the transaction asked for it."""
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport is not None else None
        version = ssl_object.version() if ssl_object is not None else None
        cipher = ssl_object.cipher()[0] if ssl_object is not None else None
        helo = self.session.host_name if self.session is not None else ""
        return SessionInfo(self.client_ip, str(helo or ""), version, cipher, smtputf8=smtputf8)

    # -- replies ---------------------------------------------------------------------------

    async def handle_exception(self, error: Exception) -> str:
        """The reply for an unexpected error; a client that closed its side ends the session."""
        if isinstance(error, asyncio.IncompleteReadError):
            self._close()
            raise asyncio.CancelledError  # aiosmtpd's way for a session task to end
        log.error("event=session_error client_ip=%s error=%r", self.client_ip, error, exc_info=error)
        return "451 4.3.0 Internal error; try again later"

    async def push(self, status: Any) -> None:
        """Send one reply; wait for the peer to read only when much is buffered (replies are small)."""
        if isinstance(status, str):
            status = with_enhanced_code(status).encode("ascii", "replace")
        transport: Any = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(status + b"\r\n")
        if transport.get_write_buffer_size() > _WRITE_HIGH_WATER:
            # a client that pipelines and never reads: its replies must keep moving (smtp.write_timeout)
            with writeguard.write_deadline(transport, self.ctx.config.smtp.write_timeout, self._write_timed_out):
                await self._writer.drain()
        self._replies += 1
        if self._replies % 32 == 0:  # a client pipelining many commands must not hold the loop
            await asyncio.sleep(0)

    def _write_timed_out(self, stalled_s: float, buffered: int) -> None:
        """The connection was reset: the client left our replies unread for smtp.write_timeout."""
        log.warning(
            "event=smtp_write_timeout client_ip=%s stalled_s=%.1f buffered=%d", self.client_ip, stalled_s, buffered
        )
        self.ctx.service.stats.smtp_write_timeouts += 1

    async def _push_lines(self, lines: list[str]) -> None:
        """A multi-line 250 reply (EHLO), sent as one write."""
        await self.push(
            "\r\n".join(f"250{'-' if i < len(lines) - 1 else ' '}{line}" for i, line in enumerate(lines)).encode()
        )

    async def check_auth_needed(self, caller_method: str) -> bool:
        assert self.session is not None
        session: Any = self.session
        if session.sender is None:
            await self.ctx.service.current()
            session.sender = self.ctx.service.ip_sender(self.client_ip)
            if session.sender is None:
                await self.push("530 5.7.0 Authentication required")
                return True
        return False

    # -- commands --------------------------------------------------------------------------

    async def _handle_client(self) -> None:
        """The command loop: aiosmtpd's, without its per-line logging and lookups.

        Same rules: 500 for a line past the limit (read to its end first), a call budget per
        command, five unknown commands then goodbye, the idle timer reset by a known command.
        """
        assert self.session is not None
        await self.push(f"220 {self.hostname} {self.__ident__}")
        reader: Any = self._reader
        calls: dict[str, int] = {}
        bogus_left = _BOGUS_LIMIT
        # a closing transport ends the loop at once: nothing pipelined after a 421 is carried out
        while self.transport is not None and not self.transport.is_closing():
            try:
                try:
                    line: bytes = await reader.readuntil()
                except asyncio.LimitOverrunError as error:
                    await reader.read(error.consumed)
                    while True:  # discard the rest of the overlong line
                        try:
                            await reader.readuntil()
                            break
                        except asyncio.LimitOverrunError as more:
                            await reader.read(more.consumed)
                    await self.push("500 5.5.2 Command line too long (limit 512 octets)")
                    continue
                line = line.rstrip(b"\r\n")
                command_bytes, _, arg_bytes = line.partition(b" ")
                try:
                    command = command_bytes.upper().decode("ascii")
                except UnicodeDecodeError:
                    command = ""
                if not command:
                    await self.push("500 5.5.2 Error: bad syntax")
                    continue
                arg: str | None = None
                if arg_bytes:
                    # UTF-8 only in MAIL and RCPT (RFC 6531 §3.3); whether the transaction asked for
                    # SMTPUTF8 is for submit/ to judge (550/553 5.6.7)
                    try:
                        arg = arg_bytes.strip().decode("utf-8")
                    except UnicodeDecodeError:
                        await self.push("500 5.5.2 Error: the command is not valid UTF-8")
                        continue
                    if command not in ("MAIL", "RCPT") and not arg.isascii():
                        await self.push("501 5.5.4 Non-ASCII characters are allowed only in MAIL and RCPT addresses")
                        continue
                limit = self.command_size_limits[command] if self.session.extended_smtp else 512
                if len(line) > limit:
                    await self.push("500 5.5.2 Command line too long (limit 512 octets)")
                    continue
                budget = _CALL_LIMITS.get(command)
                if budget is not None:
                    calls[command] = used = calls.get(command, 0) + 1
                    if used > budget:
                        log.info("event=call_limit client_ip=%s command=%s", self.client_ip, command)
                        self._close(f"421 4.7.0 {command} sent too many times")
                        continue
                method = self._smtp_methods.get(command)
                if method is None:
                    bogus_left -= 1
                    if bogus_left < 1:
                        self._close("502 5.5.1 Too many unrecognized commands, goodbye.")
                        continue
                    await self.push(f'500 5.5.1 Error: command "{command}" not recognized')
                    continue
                self._reset_timeout()
                await method(self, arg)
            except (asyncio.CancelledError, ConnectionResetError):
                self._writer.close()
                raise
            except Exception as error:
                await self.push(await self.handle_exception(error))

    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname:
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        self._set_rset_state()
        assert self.session is not None
        self.session.extended_smtp = True
        self.session.host_name = hostname
        lines = [
            self.hostname,
            f"SIZE {self.data_size_limit}",
            "8BITMIME",
            "PIPELINING",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",  # RFC 6531: UTF-8 addresses and headers (submit/ and deliver/ carry them on)
        ]
        if self.ctx.tls_context is not None and not self.is_tls:
            lines.append("STARTTLS")
        if self.is_tls:
            lines.append("AUTH PLAIN LOGIN")
        await self._push_lines(lines)

    async def smtp_STARTTLS(self, arg: str) -> None:
        """TLS through the loop's own start_tls (uvloop's C implementation, not asyncio's sslproto)."""
        if arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
            return
        if self.tls_context is None or self.is_tls:
            await self.push("454 4.7.0 TLS not available")
            return
        await self.push("220 2.0.0 Ready to start TLS")
        reader: Any = self._reader
        reader._buffer.clear()  # CVE-2011-0411: nothing sent before the handshake is read as a command
        await self._upgrade_tls(self.tls_context)

    async def _upgrade_tls(self, context: ssl.SSLContext) -> bool:
        """Run the server side of a TLS handshake on this connection; False (and closed) if it fails."""
        try:
            transport = await self.loop.start_tls(
                self.transport,  # type: ignore[arg-type]
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=min(self.ctx.config.smtp.command_timeout, _HANDSHAKE_TIMEOUT_S),
            )
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            log.info("event=tls_failed client_ip=%s error=%r", self.client_ip, str(exc))
            if self.transport is not None:
                self.transport.close()
            return False
        if transport is None:  # the connection went away during the handshake
            return False
        reader: Any = self._reader
        reader._transport = transport
        self._writer._transport = transport  # type: ignore[attr-defined]
        self.transport = transport
        self._tls_protocol = transport  # type: ignore[assignment]  # aiosmtpd reads it as "TLS is on"
        # RFC 3207 4.2: forget everything learned before TLS; the client starts over with EHLO.
        peer = self.session.peer if self.session is not None else None
        self._set_rset_state()
        self.session = self._create_session()
        self.session.peer = peer
        self.session.ssl = {"ssl_object": transport.get_extra_info("ssl_object")}
        self._reset_timeout()
        return True

    async def smtp_AUTH(self, arg: str) -> None:
        if await self.check_helo_needed("EHLO"):
            return
        session: Any = self.session
        if not session.extended_smtp:
            await self.push("503 5.5.1 Send EHLO first")
            return
        if not self.is_tls:
            await self.push("538 5.7.11 Encryption required for requested authentication mechanism")
            return
        if session.authenticated:
            await self.push("503 5.5.1 Already authenticated")
            return
        if self.envelope is not None and self.envelope.mail_from is not None:
            await self.push("503 5.5.1 AUTH is not allowed during a mail transaction")
            return
        args = (arg or "").split()
        if not 1 <= len(args) <= 2:
            await self.push("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        mechanism = args[0].upper()
        if mechanism == "PLAIN":
            creds = await self._auth_plain(args)
        elif mechanism == "LOGIN":
            creds = await self._auth_login(args)
        else:
            await self.push("504 5.5.4 Unrecognized authentication type (use PLAIN or LOGIN)")
            return
        if creds is None:
            return  # the reason was already sent
        result = await self.ctx.service.authenticate(creds[0], creds[1], self.client_ip, mechanism)
        if isinstance(result, Refusal):
            await self.push(result.reply)
            if result.code == 421:  # throttled: the client must go away
                self._close()
            return
        session.sender = result
        session.authenticated = True
        await self.push("235 2.7.0 Authentication successful")

    async def _decode(self, blob: str | bytes) -> bytes | None:
        try:
            return b64decode(blob, validate=True)
        except (binascii.Error, ValueError):
            await self.push("501 5.5.2 Cannot decode base64")
            return None

    async def _challenge(self, prompt: bytes) -> bytes | None:
        try:
            answer = await self.challenge_auth(prompt)
        except ValueError:  # the answer overran the line limit; the stream is out of step
            self._close("500 5.5.6 Authentication exchange line is too long")
            return None
        return None if answer is MISSING else answer  # type: ignore[return-value]

    async def _auth_plain(self, args: list[str]) -> tuple[str, str] | None:
        raw = await self._decode(args[1]) if len(args) == 2 else await self._challenge(b"")
        if raw is None:
            return None
        parts = raw.split(b"\0")
        if len(parts) != 3 or (parts[0] and parts[0] != parts[1]):
            await self.push("501 5.5.2 Malformed AUTH PLAIN response")
            return None
        if await self._bad_login(self._text(parts[1])):
            return None
        return self._text(parts[1]), self._text(parts[2])

    async def _auth_login(self, args: list[str]) -> tuple[str, str] | None:
        login = await self._decode(args[1]) if len(args) == 2 else await self._challenge(b"Username:")
        if login is None or await self._bad_login(self._text(login)):
            return None
        password = await self._challenge(b"Password:")
        if password is None:
            return None
        return self._text(login), self._text(password)

    async def _bad_login(self, login: str) -> bool:
        """Refuse a login name holding a control character (CR, LF, NUL, any C0 or C1, DEL): no
        account has one, and printed it could forge a log line. Refused before any lookup and
        not written to the login log, like a malformed AUTH PLAIN blob: it is not an attempt
        at any account."""
        if not has_controls(login):
            return False
        await self.push("501 5.5.2 A login name cannot hold control characters")
        return True

    @staticmethod
    def _text(raw: bytes) -> str:
        return raw.decode("utf-8", "surrogateescape")

    async def _envelope_arg(self, command: str, arg: str | None) -> tuple[str, list[str], dict[str, Any]] | None:
        """The shared front of MAIL and RCPT, with aiosmtpd's syntax rules: session state, then the
        <address> and its parameters. None once a refusal has been sent."""
        session: Any = self.session
        envelope: Any = self.envelope
        if not session.host_name:
            await self.push("503 5.5.1 Error: send HELO first")
            return None
        if session.sender is None and await self.check_auth_needed(command):
            return None
        if command == "RCPT" and not envelope.mail_from:
            await self.push("503 5.5.1 Error: need MAIL command")
            return None
        keyword = "FROM:" if command == "MAIL" else "TO:"
        syntax = f"501 5.5.4 Syntax: {command} {keyword}<address>" + (
            " [SP <mail-parameters>]" if session.extended_smtp else ""
        )
        rest = self._strip_command_keyword(keyword, arg) if arg else None
        if rest is None:
            await self.push(syntax)
            return None
        if command == "MAIL" and rest.startswith("<>") and (len(rest) == 2 or rest[2].isspace()):
            await self.push(refusals.NULL_SENDER.reply)
            return None
        address, params = self._getaddr(rest)
        if address is None:
            await self.push("501 5.1.3 Bad address syntax")
            return None
        if command == "MAIL" and envelope.mail_from:
            await self.push("503 5.5.1 Error: nested MAIL command")
            return None
        options = params.upper().split() if params else []
        parsed = self._getparams(options) if address and (session.extended_smtp or not options) else None
        if parsed is None:
            await self.push(syntax)
            return None
        return address, options, parsed

    async def smtp_MAIL(self, arg: str | None) -> None:
        """MAIL, deciding through SubmitService directly (no aiosmtpd hook dispatch)."""
        front = await self._envelope_arg("MAIL", arg)
        if front is None:
            return
        address, options, parsed = front
        if parsed.pop("BODY", "7BIT") not in ("7BIT", "8BITMIME"):
            await self.push("501 5.5.4 BODY can only be 7BIT or 8BITMIME")
            return
        utf8 = parsed.pop("SMTPUTF8", False)
        if utf8 not in (True, False):  # RFC 6531 §3.4: the parameter has no value
            await self.push("501 5.5.4 Syntax: SMTPUTF8 takes no value")
            return
        size = parsed.pop("SIZE", None)
        if size is not None:
            if not isinstance(size, str) or not size.isdigit():
                await self.push("501 5.5.4 Syntax: SIZE=<number of octets>")
                return
            if self.data_size_limit and int(size) > self.data_size_limit:
                await self.push("552 5.3.4 Message size exceeds fixed maximum message size")
                return
        if parsed:
            await self.push("555 5.5.4 MAIL FROM parameters not recognized or not implemented")
            return
        service = self.ctx.service
        if service.reloading:
            await service.current()
        session: Any = self.session
        refusal = service.check_mail(session.sender, address, utf8, int(size) if size else 0)
        if refusal is not None:
            await self.push(refusal.reply)
            return
        envelope: Any = self.envelope
        envelope.smtp_utf8 = utf8
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        await self.push("250 2.1.0 Sender OK")

    async def smtp_RCPT(self, arg: str | None) -> None:
        """RCPT, deciding through SubmitService directly."""
        front = await self._envelope_arg("RCPT", arg)
        if front is None:
            return
        address, options, parsed = front
        if parsed:
            await self.push("555 5.5.4 RCPT TO parameters not recognized or not implemented")
            return
        session: Any = self.session
        envelope: Any = self.envelope
        refusal = self.ctx.service.check_rcpt(session.sender, address, len(envelope.rcpt_tos), envelope.smtp_utf8)
        if refusal is not None:
            await self.push(refusal.reply)
            return
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        await self.push("250 2.1.5 Recipient OK")

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Need RCPT command first")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        self.busy = True
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            try:
                raw, refusal = await self._read_data()
                if raw is not None:
                    status = await self._call_handler_hook("DATA_BYTES", raw)
                elif refusal is not None:  # refused while reading (size, content, memory); the service counts its own
                    self.ctx.service.stats.refused(refusal)
                    status = refusal.reply
                else:  # the client went away, or was cut off for a rate too low
                    status = ""
            finally:
                self._set_post_data_state()  # a failed transaction must not leave its envelope behind
            if status:
                await self.push(status)
        finally:
            self.busy = False
            self._release()
            if self._eof:
                self._close()
            elif self.ctx.sessions.closing:
                self._close("421 4.3.2 Service shutting down")

    async def _read_data(self) -> tuple[bytes | None, Refusal | None]:
        """Read up to <CRLF>.<CRLF>; return (unstuffed bytes, None), (None, the refusal) or, when
        the session is over, (None, None)."""
        cfg = self.ctx.config.smtp
        reader: Any = self._reader
        limit = self.data_size_limit or 0
        buf = bytearray(b"\r\n")  # a virtual CRLF: "." as the first line ends an empty message
        scan_from = 0
        received = 0
        overrun: Refusal | None = None
        start = self.loop.time()
        reader._limit = _DATA_READ_LIMIT  # read in large chunks during DATA
        try:
            while True:
                self._reset_timeout(cfg.data_timeout)
                chunk = await reader.read(_CHUNK)
                if not chunk:
                    return None, None
                received += len(chunk)
                if overrun is None:
                    self._hold(len(chunk))
                buf += chunk
                end = buf.find(b"\r\n.\r\n", scan_from)
                if end >= 0 and overrun is None:  # the last read counts against the limits too
                    if limit and end > limit:
                        overrun = refusals.TOO_BIG
                    elif self.ctx.service.data_budget.over():
                        overrun = refusals.DATA_BUSY
                if end >= 0:
                    rest = buf[end + 5 :]
                    if rest:  # pipelined commands after the dot: leave them for the command loop
                        reader._buffer[0:0] = rest
                    del buf[end + 2 :]
                    break
                if overrun is None and limit and len(buf) - 2 > limit:
                    overrun = refusals.TOO_BIG
                elif overrun is None and self.ctx.service.data_budget.over():
                    log.warning("event=data_budget_exceeded in_flight=%d", self.ctx.service.data_budget.held_bytes)
                    overrun = refusals.DATA_BUSY
                if overrun is not None:
                    self._release()
                    del buf[:-4]  # keep only what could start the end-of-data sequence
                scan_from = max(0, len(buf) - 4)
                if policy.too_slow(received, self.loop.time() - start, cfg.min_data_rate, cfg.min_data_rate_grace):
                    log.info("event=data_too_slow client_ip=%s bytes=%d", self.client_ip, received)
                    self._close("421 4.4.2 Data rate too low; closing connection")
                    return None, None
        finally:
            reader._limit = self.line_length_limit
            self._reset_timeout()
        if overrun is not None:
            return None, overrun
        if len(buf) > _INLINE_CHECK_BYTES:  # a large message is checked off the event loop
            verdict = await self.loop.run_in_executor(None, _check, buf, cfg.bare_newlines)
        else:
            verdict = _check(buf, cfg.bare_newlines)
        if verdict.body is None:
            return None, refusals.bad_content(verdict.problem)
        return verdict.body, None

    def _hold(self, n: int) -> None:
        self._data_held += n
        self.ctx.service.data_budget.hold(n)

    def _release(self) -> None:
        """Give back this session's share of the in-flight DATA budget (its message is gone or spooled)."""
        self.ctx.service.data_budget.release(self._data_held)
        self._data_held = 0

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Move the idle deadline; one timer per session is re-armed only when it fires early.

        aiosmtpd cancels and creates a timer on every command; this is called for every
        command and every DATA chunk, so it only moves a number unless the deadline moved
        earlier than the armed timer.
        """
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._deadline = deadline
        if self._timeout_handle is None or deadline < self._timer_at:
            if self._timeout_handle is not None:
                self._timeout_handle.cancel()
            self._timer_at = deadline
            self._timeout_handle = self.loop.call_at(deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        if self.loop.time() < self._deadline:
            self._timer_at = self._deadline
            self._timeout_handle = self.loop.call_at(self._deadline, self._check_deadline)
        else:
            self._timeout_cb()

    def _timeout_cb(self) -> None:
        log.info("event=timeout client_ip=%s", self.client_ip)
        self.ctx.service.stats.doors["smtp"].timed_out("data" if self.busy else "command")
        self._close("421 4.4.2 Timeout; closing connection")

    def _close(self, reply: str | None = None) -> None:
        """Close after REPLY; a TLS peer that does not answer close_notify is cut off after _CLOSE_GRACE_S."""
        transport = self.transport
        if transport is None:
            return
        if reply:
            transport.write((reply + "\r\n").encode())  # type: ignore[attr-defined]
        transport.close()
        self.loop.call_later(_CLOSE_GRACE_S, transport.abort)  # type: ignore[attr-defined]


# Command name -> the (unbound) smtp_* function; one table for every session instead of a dict
# of bound methods built per connection (aiosmtpd's HELP reads only attributes off these).
_COMMANDS: dict[str, Any] = {
    name[5:]: getattr(SubmissionSMTP, name) for name in dir(SubmissionSMTP) if name.startswith("smtp_")
}
