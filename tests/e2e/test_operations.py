"""Operations: log queries and exports through cmcctl, retention at its boundary, and tenant purge."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import smtplib
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cmcd.admin.retention import run_retention
from cmcd.config import from_dict
from cmcd.store import AsyncStore, open_store
from tests.conftest import Cmcd, message
from tests.e2e.test_delivery import FAST, final, submit
from tests.peers import Sink, free_port

CMCCTL = [sys.executable, "-m", "cmcd.admin.cli"]


def cmcctl(d: Cmcd, *args: str, stdin: str | None = None) -> str:
    proc = subprocess.run(
        [*CMCCTL, "--socket", str(d.root / "admin.sock"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def delivered(make_cmcd: Any) -> Any:
    with Sink("127.0.0.2", free_port("127.0.0.2")) as sink:
        d = make_cmcd(
            {"server": {"timezone": "Asia/Tokyo"}, "delivery": FAST | {"routes": {"*": sink.address}}},
        )
        qids = [submit(d, [f"r{n}@dst{n % 2}.test"]) for n in range(4)]
        with d.smtp(login="bob") as c:
            c.sendmail("bob@beta.test", ["x@dst0.test"], message(sender="bob@beta.test", to="x@dst0.test"))
        with d.smtp(login=None) as c, pytest.raises(smtplib.SMTPAuthenticationError):
            c.login("alice", "wrong-password")
        d.wait_mail_log(lambda rows: final(rows, 5))
        yield d, qids


def test_log_mail_filters_and_formats(delivered: Any) -> None:
    d, qids = delivered
    rows = list(csv.DictReader(io.StringIO(cmcctl(d, "log", "mail", "--format", "csv"))))
    assert {r["event"] for r in rows} == {"accepted", "delivered"} and len(rows) == 10
    assert all(r["time"].endswith("+09:00") for r in rows)  # printed in server.timezone
    acme = list(csv.DictReader(io.StringIO(cmcctl(d, "log", "mail", "--tenant", "acme", "--format", "csv"))))
    assert len(acme) == 8 and {r["tenant"] for r in acme} == {"acme"}
    one = json.loads(cmcctl(d, "log", "mail", "--rcpt", "R1@dst1.test", "--format", "json"))
    assert [(r["rcpt"], r["event"]) for r in one] == [("r1@dst1.test", "accepted"), ("r1@dst1.test", "delivered")]
    by_sender = json.loads(cmcctl(d, "log", "mail", "--sender", "bob@beta.test", "--format", "json"))
    assert {r["tenant"] for r in by_sender} == {"beta"} and len(by_sender) == 2
    by_qid = json.loads(cmcctl(d, "log", "mail", "--queue-id", qids[2], "--status", "delivered", "--format", "json"))
    assert len(by_qid) == 1 and by_qid[0]["mx"] and by_qid[0]["attempt"] == 1
    assert json.loads(cmcctl(d, "log", "mail", "--since", "-1h", "--until", "-30m", "--format", "json")) == []
    future = json.loads(cmcctl(d, "log", "mail", "--since", "2999-01-01T00:00:00", "--format", "json"))
    assert future == []
    recent = json.loads(cmcctl(d, "log", "mail", "--since", "-10m", "--limit", "3", "--format", "json"))
    assert len(recent) == 3
    table = cmcctl(d, "log", "mail", "--status", "delivered")
    assert table.splitlines()[0].startswith("TIME") and len(table.splitlines()) == 6

    logins = list(csv.DictReader(io.StringIO(cmcctl(d, "log", "login", "--format", "csv"))))
    assert {(r["login"], r["result"]) for r in logins} >= {("alice", "ok"), ("bob", "ok"), ("alice", "fail")}
    failed = json.loads(cmcctl(d, "log", "login", "--status", "fail", "--format", "json"))
    assert {r["login"] for r in failed} == {"alice"}
    ops = json.loads(cmcctl(d, "log", "ops", "--tenant", "beta", "--format", "json"))
    assert {r["action"] for r in ops} == {"tenant.add", "domain.add", "user.add"} and all(
        r["tenant"] == "beta" for r in ops
    )

    bad = subprocess.run(
        [*CMCCTL, "--socket", str(d.root / "admin.sock"), "log", "mail", "--since", "yesterday"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "expected ISO 8601" in bad.stderr


def test_a_large_export_streams(make_cmcd: Any) -> None:
    d = make_cmcd()
    keys = d.keys()
    n = 30_000
    conn = sqlite3.connect(str(d.root / "cmcd.db"), timeout=30)
    with conn:
        conn.executemany(
            "INSERT INTO mail_log(ts, tenant_id, queue_id, event, sender_enc, sender_hmac, rcpt_enc, rcpt_hmac, "
            "rcpt_domain, status, response, event_key) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            [
                (time.time() - 3600 + i * 0.1, 1, f"Q{i:08d}", "delivered", keys.encrypt("alice@acme.test"),
                 keys.index("alice@acme.test"), keys.encrypt(f"r{i}@dst.test"), keys.index(f"r{i}@dst.test"),
                 "dst.test", "delivered", "250 ok", f"bulk:{i}")
                for i in range(n)
            ],
        )  # fmt: skip
    conn.close()
    proc = subprocess.Popen(
        [*CMCCTL, "--socket", str(d.root / "admin.sock"), "log", "mail", "--format", "csv"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    with proc.stdout:
        reader = csv.reader(proc.stdout)
        header = next(reader)
        count = sum(1 for _ in reader)
    assert proc.wait(60) == 0
    assert header[:4] == ["time", "tenant", "queue_id", "event"] and count == n


def test_retention_at_the_boundary(tmp_path: Path) -> None:
    store = open_store(tmp_path / "cmcd.db", tmp_path / "data.key")
    astore = AsyncStore(store)
    config = from_dict({"smtp": {"tls_cert": "c", "tls_key": "k"}})
    now = 2_000_000_000.0
    day = 86400.0
    keys = store.keys
    store.tenant_add("acme")
    store.conn.execute("DELETE FROM ops_log")
    enc, idx = keys.encrypt("a@acme.test"), keys.index("a@acme.test")
    for label, age in (("keep", 40 * day - 1), ("drop", 40 * day + 1)):
        store.conn.execute(
            "INSERT INTO mail_log(ts, tenant_id, queue_id, event, sender_enc, sender_hmac, rcpt_enc, rcpt_hmac, "
            "rcpt_domain, status, response) VALUES (?,1,?,?,?,?,?,?,'acme.test','delivered','')",
            (now - age, label, "delivered", enc, idx, enc, idx),
        )
    for label, age in (("keep", 1825 * day - 1), ("drop", 1825 * day + 1)):
        store.conn.execute(
            "INSERT INTO login_log(ts, login, client_ip, mechanism, result) VALUES (?,?,'127.0.0.1','PLAIN','ok')",
            (now - age, label),
        )
        store.conn.execute(
            "INSERT INTO ops_log(ts, actor, action, target, result) VALUES (?,'root','x',?,'ok')", (now - age, label)
        )
    removed = asyncio.run(run_retention(config, astore, now))
    assert removed == {"mail_log": 1, "message_tags": 0, "login_log": 1, "ops_log": 1, "blocks": 0}
    assert [r[0] for r in store.conn.execute("SELECT queue_id FROM mail_log")] == ["keep"]
    assert [r[0] for r in store.conn.execute("SELECT login FROM login_log")] == ["keep"]
    ops = store.conn.execute("SELECT target, action, detail FROM ops_log ORDER BY id").fetchall()
    assert ops == [
        ("keep", "x", ""),
        ("logs", "retention.run", "mail_log=1 message_tags=0 login_log=1 ops_log=1 blocks=0"),
    ]
    astore.close()


def test_tenant_purge_leaves_nothing_behind(make_cmcd: Any) -> None:
    d = make_cmcd()  # delivery off: beta's message stays queued until the purge
    d.admin("ipcred.add", tenant="beta", login="bob", cidr="192.0.2.0/24")
    d.admin("suppression.add", tenant="beta", address="blocked-person@dst.test")
    subject = "PURGE-SECRET-SUBJECT-7731"
    with d.smtp(login="bob") as c:
        c.sendmail("bob@beta.test", ["needle-person@dst.test"], message(sender="bob@beta.test", subject=subject))
    acme_qid = submit(d, ["kept@dst.test"])
    d.wait_mail_log(lambda rows: len(rows) == 2)
    # what beta's data looks like on disk (encrypted), to look for afterwards
    conn = sqlite3.connect(f"file:{d.root / 'cmcd.db'}?mode=ro", uri=True)
    blobs = [bytes(r[0]) for r in conn.execute("SELECT rcpt_enc FROM mail_log WHERE tenant_id = 2")]
    blobs += [bytes(r[0]) for r in conn.execute("SELECT address_enc FROM suppressions")]
    blobs += [bytes(r[0]) for r in conn.execute("SELECT private_enc FROM dkim_keys WHERE domain_id = 2")]
    conn.close()
    spool = Path(d.config["spool"]["dir"])
    for shard in d.shards():
        sconn = sqlite3.connect(f"file:{shard}?mode=ro", uri=True)
        blobs += [bytes(r[0]) for r in sconn.execute("SELECT body FROM messages WHERE tenant_id = 2")]
        sconn.close()
    assert len(blobs) >= 4

    session = d.smtp(login="bob")  # an open session of the tenant is closed by the purge
    out = cmcctl(d, "tenant", "delete", "beta", "--purge", "--yes")
    assert "purged tenant beta" in out and "messages=1" in out and "sessions=1" in out
    with pytest.raises((smtplib.SMTPServerDisconnected, smtplib.SMTPSenderRefused, OSError)):
        session.mail("bob@beta.test")
        session.rcpt("x@dst.test")
    d.admin("status")

    files = [p for p in d.root.iterdir() if p.name.startswith("cmcd.db")] + list(spool.iterdir())
    data = b"".join(p.read_bytes() for p in files if p.is_file())
    for needle in [b"beta.test", b"bob", b"192.0.2.0/24", subject.encode(), b"needle-person", b"blocked-person"]:
        assert needle not in data, needle
    for blob in blobs:
        assert blob[:48] not in data
    assert [t["name"] for t in d.admin("tenant.list")] == ["acme"]
    assert acme_qid in d.spooled()
    ops = [o for o in d.ops_log() if o["action"] == "tenant.purge"]
    assert len(ops) == 1 and ops[0]["target"] == "tenant #2" and "beta" not in json.dumps(ops[0])
    with pytest.raises(Exception, match="no tenant"):
        d.admin("tenant.show", name="beta")


def test_tenant_delete_asks_for_the_name_again(make_cmcd: Any) -> None:
    d = make_cmcd()
    base = [*CMCCTL, "--socket", str(d.root / "admin.sock"), "tenant", "delete", "beta"]
    refused = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "--purge" in refused.stderr
    wrong = subprocess.run([*base, "--purge"], input="betta\n", capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 1 and "nothing was deleted" in wrong.stderr
    assert "beta" in [t["name"] for t in d.admin("tenant.list")]
    right = subprocess.run([*base, "--purge"], input="beta\n", capture_output=True, text=True, timeout=60)
    assert right.returncode == 0, right.stderr
    assert [t["name"] for t in d.admin("tenant.list")] == ["acme"]
