"""Records under faults, with the real daemon: login rows kept across a full store disk (through the
spool's outbox), and kill -9 during retention and during a tenant purge leaving nothing half-done."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PASSWORD, AdminError, Cmcd, message
from tests.e2e.test_metrics import scrape, scrape_until
from tests.peers import free_port

DAY_S = 86400.0
#: tables that name a tenant; rows of a purged tenant must be in none of them
TENANT_TABLES = ("users", "ip_credentials", "domains", "suppressions", "mail_log", "login_log", "ops_log",
                 "api_keys", "otp", "api_sessions", "webhooks", "message_tags")  # fmt: skip


def _wait(cond: Callable[[], Any], what: str, d: Cmcd, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"never happened: {what}; last lines:\n" + "\n".join(d.log[-20:]))


@contextmanager
def _ro(path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        yield conn
    finally:
        conn.close()


def _count(path: Path, sql: str, args: tuple[Any, ...] = ()) -> int:
    with _ro(path) as conn:
        return int(conn.execute(sql, args).fetchone()[0])


def _send_admin(d: Cmcd, verb: str, **args: Any) -> socket.socket:
    """Send one admin request and return without waiting for its answer (the daemon is killed meanwhile)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(d.root / "admin.sock"))
    s.sendall(json.dumps({"verb": verb, "args": args}).encode() + b"\n")
    return s


def _auth_plain(d: Cmcd, login: str, password: str) -> int:
    with d.smtp(login=None) as c:
        code, _ = c.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0{login}\0{password}".encode()).decode())
    return code


# -- login rows across a full store disk --------------------------------------------------------


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mount") is None,
    reason="needs root to mount a small tmpfs for the store (CI runs the e2e tests as root)",
)
def test_login_rows_are_kept_across_a_full_store_disk(make_cmcd: Any, tmp_path: Path) -> None:
    """The store on a 4 MB tmpfs, filled from elsewhere; 20 SMTP logins (good and bad) while it is
    full. The rows the store cannot take wait in the spool's outbox (on another disk), the backlog
    shows in cmcd_outbox_backlog; once space returns every row is in the store, each once."""
    small = tmp_path / "smallstore"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True)
    try:
        port = free_port()
        db = small / "cmcd.db"
        d = make_cmcd(
            {"store": {"path": str(db)}, "metrics": {"listen": f"127.0.0.1:{port}"}, "smtp": {"auth_fail_limit": 1000}}
        )
        assert _auth_plain(d, "alice", PASSWORD) == 235  # the password's hash is cached before the disk fills
        _wait(lambda: _count(db, "SELECT COUNT(*) FROM login_log") == 1, "the first login row", d)

        filler = small / "filler"
        # the store's disk fills up from elsewhere (unbuffered: no bytes left over for close to fail on)
        with open(filler, "wb", buffering=0) as f:
            try:
                while f.write(b"\0" * 65536):
                    pass
            except OSError:
                pass
        expected = {"ok": 0, "fail": 0}
        for i in range(20):
            good = i % 2 == 0
            code = _auth_plain(d, "alice" if i % 4 else "nobody", PASSWORD if good else "wrong-password")
            ok = good and i % 4 != 0
            assert code == (235 if ok else 535), (i, code)
            expected["ok" if ok else "fail"] += 1
        # each of the 20 rows is in the store or in the outbox (the metric is refreshed once a second)
        kept_while_full = backlog = 0

        def accounted() -> bool:
            nonlocal kept_while_full, backlog
            kept_while_full = _count(db, "SELECT COUNT(*) FROM login_log") - 1
            backlog = int(scrape(port).value("cmcd_outbox_backlog", kind="login"))
            return kept_while_full + backlog == 20

        _wait(accounted, "every login row in the store or the outbox", d)
        assert backlog > 0, "no login row went to the outbox: the store's disk was not full"

        filler.unlink()  # space returns: the outbox is shipped without anyone asking
        _wait(lambda: _count(db, "SELECT COUNT(*) FROM login_log") >= 21, "all login rows in the store", d)
        with _ro(db) as conn:
            rows = conn.execute("SELECT event_key, result FROM login_log WHERE id > 1").fetchall()
        assert len(rows) == 20 and len({k for k, _ in rows}) == 20  # every row, none twice
        assert {r: sum(1 for _, x in rows if x == r) for r in ("ok", "fail")} == expected
        assert (
            scrape_until(port, lambda s: s.value("cmcd_outbox_backlog", kind="login") == 0).value(
                "cmcd_outbox_backlog", kind="login"
            )
            == 0
        )
        print(f"\nlogins while the store's disk was full: 20; written at once: {kept_while_full}; "
              f"through the outbox: {backlog}; in the store after: {len(rows)}")  # fmt: skip
        d.stop()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


# -- kill -9 during retention -------------------------------------------------------------------


def _fill_logs(db: Path, tenant_id: int, rows: list[tuple[float, int]], table: str = "mail_log") -> None:
    """Bulk rows (ts, count) straight into the store file, beside the running daemon (WAL)."""
    conn = sqlite3.connect(str(db), timeout=30)
    try:
        with conn:
            for ts, n in rows:
                if table == "mail_log":
                    conn.executemany(
                        "INSERT INTO mail_log(ts, tenant_id, queue_id, event, rcpt_domain, status, response) "
                        "VALUES (?,?,?,'delivered','dst.test','sent','250 2.0.0 ok')",
                        ((ts - i * 1e-3, tenant_id, f"BULK{tenant_id}x{ts:.0f}x{i}") for i in range(n)),
                    )
                else:
                    conn.executemany(
                        "INSERT INTO login_log(ts, tenant_id, login, client_ip, mechanism, result) "
                        "VALUES (?,?,'bulk','192.0.2.1','PLAIN','ok')",
                        ((ts - i * 1e-3, tenant_id) for i in range(n)),
                    )
    finally:
        conn.close()


def _integrity(db: Path) -> None:
    with _ro(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def test_kill_9_during_retention_then_the_next_run_finishes(make_cmcd: Any) -> None:
    d = make_cmcd()
    db = d.root / "cmcd.db"
    now = time.time()
    expired, within = 300_000, 2_000
    _fill_logs(db, 1, [(now - 41 * DAY_S, expired), (now - 39 * DAY_S, within)])
    _fill_logs(db, 1, [(now - 1830 * DAY_S, 20_000), (now - 1800 * DAY_S, 500)], table="login_log")
    cutoff = now - 40 * DAY_S
    old = "SELECT COUNT(*) FROM mail_log WHERE ts < ?"

    s = _send_admin(d, "retention.run")
    d.wait_log("event=retention_started")
    _wait(lambda: _count(db, old, (cutoff,)) < expired, "retention's first batch committed", d)
    d.kill9()
    s.close()
    assert not any("event=retention_done" in line for line in d.log)  # killed in the middle of it
    left = _count(db, old, (cutoff,))
    assert 0 < left < expired, left
    _integrity(db)
    assert _count(db, "SELECT COUNT(*) FROM mail_log WHERE ts >= ?", (cutoff,)) == within
    # whole batches of the oldest rows went: no row left is older than one that was deleted
    assert _count(db, "SELECT COUNT(*) FROM mail_log WHERE ts < ? AND ts > ?", (cutoff, now - 41 * DAY_S)) == 0

    d.start()
    removed = d.admin("retention.run")
    assert removed["mail_log"] == left and removed["login_log"] == 20_000
    assert _count(db, old, (cutoff,)) == 0
    assert _count(db, "SELECT COUNT(*) FROM mail_log WHERE ts >= ?", (cutoff,)) == within
    assert _count(db, "SELECT COUNT(*) FROM login_log WHERE login = 'bulk'") == 500
    runs = [o for o in d.ops_log() if o["action"] == "retention.run"]
    assert len(runs) == 1 and f"mail_log={left} " in runs[0]["detail"]
    _integrity(db)
    print(f"\nretention killed with {left} of {expired} expired rows left; the next run removed them")


# -- kill -9 during a tenant purge --------------------------------------------------------------


def _tenant_rows(db: Path, tenant_id: int) -> dict[str, int]:
    with _ro(db) as conn:
        out = {t: conn.execute(f"SELECT COUNT(*) FROM {t} WHERE tenant_id = ?", (tenant_id,)).fetchone()[0]
               for t in TENANT_TABLES}  # fmt: skip
        out["tenants"] = conn.execute("SELECT COUNT(*) FROM tenants WHERE id = ?", (tenant_id,)).fetchone()[0]
        out["dkim_keys"] = conn.execute(
            "SELECT COUNT(*) FROM dkim_keys WHERE domain_id IN (SELECT id FROM domains WHERE tenant_id = ?)",
            (tenant_id,),
        ).fetchone()[0]
    return out


def _orphans(db: Path) -> dict[str, int]:
    """Rows naming a tenant (or domain) that does not exist."""
    with _ro(db) as conn:
        out = {t: conn.execute(
            f"SELECT COUNT(*) FROM {t} WHERE tenant_id IS NOT NULL AND tenant_id NOT IN (SELECT id FROM tenants)"
        ).fetchone()[0] for t in TENANT_TABLES}  # fmt: skip
        out["dkim_keys"] = conn.execute(
            "SELECT COUNT(*) FROM dkim_keys WHERE domain_id NOT IN (SELECT id FROM domains)"
        ).fetchone()[0]
    return {t: n for t, n in out.items() if n}


def _meta(db: Path) -> list[str]:
    with _ro(db) as conn:
        return [r[0] for r in conn.execute("SELECT key FROM meta WHERE key LIKE 'purge:%' OR key = 'erase_pending'")]


def test_kill_9_during_tenant_purge_then_the_purge_is_finished(make_cmcd: Any) -> None:
    d = make_cmcd()  # delivery off: each tenant's message stays queued
    db = d.root / "cmcd.db"
    d.admin("suppression.add", tenant="beta", address="blocked@dst.test")
    with d.smtp(login="bob") as c:
        c.sendmail("bob@beta.test", ["x@dst.test"], message(sender="bob@beta.test"))
    with d.smtp() as c:
        c.sendmail("alice@acme.test", ["y@dst.test"], message())
    d.wait_mail_log(lambda rows: len(rows) == 2)
    _fill_logs(db, 2, [(time.time() - DAY_S, 300_000)])
    _fill_logs(db, 2, [(time.time() - DAY_S, 20_000)], table="login_log")
    _fill_logs(db, 1, [(time.time() - DAY_S, 1_000)])
    before = _tenant_rows(db, 2)
    acme_before = _tenant_rows(db, 1)
    assert before["users"] == 1 and before["mail_log"] == 300_001 and before["dkim_keys"] >= 1

    s = _send_admin(d, "tenant.delete", name="beta", purge=True)
    d.wait_log("event=tenant_purge_queue_done")  # the queue is done; the store's transaction is running
    d.kill9()
    s.close()
    assert not any("event=tenant_purge_store_done" in line for line in d.log)  # killed in the middle of it
    after_kill = _tenant_rows(db, 2)
    _integrity(db)
    # the store's part is one transaction: the tenant is there whole, marked as being purged
    assert after_kill == before, after_kill
    assert _meta(db) == ["purge:2"]
    assert _orphans(db) == {}

    d.start()  # the purge begun is finished by the start
    d.wait_log("event=tenant_purge_done tenant_id=2", timeout=30)
    gone = _tenant_rows(db, 2)
    assert set(gone.values()) == {0}, gone
    assert _orphans(db) == {}
    assert _meta(db) == []
    assert _tenant_rows(db, 1) == acme_before  # the other tenant untouched
    assert {m["sender"] for m in d.spooled().values()} == {"alice@acme.test"}
    purges = [o for o in d.ops_log() if o["action"] == "tenant.purge"]
    assert len(purges) == 1 and "resumed" in purges[0]["detail"] and "mail_log=300001" in purges[0]["detail"]
    with pytest.raises(AdminError, match="no tenant"):  # run again: nothing left to do
        d.admin("tenant.delete", name="beta", purge=True)
    _integrity(db)
    with d.smtp() as c:  # the daemon goes on as usual for the other tenant
        c.sendmail("alice@acme.test", ["z@dst.test"], message())
