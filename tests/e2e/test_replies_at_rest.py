"""Remote replies at rest (issue 21 item 3): a reply that echoes the address is encrypted wherever it is kept.

A real daemon delivers to a sink that refuses the recipient with `550 5.1.1 <address>: Recipient
address rejected`; the bounce report it queues to the sender is kept deferred by the sender's MX; a
webhook receives the bounce; a backup is taken. Then every file under the data directory (store,
spool, their WAL and SHM files, backups) and the daemon's log are searched for the address, in
plaintext, lower or upper case, UTF-8 or UTF-16: it is in none, while `cmcctl log mail` (the real
cmcctl, a subprocess), `cmcctl suppression list` and the API still show the reply whole. Stores and
spools written before replies were encrypted are sealed when opened, with nothing of the old
plaintext left in the file or its WAL.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cmcd.crypto import generate_key_file, read_key_file, redact_addresses
from cmcd.queue.spool import Spool
from cmcd.store import open_store
from cmcd.store.schema import MIGRATIONS
from tests.conftest import PASSWORD, Cmcd, message
from tests.e2e.test_webhooks import Receiver
from tests.peers import DnsServer, Sink, free_port

ADDRESS = "user@example.net"
REPLY = f"550 5.1.1 <{ADDRESS}>: Recipient address rejected"


def needles(address: str) -> list[bytes]:
    """The address as it could sit in a file: UTF-8 (searched case-insensitively) and UTF-16."""
    return [address.lower().encode(), address.encode("utf-16-le"), address.encode("utf-16-be")]


def occurrences(data: bytes, address: str) -> int:
    lowered = data.lower()
    return sum(lowered.count(n.lower()) if n.isascii() else data.count(n) for n in needles(address))


def plaintext_in(root: Path, address: str) -> dict[str, int]:
    """File (relative to ROOT) -> occurrences of ADDRESS, for every file under ROOT that has one."""
    found: dict[str, int] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_socket():
            n = occurrences(path.read_bytes(), address)
            if n:
                found[str(path.relative_to(root))] = n
    return found


def cmcctl(d: Cmcd, *args: str) -> str:
    """The real cmcctl, as an operator runs it: a process of its own talking to the admin socket."""
    run = subprocess.run(
        [sys.executable, "-m", "cmcd.admin.cli", "--socket", str(d.root / "admin.sock"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


def echo(code: str, text: str) -> Any:
    """A sink's RCPT reply that echoes the recipient, as real MTAs do."""
    return lambda address: f"{code} <{address}>: {text}"


@pytest.fixture
def world(tmp_path: Path, ca: Any) -> Iterator[tuple[Cmcd, Receiver]]:
    """A daemon under tmp_path/data (backups there too) with a webhook receiver. Every MX echoes the
    recipient: example.net's refuses (550), acme.test's (alice's, where her bounce report goes)
    defers (451), so the report stays queued; beta.test's (bob's) refuses, so bob's bounce report
    bounces too, which cmcd drops and logs with the reply."""
    port = free_port("127.0.0.1")
    dns = DnsServer().start()
    sinks = []
    for n, (domain, reply) in enumerate(
        (
            ("example.net", echo("550 5.1.1", "Recipient address rejected")),
            ("acme.test", echo("451 4.2.1", "mailbox busy, try again later")),
            ("beta.test", echo("550 5.1.1", "Recipient address rejected")),
        ),  # fmt: skip
        start=2,
    ):
        dns.add(domain, "MX", f"10 mx.{domain}.")
        dns.add(f"mx.{domain}", "A", f"127.0.0.{n}")
        sinks.append(Sink(f"127.0.0.{n}", port, rcpt_reply=reply).start())
    receiver = Receiver()
    root = tmp_path / "data"
    d = Cmcd(
        root,
        ca,
        {
            "api": {"listen": "127.0.0.1:0", "webhook_allow_private": True, "webhook_timeout": "3s"},
            "dns": {"nameservers": [dns.address], "timeout": "2s"},
            "delivery": {"enabled": True, "routes": {}, "port": port, "retry_schedule": ["1h"], "retry_jitter": 0.0},
            "backup": {"dir": str(root / "backups"), "key_file": str(root / "backup.key")},
        },
    )
    d.start().provision()
    try:
        yield d, receiver
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
        receiver.stop()
        for sink in sinks:
            sink.stop()
        dns.stop()


def test_a_bounce_that_echoes_the_address_leaves_no_plaintext(world: tuple[Cmcd, Receiver]) -> None:
    d, receiver = world
    d.admin("webhook.add", tenant="acme", url=receiver.url("/acme"), events="bounced")
    for login, sender in (("alice", "alice@acme.test"), ("bob", "bob@beta.test")):
        with d.smtp(login=login) as c:
            c.sendmail(sender, [ADDRESS], message(sender, ADDRESS))
    rows = d.wait_mail_log(
        lambda rows: (
            sum(r["event"] == "bounced" and r["rcpt"] == ADDRESS for r in rows) == 2
            # alice's bounce report deferred (it stays queued), bob's bounced (dropped, and logged)
            and any(r["event"] == "deferred" and r["rcpt"] == "alice@acme.test" for r in rows)
            and any(r["event"] == "bounced" and r["rcpt"] == "bob@beta.test" for r in rows)
        )
    )
    assert {r["response"] for r in rows if r["event"] == "bounced" and r["rcpt"] == ADDRESS} == {REPLY}
    d.wait_log("event=bounce_dropped")
    (report,) = d.admin("queue.list")["items"]
    assert report["sender"] == "" and report["states"] == ["deferred"]
    posted = receiver.wait(lambda rs: any(e["event"] == "bounced" for r in rs for e in r.events), "/acme")
    assert [e["response"] for r in posted for e in r.events if e["event"] == "bounced"] == [REPLY]
    d.admin("backup.now")
    assert len(list((d.root / "backups").glob("cmcd-store-*.bak"))) == 1

    # the tenant and the operator read the reply whole: cmcctl, the API, the queue
    logged = json.loads(cmcctl(d, "log", "mail", "--tenant", "acme", "--rcpt", ADDRESS, "--format", "json"))
    assert [r["response"] for r in logged if r["event"] == "bounced"] == [REPLY]
    assert REPLY in cmcctl(d, "log", "mail", "--tenant", "acme")
    assert REPLY in cmcctl(d, "suppression", "list", "acme")
    shown = d.admin("queue.show", queue_id=report["queue_id"])["recipients"]
    assert [r["last_response"] for r in shown] == ["451 4.2.1 <alice@acme.test>: mailbox busy, try again later"]
    d.admin("user.add", tenant="acme", login="acme-admin", role="admin", password=PASSWORD)
    token = d.admin("apikey.add", tenant="acme", login="acme-admin", role="viewer")["token"]
    status, _, page = d.http("GET", "/v1/bounces", token=token)
    assert status == 200 and [r["response"] for r in page["data"] if r["recipient"] == ADDRESS] == [REPLY]
    status, _, blocks = d.http("GET", "/v1/blocks", token=token)
    assert status == 200 and [(b["address"], b["reason"]) for b in blocks["data"]] == [(ADDRESS, REPLY)]

    # ... and no address a reply echoed is at rest in plaintext: store, spool, their WAL and SHM
    # files, backups, the daemon's log (which has the dropped bounce's reply, redacted)
    assert "<<redacted>@beta.test>" in d.wait_log("event=bounce_dropped")
    for address in (ADDRESS, "alice@acme.test", "bob@beta.test"):
        files, log = plaintext_in(d.root, address), occurrences("\n".join(d.log).encode(), address)
        print(f"\nplaintext {address} while running: files={files} log={log}")
        assert files == {} and log == 0, address
    assert d.stop() == 0
    for address in (ADDRESS, "alice@acme.test", "bob@beta.test"):
        files, log = plaintext_in(d.root, address), occurrences("\n".join(d.log).encode(), address)
        print(f"plaintext {address} after stop: files={files} log={log}")
        assert files == {} and log == 0, address


# -- data written before replies were encrypted -------------------------------------------------


def _v6_store(path: Path, key_file: Path) -> None:
    """A store as cmcd left it before migration 7, with plaintext replies and a suppression reason."""
    generate_key_file(key_file)
    keys = read_key_file(key_file)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        for script in MIGRATIONS[:6]:
            conn.executescript(script)
        conn.execute("INSERT INTO meta VALUES ('schema_version', '6'), ('key_check', ?)",
                     (keys.encrypt("cmcd key check").hex(),))  # fmt: skip
        conn.execute("INSERT INTO tenants(id, name, created) VALUES (1, 'acme', 0)")
        for n in range(3):
            conn.execute(
                "INSERT INTO mail_log(ts, tenant_id, queue_id, event, sender_enc, sender_hmac, rcpt_enc, rcpt_hmac, "
                "rcpt_domain, status, response, event_key) VALUES (?, 1, 'Q1', 'bounced', ?, ?, ?, ?, 'example.net', "
                "'bounced', ?, ?)",
                (time.time(), keys.encrypt("a@acme.test"), keys.index("a@acme.test"), keys.encrypt(ADDRESS),
                 keys.index(ADDRESS), REPLY, f"k{n}"),
            )  # fmt: skip
        conn.execute(
            "INSERT INTO suppressions(tenant_id, address_enc, address_hmac, domain, reason, created) "
            "VALUES (1, ?, ?, 'example.net', ?, 0)",
            (keys.encrypt(ADDRESS), keys.index(ADDRESS), REPLY),
        )
    finally:
        conn.close()


def test_an_old_store_is_sealed_when_opened(tmp_path: Path) -> None:
    path, key_file = tmp_path / "cmcd.db", tmp_path / "data.key"
    _v6_store(path, key_file)
    assert plaintext_in(tmp_path, ADDRESS)  # the old store has it in the clear
    store = open_store(path, key_file)
    try:
        assert [r["response"] for r in store.log_page("mail")] == [REPLY] * 3
        assert [r["reason"] for r in store.suppressions("acme")] == [REPLY]
        version = store.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        assert version == str(len(MIGRATIONS))
        assert store.conn.execute("SELECT 1 FROM meta WHERE key = 'erase_pending'").fetchone() is None
        # store, WAL and SHM, with the store open: nothing of the old plaintext
        assert plaintext_in(tmp_path, ADDRESS) == {}
    finally:
        store.close()
    assert plaintext_in(tmp_path, ADDRESS) == {}


def test_an_old_spool_is_sealed_when_opened(tmp_path: Path) -> None:
    keys = open_store(tmp_path / "cmcd.db", tmp_path / "data.key").keys
    spool_dir = tmp_path / "spool"
    Spool(spool_dir, keys).stop()
    conn = sqlite3.connect(spool_dir / "queue.db", isolation_level=None)
    try:  # a spool as an older cmcd left it: no replies_sealed mark, the replies in the plaintext columns
        conn.execute("DELETE FROM meta WHERE key = 'replies_sealed'")
        conn.execute(
            "INSERT INTO messages(queue_id, tenant_id, user_id, sender_enc, sender_hmac, size_bytes, received, body) "
            "VALUES ('Q1', 1, 1, x'00', x'00', 1, 0, x'00')"
        )
        conn.execute(
            "INSERT INTO recipients(queue_id, rcpt_enc, rcpt_hmac, domain, state, next_attempt, last_response) "
            "VALUES ('Q1', ?, ?, 'example.net', 'deferred', 0, ?)",
            (keys.encrypt(ADDRESS), keys.index(ADDRESS), REPLY.replace("550 5", "450 4")),
        )
        conn.execute(
            "INSERT INTO events(event_key, ts, tenant_id, queue_id, event, sender_enc, sender_hmac, rcpt_enc, "
            "rcpt_hmac, rcpt_domain, status, response) VALUES ('k', 0, 1, 'Q1', 'deferred', x'00', x'00', ?, ?, "
            "'example.net', 'deferred', ?)",
            (keys.encrypt(ADDRESS), keys.index(ADDRESS), REPLY.replace("550 5", "450 4")),
        )
    finally:
        conn.close()
    assert plaintext_in(spool_dir, ADDRESS)
    spool = Spool(spool_dir, keys)
    try:
        row = spool._conn.execute("SELECT last_response, last_response_enc FROM recipients").fetchone()
        assert row[0] == "" and keys.open_text(row[1]) == REPLY.replace("550 5", "450 4")
        event = spool._conn.execute("SELECT response, response_enc FROM events").fetchone()
        assert event[0] == "" and keys.open_text(event[1]) == REPLY.replace("550 5", "450 4")
        assert plaintext_in(spool_dir, ADDRESS) == {}
    finally:
        spool.stop()
    assert plaintext_in(spool_dir, ADDRESS) == {}


@pytest.mark.parametrize(
    ("line", "redacted"),
    [
        (REPLY, "550 5.1.1 <<redacted>@example.net>: Recipient address rejected"),
        ("reason='550 user@example.net unknown'", "reason='550 <redacted>@example.net unknown'"),
        ("rcpt=USER@Example.NET", "rcpt=<redacted>@Example.NET"),
        ('550 "john doe"@example.net unknown', "550 <redacted>@example.net unknown"),
        ("550 prvs=1234=user@example.net", "550 <redacted>@example.net"),
        ("response='550 5.1.1 <{bob}@beta.test>: no'", "response='550 5.1.1 <<redacted>@beta.test>: no'"),
        ("550 john.smith=work@example.net", "550 <redacted>@example.net"),
        ("550 <SRS0=HHH=TT=orig.example=alice@srs.example>", "550 <<redacted>@srs.example>"),
        ("rcpt='o'brien@example.net'", "rcpt='<redacted>@example.net'"),
        ("550 üser@exämple.de", "550 <redacted>@exämple.de"),
        ("550 user@[192.0.2.1]", "550 <redacted>@[192.0.2.1]"),
        ("421 4.4.2 mx.example.net closing connection", "421 4.4.2 mx.example.net closing connection"),
        ("a stray @ sign", "a stray @ sign"),
    ],
    ids=[
        "angle",
        "repr",
        "upper",
        "quoted",
        "batv",
        "braces",
        "equals",
        "srs",
        "apostrophe",
        "utf8",
        "literal",
        "no-address",
        "bare-at",
    ],
)
def test_log_lines_lose_the_local_part_of_addresses(line: str, redacted: str) -> None:
    assert redact_addresses(line) == redacted
