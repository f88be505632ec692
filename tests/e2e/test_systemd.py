"""systemd integration: the notify protocol (READY, WATCHDOG, STOPPING), SIGHUP reload, the unit file."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import message
from tests.e2e.test_delivery import FAST
from tests.peers import Sink, free_port

ROOT = Path(__file__).resolve().parents[2]


def test_notify_protocol_ready_watchdog_stopping(make_cmcd: Any, tmp_path: Path, monkeypatch: Any) -> None:
    path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # WatchdogSec=0.2s: a ping every 0.1 s
    try:
        d = make_cmcd()
        seen: list[str] = []
        deadline = time.monotonic() + 10
        while seen.count("WATCHDOG=1") < 3 and time.monotonic() < deadline:
            seen.append(listener.recv(256).decode())
        assert seen[0] == "READY=1" and seen.count("WATCHDOG=1") >= 3
        d.stop()
        rest = []
        listener.settimeout(2)
        try:
            while True:
                rest.append(listener.recv(256).decode())
        except TimeoutError:
            pass
        assert "STOPPING=1" in rest
    finally:
        listener.close()


def test_sighup_reloads_a_route_and_a_limit_without_dropping_sessions(make_cmcd: Any) -> None:
    with Sink("127.0.0.2", free_port("127.0.0.2")) as first, Sink("127.0.0.3", free_port("127.0.0.3")) as second:
        d = make_cmcd({"smtp": {"max_recipients": 2}, "delivery": FAST | {"routes": {"*": first.address}}})
        session = d.smtp()
        try:
            session.mail("alice@acme.test")
            assert session.rcpt("a@dst.test")[0] == 250 and session.rcpt("b@dst.test")[0] == 250
            assert session.rcpt("c@dst.test")[0] == 452  # the limit of 2
            session.rset()
            d.config["smtp"]["max_recipients"] = 3
            d.config["delivery"]["routes"] = {"*": second.address}
            d.config["smtp"]["listen"] = ["127.0.0.1:1"]  # cannot change live: named in the log
            d.write_config()
            assert d.proc is not None
            d.proc.send_signal(signal.SIGHUP)
            d.wait_log("event=reloaded")
            assert "smtp.listen" in d.wait_log("event=reload_needs_restart")
            # the session opened before the reload goes on, under the new limit and route
            session.sendmail("alice@acme.test", ["a@dst.test", "b@dst.test", "c@dst.test"], message())
        finally:
            session.quit()
        got = second.wait_for(1)
        assert got[0].rcpt_tos == ["a@dst.test", "b@dst.test", "c@dst.test"] and first.messages == []
        d.config["smtp"]["max_recipients"] = "lots"  # a broken file is refused, the running config stays
        d.write_config()
        d.proc.send_signal(signal.SIGHUP)
        d.wait_log("event=reload_failed")
        assert d.admin("status")["pid"] == d.proc.pid


def test_unit_file_verifies() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = ROOT / "systemd" / "cmcd.service"
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify also complains about the ExecStart binary not existing on a machine where cmcd is not installed
    problems = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if line.strip() and "/usr/bin/cmcd" not in line and "is not executable" not in line
    ]
    assert problems == [], problems
