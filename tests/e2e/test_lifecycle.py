"""Daemon life cycle and faults: graceful SIGTERM, auth throttling, connection limits, a full disk."""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import socket
import sqlite3
import subprocess
import time

import pytest

from tests.conftest import PASSWORD, message, queue_id, wait_until
from tests.e2e.test_delivery import outbox_events


def test_sigterm_lets_an_open_transaction_finish_then_exits_zero(make_cmcd) -> None:  # type: ignore[no-untyped-def]
    d = make_cmcd({"server": {"shutdown_grace": "10s"}})
    c = d.smtp()
    c.mail("alice@acme.test")
    c.rcpt("rcpt@dst.test")
    c.putcmd("data")
    assert c.getreply()[0] == 354
    c.send(message()[:20])  # mid-DATA when the signal arrives
    d.proc.send_signal(15)
    d.wait_log("event=stopping")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", d.smtp_port), timeout=2).close()  # no longer accepting
    c.send(message()[20:] + b".\r\n")
    code, text = c.getreply()
    assert code == 250
    qid = queue_id(text)
    assert d.proc.wait(15) == 0
    assert qid in d.spooled()
    c.close()


def test_sigterm_closes_idle_sessions_with_421(make_cmcd) -> None:  # type: ignore[no-untyped-def]
    d = make_cmcd()
    c = d.smtp()
    d.proc.send_signal(15)
    code, text = c.getreply()
    assert code == 421 and text.startswith(b"4.3.2")
    assert d.proc.wait(15) == 0
    c.close()


def test_repeated_auth_failures_from_one_ip_are_throttled(make_cmcd) -> None:  # type: ignore[no-untyped-def]
    d = make_cmcd({"smtp": {"auth_fail_limit": 3, "auth_fail_window": "60s"}})
    for _ in range(3):
        with d.smtp(login=None) as c:
            code, text = c.docmd("AUTH", "PLAIN AGFsaWNlAHdyb25n")  # \0alice\0wrong
            assert (code, text[:5]) == (535, b"5.7.8")
    c = d.smtp(login=None)
    code, text = c.docmd("AUTH", "PLAIN AGFsaWNlAHdyb25n")
    assert code == 421 and text.startswith(b"4.7.0")
    with pytest.raises(smtplib.SMTPServerDisconnected):
        c.noop()
    c.close()
    # the right password is refused too while the address is throttled: no guessing continues
    c = d.smtp(login=None)
    with pytest.raises(smtplib.SMTPException):
        c.login("alice", PASSWORD)
    c.close()
    d.stop()
    conn = sqlite3.connect(str(d.root / "cmcd.db"))
    rows = conn.execute("SELECT result, COUNT(*) FROM login_log GROUP BY result").fetchall()
    conn.close()
    assert dict(rows).get("fail") == 3 and dict(rows).get("throttled", 0) >= 1


def test_connections_past_the_per_ip_limit_get_421(make_cmcd) -> None:  # type: ignore[no-untyped-def]
    # one process: with workers each holds a share of the cap (1 of 2 here) and the kernel picks the
    # worker; test_hostile.py tests the host's caps with workers
    d = make_cmcd({"server": {"workers": 1}, "smtp": {"max_connections_per_ip": 2}})
    held = [socket.create_connection(("127.0.0.1", d.smtp_port)) for _ in range(2)]
    try:
        for s in held:
            assert s.recv(100).startswith(b"220 ")
        extra = socket.create_connection(("127.0.0.1", d.smtp_port))
        assert extra.recv(100).startswith(b"421 4.7.0")
        extra.close()
    finally:
        for s in held:
            s.close()
    wait_until(lambda: d.admin("status")["sessions"] == 0, "cmcd saw the held connections close")
    with d.smtp() as c:  # slots come back when connections close
        assert c.noop()[0] == 250


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root to mount a small tmpfs")
def test_full_disk_refuses_then_recovers_when_space_returns(make_cmcd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The spool on a 2 MB tmpfs. Filled from elsewhere: MAIL gets 452 4.3.1 (below
    spool.min_free). A message that does not fit: 451 4.3.0, nothing half-written; declared with
    SIZE=: 452 4.3.1 up front. When space returns (the file removed, the file system grown) the
    same session accepts mail again, the WAL's leftover from the failed write is given back, and
    everything accepted is in the spool byte for byte."""
    spool = tmp_path / "smallspool"
    spool.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(spool)], check=True)
    try:
        d = make_cmcd({"spool": {"dir": str(spool), "min_free": "256KB"}})
        big = message(subject="big", body="z" * 2_500_000)
        with d.smtp() as c:
            c.mail("alice@acme.test")
            c.rcpt("rcpt@dst.test")
            first = queue_id(c.data(message(subject="first", body="small")))
            wal = d.shard_file(first).with_suffix(".db-wal")  # of the shard of this session's worker

            filler = spool / "filler"
            with open(filler, "wb", buffering=0) as f:  # the disk fills up from elsewhere (unbuffered:
                try:  # a buffered file would raise ENOSPC again when closed)
                    while True:
                        f.write(b"\0" * 65536)
                except OSError:
                    pass
            time.sleep(1.1)  # free space is read at most once a second
            code, text = c.mail("alice@acme.test")
            assert (code, text[:5]) == (452, b"4.3.1"), text
            assert b"disk" in text

            filler.unlink()
            time.sleep(1.1)  # the clock is the subject: free space is read at most once a second
            assert c.mail("alice@acme.test")[0] == 250  # no SIZE=: the write itself runs out of space
            assert c.rcpt("rcpt@dst.test")[0] == 250
            code, text = c.data(big)
            assert (code, text[:5]) == (451, b"4.3.0")
            assert c.noop()[0] == 250
            time.sleep(1.1)  # the clock is the subject: free space is read at most once a second
            code, text = c.mail("alice@acme.test", [f"SIZE={len(big)}"])  # declared: refused up front
            assert (code, text[:5]) == (452, b"4.3.1"), text
            c.rset()

            subprocess.run(["mount", "-o", "remount,size=16m", str(spool)], check=True)
            time.sleep(1.1)  # the clock is the subject: free space is read at most once a second
            assert c.mail("alice@acme.test")[0] == 250
            assert c.rcpt("rcpt@dst.test")[0] == 250
            second = queue_id(c.data(message(subject="second", body="after")))
            assert wal.stat().st_size < 256 * 1024  # the failed write's 2 MB are given back
            assert c.mail("alice@acme.test", [f"SIZE={len(big)}"])[0] == 250
            assert c.rcpt("rcpt@dst.test")[0] == 250
            third = queue_id(c.data(big))

        spooled = d.spooled()
        assert sorted(spooled) == sorted([first, second, third])
        assert spooled[third]["body"].partition(b"\r\n\r\n")[2] == big.partition(b"\r\n\r\n")[2]
        assert spooled[second]["body"].endswith(b"\r\n\r\nafter\r\n")
        counted = 0
        for shard in d.shards():
            conn = sqlite3.connect(f"file:{shard}?mode=ro", uri=True)
            counted += conn.execute("SELECT COUNT(*) FROM recipients").fetchone()[0]
            conn.close()
        assert counted == 3
        d.stop()
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)


def test_restart_returns_inflight_rows_to_queued(make_cmcd) -> None:  # type: ignore[no-untyped-def]
    d = make_cmcd()
    with d.smtp() as c:
        c.mail("alice@acme.test")
        c.rcpt("rcpt@dst.test")
        qid = queue_id(c.data(message()))
    d.stop()
    conn = sqlite3.connect(str(d.shard_file(qid)))
    with conn:
        conn.execute("UPDATE recipients SET state = 'inflight' WHERE queue_id = ?", (qid,))
    conn.close()
    mark = len(d.log)
    d.start()  # ready once every worker has recovered its shard: each logged how many rows it requeued
    counts = re.findall(r"event=spool_recovered inflight_requeued=(\d+)", "\n".join(d.log[mark:]))
    assert len(counts) == len(d.shards())
    assert sorted(counts) == ["0"] * (len(counts) - 1) + ["1"]  # the row in its shard; none in another
    assert d.spooled()[qid]["recipients"] == [("rcpt@dst.test", "queued")]


def test_accepted_event_survives_kill_right_after_250(make_cmcd) -> None:  # type: ignore[no-untyped-def]
    d = make_cmcd()
    c = d.smtp()
    c.mail("alice@acme.test")
    c.rcpt("one@dst.test")
    c.rcpt("two@dst.test")
    qid = queue_id(c.data(message()))
    d.kill9()  # before any background work could run
    c.close()  # no QUIT: a worker may say 421 (it saw the supervisor go) before the kernel ends it too
    d.start()
    keys = d.keys()

    def rows() -> list[tuple[str, str, str]]:
        conn = sqlite3.connect(f"file:{d.root / 'cmcd.db'}?mode=ro", uri=True)
        try:
            found = conn.execute("SELECT queue_id, event, rcpt_enc FROM mail_log WHERE queue_id = ?", (qid,))
            return sorted((q, e, keys.decrypt(r)) for q, e, r in found)
        finally:
            conn.close()

    deadline = time.monotonic() + 10
    while not rows() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rows() == [(qid, "accepted", "one@dst.test"), (qid, "accepted", "two@dst.test")]
    d.stop()
    d.start()  # shipping again after a restart never doubles a row
    # a double could only come from the spool's outbox: once it is empty, all of it was shipped
    wait_until(lambda: outbox_events(d, qid) == [], "the spool's outbox drained after the restart")
    assert len(rows()) == 2


def test_half_closed_client_still_gets_its_reply(make_cmcd) -> None:  # type: ignore[no-untyped-def]
    d = make_cmcd()
    d.admin("ipcred.add", tenant="acme", login="alice", cidr="127.0.0.1/32")
    s = socket.create_connection(("127.0.0.1", d.smtp_port), timeout=10)
    f = s.makefile("rb")
    f.readline()
    s.sendall(b"HELO half.test\r\nMAIL FROM:<alice@acme.test>\r\nRCPT TO:<r@dst.test>\r\nDATA\r\n")
    assert [f.readline()[:3] for _ in range(4)] == [b"250", b"250", b"250", b"354"]
    s.sendall(message() + b".\r\nQUIT\r\n")
    s.shutdown(socket.SHUT_WR)
    reply = f.readline()
    assert reply.startswith(b"250 2.0.0 Ok: queued as "), reply
    assert queue_id(reply) in d.spooled()
    s.close()


def test_auth_during_a_transaction_is_refused(make_cmcd) -> None:  # type: ignore[no-untyped-def]
    d = make_cmcd()
    d.admin("ipcred.add", tenant="acme", login="alice", cidr="127.0.0.1/32")
    with d.smtp(login=None) as c:
        assert c.mail("alice@acme.test")[0] == 250
        code, text = c.docmd("AUTH", "PLAIN AGJvYgBjb3JyZWN0IGhvcnNlIGJhdHRlcnk=")  # bob of tenant beta
        assert (code, text[:5]) == (503, b"5.5.1")


def test_idle_commands_cannot_hold_a_session_forever(cmcd_noop) -> None:  # type: ignore[no-untyped-def]
    with cmcd_noop.smtp() as c:
        for _ in range(100):
            assert c.noop()[0] == 250
        code, text = c.noop()
        assert (code, text[:5]) == (421, b"4.7.0")


@pytest.fixture
def cmcd_noop(make_cmcd):  # type: ignore[no-untyped-def]
    return make_cmcd()


def test_data_beyond_the_in_flight_budget_gets_452(make_cmcd) -> None:  # type: ignore[no-untyped-def]
    d = make_cmcd({"smtp": {"max_data_in_flight": "64KB"}})
    with d.smtp() as c:
        c.mail("alice@acme.test")
        c.rcpt("rcpt@dst.test")
        code, text = c.data(message(body="b" * 200_000))
        assert (code, text[:5]) == (452, b"4.3.1")
        c.mail("alice@acme.test")  # the budget is given back: a small message goes through
        c.rcpt("rcpt@dst.test")
        assert c.data(message())[0] == 250
    assert d.admin("status")["sessions"] >= 0
    assert len(d.spooled()) == 1
