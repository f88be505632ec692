"""cmcd.devsink, the development capture server, run as `make run` runs it: a subprocess."""

from __future__ import annotations

import queue
import re
import signal
import smtplib
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cmcd.devsink import parse_listen

ROOT = Path(__file__).resolve().parents[2]
BODY = (
    b"From: <alice@acme.test>\r\nTo: <bob@dst.test>\r\nSubject: caf\xc3\xa9\r\n\r\n"
    b".starts with a dot\r\n..two dots\r\n\xff 8-bit byte\r\n\r\nlast line\r\n"
)


class DevSink:
    def __init__(self, outbox: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cmcd.devsink", "--listen", "127.0.0.1:0", "--dir", str(outbox)],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()
        line = self.expect(r"listening on 127\.0\.0\.1:\d+")
        self.port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))  # type: ignore[union-attr]

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))
        self.proc.stderr.close()

    def expect(self, pattern: str, timeout: float = 10) -> str:
        seen = []
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"devsink logged nothing matching {pattern!r}; it logged {seen}") from None
            seen.append(line)
            if re.search(pattern, line):
                return line

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.reader.join(5)


@pytest.fixture
def devsink(tmp_path: Path) -> Iterator[DevSink]:
    sink = DevSink(tmp_path / "outbox")
    yield sink
    sink.stop()


def test_saves_each_message_with_its_envelope(devsink: DevSink, tmp_path: Path) -> None:
    with smtplib.SMTP("127.0.0.1", devsink.port, local_hostname="client.test", timeout=10) as client:
        client.sendmail("alice@acme.test", ["bob@dst.test", "carol@dst.test"], BODY)
        client.sendmail("", ["postmaster@dst.test"], b"Subject: second\r\n\r\nx\r\n")
    first = devsink.expect(rf"saved .*from=<alice@acme\.test> to=<bob@dst\.test>,<carol@dst\.test> size={len(BODY)}")
    devsink.expect(r"saved .*from=<> to=<postmaster@dst\.test>")
    files = sorted((tmp_path / "outbox").iterdir())
    assert [f.suffix for f in files] == [".eml", ".eml"]  # no temporary file left behind
    assert re.fullmatch(r"\d{8}T\d{6}\.\d{6}Z-1\.eml", files[0].name) and files[0].name in first
    assert files[0].read_bytes() == (
        b"X-Cmcd-Envelope-From: <alice@acme.test>\r\n"
        b"X-Cmcd-Envelope-To: <bob@dst.test>\r\n"
        b"X-Cmcd-Envelope-To: <carol@dst.test>\r\n" + BODY
    )
    assert (
        files[1].read_bytes().startswith(b"X-Cmcd-Envelope-From: <>\r\nX-Cmcd-Envelope-To: <postmaster@dst.test>\r\n")
    )
    assert devsink.stop() == 0


@pytest.mark.parametrize("listen", ["0.0.0.0:2526", "10.1.2.3:2526", "[::]:2526", "example.com:2526"])
def test_refuses_to_listen_beyond_loopback(listen: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cmcd.devsink", "--listen", listen, "--dir", str(tmp_path / "outbox")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "loopback" in result.stderr
    assert not (tmp_path / "outbox").exists()


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:2526") == ("127.0.0.1", 2526)
    assert parse_listen("127.0.0.5:25") == ("127.0.0.5", 25)
    assert parse_listen("[::1]:2526") == ("::1", 2526)
    assert parse_listen("localhost:2526") == ("127.0.0.1", 2526)
    for bad in ("2526", "127.0.0.1", "127.0.0.1:x", "127.0.0.1:70000", "192.168.1.1:25"):
        with pytest.raises(ValueError):
            parse_listen(bad)
