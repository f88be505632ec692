"""Stateful fuzzing of SMTP submission sessions over a real socket against a real daemon.

A hypothesis state machine opens connections to the STARTTLS submission port and sends random
interleavings of valid and malformed commands: commands in the wrong order, repeated EHLO,
STARTTLS twice (and commands injected behind it), pipelined batches (also before the greeting),
huge and empty arguments, random bytes with NUL/CR/LF/0x80-0xFF, DATA bodies with bare CR/LF,
dots, NUL and command-like lines. A model of the session predicts every reply code; after each
step the invariants are checked:

* every reply is well-formed (code, continuation marker, enhanced status code) or the server closes;
* a message is queued only after a complete, authenticated transaction (the model's prediction);
* what is queued is byte-for-byte what was sent after the documented normalisation (bare CR/LF ->
  CRLF, dot-unstuffing), behind the Received: header cmcd adds;
* the daemon is alive and its resident memory stays bounded.

`make test` runs CMCD_FUZZ_EXAMPLES (default 100) derandomized examples; `make fuzz` runs more.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import ssl
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.conftest import PASSWORD, Cmcd

EXAMPLES = int(os.environ.get("CMCD_FUZZ_EXAMPLES", "100"))
RANDOM = os.environ.get("CMCD_FUZZ_RANDOM") == "1"
MAX_RSS_KB = 300 * 1024

HEAD = (
    b"From: <alice@acme.test>\r\nTo: <rcpt@dst.test>\r\nSubject: fuzz\r\n"
    b"Message-ID: <fuzz@acme.test>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n"
)
COMMANDS = {"EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "STARTTLS", "AUTH", "VRFY", "EXPN", "HELP"}
LIMITS = {"NOOP": 100, "EHLO": 10, "STARTTLS": 2}  # per-session call budgets; past them: 421 and close
MAX_RECIPIENTS = 100

REPLY_LINE = re.compile(rb"^([2-5]\d\d)([ -])(.*)\r\n$", re.S)
ENHANCED = re.compile(rb"^[245]\.\d{1,3}\.\d{1,3}( |$)")
QUEUED = re.compile(rb"queued as ([0-9A-Z]+)")

Reply = tuple[int, list[bytes]]  # code, text of each line (without code and CRLF)


def normalise(data: bytes) -> bytes:
    """cmcd's documented DATA normalisation: bare CR or LF becomes CRLF, then a line that starts
    with a period and has more characters loses that period (RFC 5321 4.5.2)."""
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    lines = data.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") and len(line) > 1 else line for line in lines)


def junk_safe(data: bytes) -> bytes:
    """DATA lines as one would send them, so no line is mistaken for a command: every line's
    verb that is ASCII gets an "X-" in front, so the server sees an unknown (or non-ASCII) verb."""
    out = []
    for line in data.split(b"\n"):
        verb = line.rstrip(b"\r").partition(b" ")[0]
        if verb and verb.isascii():
            line = b"X-" + line
        out.append(line)
    return b"\n".join(out)


# -- strategies ----------------------------------------------------------------------------------

nasty_bytes = st.binary(max_size=40) | st.sampled_from(
    [b"\x00", b"\r", b"\n", b"\r\n", b"\x80\xff", b"\xc3\xa9", b" ", b"\t", b".", b"..", b"\r\n.\r\n", b"\n.\n"]
)
junk_line = st.lists(nasty_bytes, max_size=6).map(b"".join)
body_piece = st.sampled_from(
    [
        b"hello\r\n",
        b".\r\n",
        b"..\r\n",
        b".dot\r\n",
        b"\r\n.\r\n",
        b"\n.\n",
        b"\r.\r",
        b"bare lf\n",
        b"bare cr\r",
        b"\x00",
        b"8bit \xc3\xa9\xff\r\n",
        b"RSET\r\n",
        b"QUIT\r\n",
        b"MAIL FROM:<alice@acme.test>\r\nRCPT TO:<victim@dst.test>\r\nDATA\r\n",
        b"x" * 1200 + b"\r\n",
    ]
) | st.binary(max_size=30)
body_strategy = st.lists(body_piece, max_size=8).map(b"".join)
hostnames = st.sampled_from(["client.test", "a", "x" * 200, "[127.0.0.1]"])
simple_lines = st.sampled_from(
    [
        b"NOOP",
        b"RSET",
        b"EHLO pipelined.test",
        b"MAIL FROM:<alice@acme.test>",
        b"RCPT TO:<one@dst.test>",
        b"RCPT TO:<two@dst.test>",
        b"MAIL FROM:<bob@beta.test>",
        b"RCPT TO:<bad address>",
        b"XFOO bar",
    ]
)


class Connection:
    """A client socket with its own line buffer (so STARTTLS can wrap it without losing bytes)."""

    def __init__(self, port: int):
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.buf = b""
        self.eof = False

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False  # the server closed; the reply reading notices

    def _fill(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def line(self) -> bytes | None:
        while b"\n" not in self.buf:
            if self.eof or not self._fill():
                assert not self.buf, f"partial reply line before the close: {self.buf!r}"
                return None
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def reply(self) -> Reply | None:
        """One reply, every line checked for well-formedness; None when the server closed."""
        lines: list[bytes] = []
        code = None
        while True:
            raw = self.line()
            if raw is None:
                assert not lines, f"connection closed inside a multi-line reply: {lines!r}"
                return None
            m = REPLY_LINE.match(raw)
            assert m is not None, f"malformed reply line {raw!r}"
            assert code is None or int(m.group(1)) == code, f"code changed inside a reply: {raw!r}"
            code = int(m.group(1))
            lines.append(m.group(3))
            if m.group(2) == b" ":
                break
        if len(lines) == 1 and code not in (220, 334, 354):
            assert ENHANCED.match(lines[0]), f"reply without an enhanced status code: {code} {lines[0]!r}"
        return code, lines

    def expect_close(self) -> None:
        """After a closing reply, nothing more comes (possibly a TLS close)."""
        self.sock.settimeout(5)
        assert self.line() is None, "data after a closing reply"

    def starttls(self, context: ssl.SSLContext) -> None:
        assert self.buf == b"", f"bytes after 220 to STARTTLS: {self.buf!r}"
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")

    def close(self) -> None:
        self.sock.close()


class SmtpFuzz(RuleBasedStateMachine):
    """Set by the test: the daemon, and the expected spool (queue id -> (body, recipients))."""

    d: Cmcd
    expected: dict[str, tuple[bytes, list[str]]]
    seen: set[str]
    stats: dict[str, int]

    def __init__(self) -> None:
        super().__init__()
        self.conn: Connection | None = None
        self.queued_now: dict[str, tuple[bytes, list[str]]] = {}

    # -- model -----------------------------------------------------------------------------

    def _reset_session(self) -> None:
        self.tls = False
        self.ehlo = False
        self.auth = False
        self.mail = False
        self.rcpts: list[str] = []
        self.calls: dict[str, int] = {}

    @property
    def open(self) -> bool:
        return self.conn is not None

    def _connect(self, before_greeting: list[bytes]) -> None:
        self._reset_session()
        self.conn = Connection(self.d.smtp_port)
        steps = [self._step(line) for line in before_greeting]
        if steps:  # pipelined before the greeting: they are read (and answered) after it
            self.conn.send(b"".join(line + b"\r\n" for line, _ in steps))
        greeting = self.conn.reply()
        assert greeting is not None and greeting[0] == 220, greeting
        self._run(steps, send=False)

    def _closed(self) -> None:
        assert self.conn is not None
        self.conn.close()
        self.conn = None

    def _budget(self, verb: str) -> bool:
        """Count a call; True while within the per-session budget."""
        self.calls[verb] = self.calls.get(verb, 0) + 1
        return self.calls[verb] <= LIMITS[verb]

    def _step(self, line: bytes) -> tuple[bytes, Any]:
        """LINE with the checker that predicts its reply from the model (and advances the model)."""
        verb, _, arg = line.partition(b" ")
        verb_s = verb.upper().decode("ascii", "replace")
        if len(line) > 512 and verb_s != "MAIL" or len(line) > 548:  # MAIL: 26 for SIZE/BODY, 10 for SMTPUTF8
            return line, self._check_code({500})
        if verb_s == "NOOP":
            return line, self._noop
        if verb_s == "RSET":
            return line, self._rset
        if verb_s == "EHLO":
            return line, lambda r: self._ehlo(r, bool(arg.strip()))
        if verb_s == "MAIL":
            return line, lambda r: self._mail(r, arg)
        if verb_s == "RCPT":
            return line, lambda r: self._rcpt(r, arg)
        return line, self._check_code(None)  # unknown: any 5xx, nothing changes (or goodbye)

    def _run(self, steps: list[tuple[bytes, Any]], send: bool = True) -> None:
        assert self.conn is not None
        if send:  # a failed send (the server closed) shows in the replies
            self.conn.send(b"".join(line + b"\r\n" for line, _ in steps))
        for _line, check in steps:
            if self.conn is None:
                return
            check(self.conn.reply())

    def _check_code(self, codes: set[int] | None):  # type: ignore[no-untyped-def]
        def check(reply: Reply | None) -> None:
            if codes is None:  # a junk or unknown command: a refusal, or 502 goodbye and close
                assert reply is not None and 500 <= reply[0] < 600, reply
                if reply[0] == 502 and b"goodbye" in reply[1][0]:
                    assert self.conn is not None
                    self.conn.expect_close()
                    self._closed()
                return
            assert reply is not None and reply[0] in codes, (reply, codes)

        return check

    def _limited(self, verb: str, reply: Reply | None) -> bool:
        """Apply the budget for VERB; True (and the connection closed) if it is used up."""
        if self._budget(verb):
            return False
        assert reply is not None and reply[0] == 421, reply
        assert self.conn is not None
        self.conn.expect_close()
        self._closed()
        return True

    def _noop(self, reply: Reply | None) -> None:
        if not self._limited("NOOP", reply):
            assert reply is not None and reply[0] == 250, reply

    def _rset(self, reply: Reply | None) -> None:
        assert reply is not None and reply[0] == 250, reply
        self.mail, self.rcpts = False, []

    def _ehlo(self, reply: Reply | None, has_arg: bool) -> None:
        if self._limited("EHLO", reply):
            return
        assert reply is not None
        if not has_arg:
            assert reply[0] == 501, reply
            return
        assert reply[0] == 250, reply
        words = {text.split(b" ")[0] for text in reply[1][1:]}
        assert ("AUTH" if self.tls else "STARTTLS").encode() in words, reply
        assert ("STARTTLS" if self.tls else "AUTH").encode() not in words, reply
        self.ehlo, self.mail, self.rcpts = True, False, []

    def _mail(self, reply: Reply | None, arg: bytes) -> None:
        assert reply is not None
        if not self.ehlo:
            assert reply[0] == 503, reply
        elif not self.auth:
            assert reply[0] == 530, reply
        elif arg == b"FROM:<alice@acme.test>" and not self.mail:
            assert reply[0] == 250, reply
            self.mail = True
        else:
            assert reply[0] in (501, 503, 550, 553, 555), reply  # syntax, nested, other tenant

    def _rcpt(self, reply: Reply | None, arg: bytes) -> None:
        assert reply is not None
        if not self.ehlo:
            assert reply[0] == 503, reply
        elif not self.auth:
            assert reply[0] == 530, reply
        elif not self.mail:
            assert reply[0] == 503, reply
        elif re.fullmatch(rb"TO:<[a-z0-9]+@dst\.test>", arg) and len(self.rcpts) < MAX_RECIPIENTS:
            assert reply[0] == 250, reply
            self.rcpts.append(arg[4:-1].decode())
        else:
            assert reply[0] in (452, 501, 553, 555), reply

    # -- connection rules ------------------------------------------------------------------

    @initialize(before=st.lists(simple_lines, max_size=3))
    def connect(self, before: list[bytes]) -> None:
        self._connect(before)

    @precondition(lambda self: not self.open)
    @rule(before=st.lists(simple_lines, max_size=2))
    def reconnect(self, before: list[bytes]) -> None:
        self._connect(before)

    @precondition(lambda self: self.open)
    @rule()
    def quit(self) -> None:
        assert self.conn is not None
        self.conn.send(b"QUIT\r\n")
        reply = self.conn.reply()
        assert reply is not None and reply[0] == 221, reply
        self.conn.expect_close()
        self._closed()

    @precondition(lambda self: self.open)
    @rule()
    def hang_up(self) -> None:
        self._closed()

    # -- valid commands ---------------------------------------------------------------------

    @precondition(lambda self: self.open)
    @rule(host=hostnames)
    def ehlo_cmd(self, host: str) -> None:
        self._run([self._step(b"EHLO " + host.encode())])

    @precondition(lambda self: self.open)
    @rule(inject=st.booleans())
    def starttls(self, inject: bool) -> None:
        """STARTTLS (also a second time, and past its budget); with INJECT a command follows in the
        same write, which must be discarded (CVE-2011-0411), not answered after the handshake."""
        assert self.conn is not None
        self.conn.send(b"STARTTLS\r\n" + (b"NOOP\r\n" if inject else b""))
        reply = self.conn.reply()
        if self._limited("STARTTLS", reply):
            return
        assert reply is not None
        if self.tls:
            assert reply[0] == 454, reply
            if inject:
                self._noop(self.conn.reply())
            return
        assert reply[0] == 220, reply
        self.conn.starttls(self.d.client_context())
        calls = self.calls  # the per-command budgets are the connection's: TLS does not renew them
        self._reset_session()
        self.tls = True
        self.stats["tls"] += 1
        self.calls = calls
        if inject:  # the next reply must be to EHLO, not to the injected NOOP
            self.ehlo_cmd("after-tls.test")

    @precondition(lambda self: self.open)
    @rule(mechanism=st.sampled_from(["PLAIN", "LOGIN", "PLAIN-CHALLENGE"]))
    def auth_ok(self, mechanism: str) -> None:
        assert self.conn is not None
        will_run = self.ehlo and self.tls and not self.auth and not self.mail
        if mechanism == "PLAIN":
            self.conn.send(b"AUTH PLAIN " + base64.b64encode(f"\0alice\0{PASSWORD}".encode()) + b"\r\n")
        elif mechanism == "LOGIN":
            self.conn.send(b"AUTH LOGIN " + base64.b64encode(b"alice") + b"\r\n")
            if will_run:
                reply = self.conn.reply()
                assert reply is not None and reply[0] == 334, reply
                self.conn.send(base64.b64encode(PASSWORD.encode()) + b"\r\n")
        else:
            self.conn.send(b"AUTH PLAIN\r\n")
            if will_run:
                reply = self.conn.reply()
                assert reply is not None and reply[0] == 334, reply
                self.conn.send(base64.b64encode(f"alice\0alice\0{PASSWORD}".encode()) + b"\r\n")
        reply = self.conn.reply()
        assert reply is not None, "closed on AUTH"
        if will_run:
            assert reply[0] == 235, reply
            self.auth = True
            self.stats["auth"] += 1
        elif not self.ehlo:
            assert reply[0] == 503, reply
        else:
            assert reply[0] in (503, 538), reply
            assert (reply[0] == 538) == (not self.tls), reply

    @precondition(lambda self: self.open)
    @rule(password=st.sampled_from(["wrong", "", PASSWORD + "x"]))
    def auth_bad(self, password: str) -> None:
        """Wrong credentials (the harness turns the failure throttle off) and malformed AUTH lines."""
        assert self.conn is not None
        lines = [
            b"AUTH PLAIN " + base64.b64encode(f"\0alice\0{password}".encode()),
            b"AUTH PLAIN !!notbase64",
            b"AUTH PLAIN " + base64.b64encode(b"no-nuls"),
            b"AUTH CRAM-MD5",
            b"AUTH PLAIN a b c",
        ]
        for line in lines:
            self.conn.send(line + b"\r\n")
            reply = self.conn.reply()
            assert reply is not None and reply[0] in (501, 503, 504, 535, 538), (line, reply)
            if self.ehlo and self.tls and not self.auth and not self.mail and line is lines[0]:
                assert reply[0] == 535, reply

    @precondition(lambda self: self.open)
    @rule(sender=st.sampled_from([b"FROM:<alice@acme.test>", b"FROM:<bob@beta.test>", b"FROM:<>", b"FROM:alice"]))
    def mail(self, sender: bytes) -> None:
        self._run([self._step(b"MAIL " + sender)])

    @precondition(lambda self: self.open)
    @rule(rcpt=st.sampled_from([b"TO:<rcpt@dst.test>", b"TO:<other@dst.test>", b"TO:<a\x01b@dst.test>", b"TO:"]))
    def rcpt(self, rcpt: bytes) -> None:
        if b"\x01" in rcpt:  # a control character in the address
            assert self.conn is not None
            self.conn.send(b"RCPT " + rcpt + b"\r\n")
            reply = self.conn.reply()
            assert reply is not None and reply[0] in (501, 503, 530), reply
            return
        self._run([self._step(b"RCPT " + rcpt)])

    @precondition(lambda self: self.open)
    @rule()
    def rset(self) -> None:
        self._run([self._step(b"RSET")])

    @precondition(lambda self: self.open)
    @rule()
    def noop(self) -> None:
        self._run([self._step(b"NOOP")])

    @precondition(lambda self: self.open)
    @rule(body=body_strategy, pipelined=st.booleans())
    def data(self, body: bytes, pipelined: bool) -> None:
        """DATA with a random body behind fixed headers; with PIPELINED a NOOP follows the dot in the same write."""
        assert self.conn is not None
        if b"\r\n.\r\n" in b"\r\n" + HEAD + body + b"\r\n":  # keep the end marker where we put it
            body = b"x" + body.replace(b"\n.", b"\n..")
        sent = HEAD + body + b"\r\n"
        self.conn.send(b"DATA\r\n")
        reply = self.conn.reply()
        assert reply is not None
        if not self.ehlo:
            assert reply[0] == 503, reply
            return
        if not self.auth:
            assert reply[0] == 530, reply
            return
        if not self.rcpts:
            assert reply[0] == 503, reply
            return
        assert reply[0] == 354, reply
        self.stats["data"] += 1
        self.conn.send(sent + b".\r\n" + (b"NOOP\r\n" if pipelined else b""))
        reply = self.conn.reply()
        assert reply is not None, "closed after DATA"
        if b"\x00" in sent:
            assert reply[0] == 550 and reply[1][0].startswith(b"5.6.0"), reply
        else:
            assert reply[0] == 250, reply
            m = QUEUED.search(reply[1][0])
            assert m is not None, reply
            qid = m.group(1).decode()
            assert qid not in self.expected and qid not in self.queued_now, qid
            self.queued_now[qid] = (normalise(sent), list(self.rcpts))
            self.stats["queued"] += 1
        self.mail, self.rcpts = False, []
        if pipelined:
            self._noop(self.conn.reply())

    # -- shortcuts: random walks alone rarely get past STARTTLS and AUTH ---------------------

    @precondition(lambda self: self.open and not self.auth)
    @rule()
    def login(self) -> None:
        """STARTTLS (unless on), EHLO and AUTH PLAIN, each step checked against the model."""
        if not self.tls and self.calls.get("STARTTLS", 0) < LIMITS["STARTTLS"]:
            self.starttls(False)
        if self.conn is not None and not self.ehlo:
            self.ehlo_cmd("client.test")
        if self.conn is not None:
            self.auth_ok("PLAIN")

    @precondition(lambda self: self.open and self.auth)
    @rule(body=body_strategy, rcpts=st.integers(1, 3), pipelined=st.booleans())
    def transaction(self, body: bytes, rcpts: int, pipelined: bool) -> None:
        """MAIL (unless in a transaction), RCPTs and DATA."""
        lines = [] if self.mail else [b"MAIL FROM:<alice@acme.test>"]
        lines += [f"RCPT TO:<r{i}@dst.test>".encode() for i in range(rcpts)]
        self._run([self._step(line) for line in lines])
        if self.conn is not None:
            self.data(body, pipelined)

    @precondition(lambda self: self.open)
    @rule(body=body_strategy)
    def login_and_send(self, body: bytes) -> None:
        """The two shortcuts at once: most random walks never meet both."""
        if not self.auth:
            self.login()
        if self.conn is not None and self.auth:
            self.transaction(body, 1, False)

    # -- malformed input --------------------------------------------------------------------

    @precondition(lambda self: self.open)
    @rule(lines=st.lists(simple_lines, min_size=2, max_size=6))
    def pipelined(self, lines: list[bytes]) -> None:
        self._run([self._step(line) for line in lines])

    @precondition(lambda self: self.open)
    @rule(data=junk_line)
    def junk(self, data: bytes) -> None:
        """Random bytes (NUL, CR, LF, 8-bit); every line they make is refused with a 5xx."""
        assert self.conn is not None
        data = junk_safe(data) + b"\r\n"
        self.conn.send(data)
        for _ in range(data.count(b"\n")):
            if self.conn is None:
                return
            self._check_code(None)(self.conn.reply())

    @precondition(lambda self: self.open)
    @rule(
        verb=st.sampled_from([b"EHLO ", b"NOOP ", b"MAIL FROM:<", b"RCPT TO:<", b"RSET ", b"XHUGE "]),
        n=st.integers(600, 2000),
    )
    def huge(self, verb: bytes, n: int) -> None:
        self._run([(verb + b"a" * n, self._check_code({500}))])

    @precondition(lambda self: self.open)
    @rule(
        line=st.sampled_from(
            [b"EHLO", b"EHLO ", b"MAIL", b"MAIL FROM:", b"RCPT", b"RCPT TO:", b"AUTH", b"DATA x", b"STARTTLS x"]
        )
    )
    def empty_argument(self, line: bytes) -> None:
        assert self.conn is not None
        verb = line.split(b" ")[0].decode()
        if verb == "EHLO":
            self._run([(line, lambda r: self._ehlo(r, False))])
            return
        self.conn.send(line + b"\r\n")
        reply = self.conn.reply()
        if verb == "STARTTLS" and self._limited("STARTTLS", reply):
            return
        assert reply is not None and 500 <= reply[0] < 600, (line, reply)

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def daemon_alive_and_bounded(self) -> None:
        proc = self.d.proc
        assert proc is not None and proc.poll() is None, "cmcd died:\n" + "\n".join(self.d.log[-30:])
        assert rss_kb(proc.pid) < MAX_RSS_KB, f"cmcd uses {rss_kb(proc.pid)} kB"

    def teardown(self) -> None:
        if self.conn is not None:
            self._closed()
        spool = self.d.spooled()
        new = {qid: m for qid, m in spool.items() if qid not in self.seen}
        self.seen.update(new)  # first: a failing example must not make the next ones fail
        assert set(new) == set(self.queued_now), f"queued {sorted(new)}, expected {sorted(self.queued_now)}"
        for qid, (body, rcpts) in self.queued_now.items():
            got = new[qid]
            assert got["sender"] == "alice@acme.test"
            assert got["recipients"] == [(r, "queued") for r in rcpts]
            assert got["body"].endswith(body), (got["body"], body)
            assert got["body"].startswith(b"Received: "), got["body"][:200]
        self.stats["examples"] += 1
        self.expected.update(self.queued_now)


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@pytest.mark.timeout(max(300, EXAMPLES * 3))
def test_smtp_sessions_keep_their_invariants(make_cmcd: Any) -> None:
    d = make_cmcd({"smtp": {"auth_fail_limit": 0}})
    SmtpFuzz.d = d
    SmtpFuzz.expected = {}
    SmtpFuzz.seen = set(d.spooled())
    SmtpFuzz.stats = stats = dict.fromkeys(["examples", "tls", "auth", "data", "queued"], 0)
    start = time.monotonic()
    run_state_machine_as_test(
        SmtpFuzz,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=30,
            deadline=None,
            database=None,
            derandomize=not RANDOM,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
        ),
    )
    elapsed = time.monotonic() - start
    print(f"smtp fuzz: {stats} in {elapsed:.1f}s ({stats['examples'] / elapsed:.1f} examples/s)")
    assert set(d.spooled()) == set(SmtpFuzz.expected)
    if EXAMPLES >= 25:  # the fuzzer must reach deep states, not only refusals
        assert stats["auth"] and stats["queued"], stats
    assert d.proc is not None and d.proc.poll() is None


def test_single_leading_dot_is_removed(make_cmcd: Any) -> None:
    d = make_cmcd()
    with d.smtp() as c:
        c.mail("alice@acme.test")
        c.rcpt("rcpt@dst.test")
        c.send(b"DATA\r\n")
        assert c.getreply()[0] == 354
        c.send(HEAD + b".dot\r\n.\r\n")
        code, text = c.getreply()
    assert code == 250
    qid = QUEUED.search(text)
    assert qid is not None
    assert d.spooled()[qid.group(1).decode()]["body"].endswith(HEAD + b"dot\r\n")
