"""DATA over a raw TLS socket: exact bytes on the wire, bare CR/LF and NUL rules, smuggling, slow clients."""

from __future__ import annotations

import base64
import select
import socket
import time

import pytest

from tests.conftest import PASSWORD, Cmcd, queue_id

HEAD = b"From: <alice@acme.test>\r\nTo: <rcpt@dst.test>\r\nSubject: raw\r\nMessage-ID: <raw@acme.test>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n"


class Raw:
    """A submission session over STARTTLS + AUTH PLAIN where the test writes exact bytes."""

    def __init__(self, d: Cmcd):
        plain = socket.create_connection(("127.0.0.1", d.smtp_port), timeout=15)
        self.f = plain.makefile("rb")
        self.reply()
        plain.sendall(b"EHLO raw.test\r\n")
        self.reply()
        plain.sendall(b"STARTTLS\r\n")
        assert self.reply()[0] == 220
        self.sock = d.client_context().wrap_socket(plain, server_hostname="localhost")
        self.f = self.sock.makefile("rb")
        self.cmd(b"EHLO raw.test")
        token = base64.b64encode(f"\0alice\0{PASSWORD}".encode())
        assert self.cmd(b"AUTH PLAIN " + token)[0] == 235

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, bytes]:
        lines = []
        while True:
            line = self.f.readline()
            if not line:
                return (0, b"".join(lines))
            lines.append(line)
            if line[3:4] != b"-":
                return (int(line[:3]), b"".join(lines))

    def cmd(self, line: bytes) -> tuple[int, bytes]:
        self.send(line + b"\r\n")
        return self.reply()

    def transaction(self, data: bytes, rcpt: bytes = b"rcpt@dst.test") -> tuple[int, bytes]:
        """MAIL, RCPT, DATA, then DATA bytes exactly as given (which must include the end marker)."""
        assert self.cmd(b"MAIL FROM:<alice@acme.test>")[0] == 250
        assert self.cmd(b"RCPT TO:<" + rcpt + b">")[0] == 250
        assert self.cmd(b"DATA")[0] == 354
        self.send(data)
        return self.reply()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def reject_mode(tmp_path_factory: pytest.TempPathFactory, ca) -> Cmcd:  # type: ignore[no-untyped-def]
    d = Cmcd(tmp_path_factory.mktemp("reject"), ca, {"smtp": {"bare_newlines": "reject"}})
    d.start().provision()
    yield d
    d.stop()


def spooled_body(d: Cmcd, reply: tuple[int, bytes]) -> bytes:
    body = d.spooled()[queue_id(reply)]["body"]
    # everything after our Received: header is what the client sent (after the documented normalisation)
    return body[body.index(b"From: <alice@acme.test>") :]


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n"),
        (b"a\nb\r\n", b"a\r\nb\r\n"),
        (b"a\rb\r\n", b"a\r\nb\r\n"),
        (b"a\r\r\nb\r\n", b"a\r\n\r\nb\r\n"),
        (b"..dotted\r\n..\r\n...\r\n", b".dotted\r\n.\r\n..\r\n"),
        (b"8bit \xc3\xa9\xff\r\n", b"8bit \xc3\xa9\xff\r\n"),
    ],
    ids=["crlf", "bare-lf", "bare-cr", "cr-crlf", "dot-stuffing", "8bit"],
)
def test_normalize_mode_spools_exact_bytes(cmcd: Cmcd, sent: bytes, kept: bytes) -> None:
    s = Raw(cmcd)
    try:
        reply = s.transaction(HEAD + sent + b".\r\n")
        assert reply[0] == 250, reply
        assert spooled_body(cmcd, reply) == HEAD + kept
    finally:
        s.close()


@pytest.mark.parametrize(
    "sent", [b"a\nb\r\n", b"a\rb\r\n", b"x\r\n\n.\nstill data\r\n"], ids=["bare-lf", "bare-cr", "lf-dot-lf"]
)
def test_reject_mode_refuses_bare_newlines(reject_mode: Cmcd, sent: bytes) -> None:
    s = Raw(reject_mode)
    try:
        before = len(reject_mode.spooled())
        code, text = s.transaction(HEAD + sent + b".\r\n")
        assert code == 550 and b"5.6.0" in text
        assert s.cmd(b"NOOP")[0] == 250  # the session survives the refusal
        assert s.transaction(HEAD + b"clean\r\n.\r\n")[0] == 250
        assert len(reject_mode.spooled()) == before + 1
    finally:
        s.close()


@pytest.mark.parametrize("mode", ["normalize", "reject"])
def test_nul_is_refused_in_both_modes(cmcd: Cmcd, reject_mode: Cmcd, mode: str) -> None:
    d = cmcd if mode == "normalize" else reject_mode
    s = Raw(d)
    try:
        before = set(d.spooled())
        code, text = s.transaction(HEAD + b"a\x00b\r\n.\r\n")
        assert code == 550 and b"5.6.0" in text
        assert set(d.spooled()) == before
    finally:
        s.close()


SMUGGLED = (
    b"MAIL FROM:<alice@acme.test>\r\nRCPT TO:<victim@dst.test>\r\nDATA\r\n"
    b"From: <alice@acme.test>\r\nSubject: smuggled\r\n\r\nsmuggled\r\n"
)


@pytest.mark.parametrize(
    "fake_end",
    [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r\n.\n", b"\r.\n", b"\r\n\x00.\r\n"],
    ids=["lf-dot-lf", "lf-dot-crlf", "cr-dot-crlf", "crlf-dot-cr", "crlf-dot-lf", "cr-dot-lf", "nul-dot"],
)
@pytest.mark.parametrize("mode", ["normalize", "reject"])
def test_smuggling_sequences_never_make_a_second_message(
    cmcd: Cmcd, reject_mode: Cmcd, fake_end: bytes, mode: str
) -> None:
    d = cmcd if mode == "normalize" else reject_mode
    s = Raw(d)
    try:
        before = set(d.spooled())
        code, text = s.transaction(HEAD + b"first" + fake_end + SMUGGLED + b"\r\n.\r\n")
        # exactly one reply for the whole DATA; the smuggled commands were message content
        assert s.cmd(b"NOOP")[0] == 250
        new = {k: v for k, v in d.spooled().items() if k not in before}
        if code == 250:
            assert mode == "normalize" and b"\x00" not in fake_end
            assert len(new) == 1
            (msg,) = new.values()
            assert msg["recipients"] == [("rcpt@dst.test", "queued")]
            assert b"victim@dst.test" in msg["body"]  # as text inside the one message
        else:
            assert code == 550 and b"5.6.0" in text
            assert new == {}
    finally:
        s.close()


def test_pipelined_commands_after_the_dot_are_processed(cmcd: Cmcd) -> None:
    s = Raw(cmcd)
    try:
        s.send(
            b"MAIL FROM:<alice@acme.test>\r\nRCPT TO:<p1@dst.test>\r\nDATA\r\n" + HEAD + b"one\r\n.\r\n"
            b"MAIL FROM:<alice@acme.test>\r\nRCPT TO:<p2@dst.test>\r\nDATA\r\n"
        )
        codes = [s.reply()[0] for _ in range(7)]
        assert codes == [250, 250, 354, 250, 250, 250, 354]
        s.send(HEAD + b"two\r\n.\r\nQUIT\r\n")
        assert s.reply()[0] == 250
        assert s.reply()[0] == 221
    finally:
        s.close()


def test_slow_data_is_cut_off_by_the_minimum_rate(make_cmcd) -> None:  # type: ignore[no-untyped-def]
    d = make_cmcd({"smtp": {"min_data_rate": 1000, "min_data_rate_grace": "1s", "data_timeout": "30s"}})
    s = Raw(d)
    try:
        assert s.cmd(b"MAIL FROM:<alice@acme.test>")[0] == 250
        assert s.cmd(b"RCPT TO:<rcpt@dst.test>")[0] == 250
        assert s.cmd(b"DATA")[0] == 354
        start = time.monotonic()
        got = b""
        for byte in HEAD + b"x" * 400:
            s.send(bytes([byte]))
            readable, _, _ = select.select([s.sock], [], [], 0.05)
            if readable:
                got = s.sock.recv(4096)
                break
        assert got.startswith(b"421 4.4.2"), got
        assert time.monotonic() - start < 10
        assert d.spooled() == {}
    finally:
        s.close()


def test_slow_command_is_cut_off_by_the_command_timeout(make_cmcd) -> None:  # type: ignore[no-untyped-def]
    d = make_cmcd({"smtp": {"command_timeout": "2s"}})
    s = Raw(d)
    try:
        start = time.monotonic()
        closed = False
        for byte in b"NOOP and a very slow line" * 4:
            try:
                s.send(bytes([byte]))
                time.sleep(0.2)  # the clock is the subject: a client's pacing, one byte at a time
            except OSError:
                closed = True
                break
            if time.monotonic() - start > 8:
                break
        if not closed:
            s.sock.settimeout(2)
            closed = s.f.readline() == b""
        assert closed and time.monotonic() - start < 8
    finally:
        s.close()


def test_nothing_pipelined_after_a_421_is_carried_out(make_cmcd) -> None:  # type: ignore[no-untyped-def]
    d = make_cmcd()
    s = Raw(d)
    try:
        s.send(
            b"NOOP\r\n" * 101
            + b"MAIL FROM:<alice@acme.test>\r\nRCPT TO:<r@dst.test>\r\nDATA\r\n"
            + HEAD
            + b"after the 421\r\n.\r\n"
        )
        replies = []
        while True:
            code, text = s.reply()
            if code == 0:
                break
            replies.append(code)
        assert replies[-1] == 421 and replies.count(250) == 100
        assert d.spooled() == {}
    finally:
        s.close()


def test_size_limit_holds_for_a_message_sent_in_one_write(make_cmcd) -> None:  # type: ignore[no-untyped-def]
    d = make_cmcd({"smtp": {"max_message_size": 100_000}})
    s = Raw(d)
    try:
        code, text = s.transaction(HEAD + b"y" * 998 + b"\r\n" + (b"z" * 998 + b"\r\n") * 111 + b".\r\n")
        assert (code, text[4:9]) == (552, b"5.3.4")
        assert s.cmd(b"NOOP")[0] == 250
        assert d.spooled() == {}
    finally:
        s.close()
