"""A 250 survives kill -9: concurrent STARTTLS+AUTH clients, the daemon killed at random moments, then the spool audited.

Every queue id a client saw in a 250 must be in the spool with exactly the bytes sent (after the
Received: header cmcd prepends) and its recipients queued; the queue tables stay consistent; every
restart logs event=spool_recovered. A message in the spool whose client never saw the 250 is allowed
(at-least-once), but it too must be whole: one of the messages a client sent, byte for byte.
"""

from __future__ import annotations

import os
import random
import re
import smtplib
import sqlite3
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import PASSWORD, Cmcd, queue_id

CLIENTS = 8
ROUNDS = 5
KILL_AFTER_S = (0.2, 1.5)
ROUNDS_BUDGET_S = 40.0
SENDER = "alice@acme.test"


@dataclass
class Load:
    """What the clients saw, shared by their threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Message-ID -> (bytes sent, recipients), for every message whose DATA was started
    attempted: dict[str, tuple[bytes, list[str]]] = field(default_factory=dict)
    #: queue id -> (bytes sent, recipients), for every 250 after DATA
    accepted: dict[str, tuple[bytes, list[str]]] = field(default_factory=dict)
    #: connections cut by the kill (OSError or SMTPServerDisconnected)
    interrupted: int = 0
    #: replies that are neither success nor a dead connection: each one is a failure
    unexpected: list[str] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)


def _make_message(rng: random.Random) -> tuple[str, bytes, list[str]]:
    mid = f"{uuid.uuid4().hex}@acme.test"
    lines = [os.urandom(rng.randint(10, 38)).hex() for _ in range(rng.randint(1, 300))]
    raw = (
        f"From: <{SENDER}>\r\nTo: <list@dst.test>\r\nSubject: durability {mid[:8]}\r\n"
        f"Message-ID: <{mid}>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n" + "\r\n".join(lines) + "\r\n"
    ).encode()
    rcpts = [f"r{rng.randrange(10**6)}-{i}@dst{i % 3}.test" for i in range(rng.randint(1, 4))]
    return mid, raw, rcpts


def _client(
    port: int, ctx: ssl.SSLContext, stop: threading.Event, logged_in: threading.Semaphore, load: Load, seed: int
) -> None:
    rng = random.Random(seed)
    try:
        while not stop.is_set():
            c: smtplib.SMTP | None = None
            try:
                c = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10)
                c.ehlo()
                c.starttls(context=ctx)
                c.ehlo()
                c.login("alice", PASSWORD)
                logged_in.release()
                while not stop.is_set():
                    mid, raw, rcpts = _make_message(rng)
                    for step, code, text in _transaction(c, mid, raw, rcpts, load):
                        if code != 250:
                            with load.lock:
                                load.unexpected.append(f"{step}: {code} {text!r}")
                            return
            except (OSError, smtplib.SMTPServerDisconnected):
                with load.lock:
                    load.interrupted += 1
                stop.wait(0.01)  # the daemon is down until the next round
            except smtplib.SMTPResponseException as exc:
                with load.lock:
                    load.unexpected.append(f"{type(exc).__name__}: {exc.smtp_code} {exc.smtp_error!r}")
                return
            finally:
                if c is not None:
                    c.close()
    except BaseException as exc:  # handed to the test thread
        load.errors.append(exc)


def _transaction(c: smtplib.SMTP, mid: str, raw: bytes, rcpts: list[str], load: Load):  # type: ignore[no-untyped-def]
    code, text = c.mail(SENDER)
    yield "MAIL", code, text
    for r in rcpts:
        code, text = c.rcpt(r)
        yield "RCPT", code, text
    with load.lock:
        load.attempted[mid] = (raw, rcpts)
    code, text = c.data(raw)
    if code == 250:
        with load.lock:
            load.accepted[queue_id(text)] = (raw, rcpts)
    yield "DATA", code, text


def _wait(cond, what: str, timeout: float = 20, log: list[str] | None = None) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}" + ("; log:\n" + "\n".join(log[-30:]) if log else ""))


def _restart(d: Cmcd) -> list[str]:
    """Start D again and return the new process's log lines up to ready.

    The previous process's log reader wakes start() when it reaches end of file; wait for that to
    happen first, and take the new port from the new ready line rather than trusting the wake-up.
    """
    old = d.proc
    assert old is not None and old.poll() is not None
    _wait(lambda: old.stderr is None or old.stderr.closed, "the old daemon's log to close")
    first = len(d.log)
    d.start()
    _wait(lambda: any("event=ready" in line for line in d.log[first:]), "event=ready from the new daemon", log=d.log)
    lines = d.log[first:]
    ready = next(line for line in lines if "event=ready" in line)
    d.smtp_port = int(re.search(r" smtp=\S+:(\d+)", ready).group(1))  # type: ignore[union-attr]
    return lines


def _shards(d: Cmcd) -> list[tuple[str, Path]]:
    """(the store's meta key for its spool id, file) of every spool shard (one per worker)."""
    out = []
    for path in sorted(Path(d.config["spool"]["dir"]).glob("queue*.db")):
        shard = path.stem.partition("-")[2]
        out.append(("spool_id" if not shard else f"spool_id.{shard}", path))
    return out


def _check_tables(d: Cmcd) -> None:
    messages = waiting = 0
    for id_key, path in _shards(d):
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            orphan_messages = conn.execute(
                "SELECT queue_id FROM messages m WHERE NOT EXISTS (SELECT 1 FROM recipients r WHERE r.queue_id = m.queue_id)"
            ).fetchall()
            assert orphan_messages == [], "messages without recipients"
            orphan_rcpts = conn.execute(
                "SELECT id, queue_id FROM recipients r WHERE NOT EXISTS (SELECT 1 FROM messages m WHERE m.queue_id = r.queue_id)"
            ).fetchall()
            assert orphan_rcpts == [], "recipients without a message"
            # the body is stored encrypted: a 12-byte nonce and a 16-byte tag around the plaintext
            assert (
                conn.execute("SELECT COUNT(*) FROM messages WHERE size_bytes + 28 != length(body)").fetchone()[0] == 0
            )
            messages += conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
            waiting += _waiting(d, conn, id_key)
        finally:
            conn.close()
    assert _shipped(d) + waiting == messages, "daily counts are committed in the same transaction as the messages"


def _shipped(d: Cmcd) -> int:
    """Messages the store has counted against the daily quota (shipped from every shard)."""
    store = sqlite3.connect(f"file:{d.root / 'cmcd.db'}?mode=ro", uri=True)
    try:
        return int(store.execute("SELECT COALESCE(SUM(messages), 0) FROM daily_counts").fetchone()[0])
    finally:
        store.close()


def _waiting(d: Cmcd, spool: sqlite3.Connection, id_key: str) -> int:
    """Messages in a shard's counts outbox past the last id the store has from it (read while the daemon is down)."""
    store = sqlite3.connect(f"file:{d.root / 'cmcd.db'}?mode=ro", uri=True)
    try:
        row = store.execute(
            "SELECT up_to FROM daily_counts_shipped WHERE spool_id = (SELECT value FROM meta WHERE key = ?)", (id_key,)
        ).fetchone()
    finally:
        store.close()
    up_to = 0 if row is None else row[0]
    return int(
        spool.execute("SELECT COALESCE(SUM(messages), 0) FROM counts_outbox WHERE id > ?", (up_to,)).fetchone()[0]
    )


def _check_spool(d: Cmcd, load: Load) -> dict[str, dict[str, Any]]:
    """Every accepted queue id is spooled, byte-exact, recipients queued; every spooled message is whole."""
    _check_tables(d)
    spooled = d.spooled()
    with load.lock:
        accepted = dict(load.accepted)
        attempted = dict(load.attempted)
    missing = sorted(set(accepted) - set(spooled))
    assert missing == [], f"{len(missing)} of {len(accepted)} acknowledged messages lost: {missing[:5]}"
    for qid, (raw, rcpts) in accepted.items():
        m = spooled[qid]
        body = m["body"]
        assert body.endswith(raw), f"{qid}: spooled bytes differ from the bytes sent"
        added = body[: -len(raw)]
        assert added.startswith(b"Received: from client.test ([127.0.0.1])"), added[:80]
        assert f"id {qid};".encode() in added
        assert b"Message-ID" not in added and b"Date:" not in added, "the message had both; nothing else is added"
        assert m["sender"] == SENDER
        assert m["recipients"] == [(r, "queued") for r in rcpts], qid
    for qid, m in spooled.items():  # including messages whose client never saw the 250
        found = re.search(rb"\r\nMessage-ID: <([0-9a-f]{32}@acme\.test)>\r\n", m["body"])
        assert found, f"{qid}: no Message-ID of ours"
        raw, rcpts = attempted[found.group(1).decode()]
        assert m["body"].endswith(raw), f"{qid}: torn or mixed body"
        assert m["recipients"] == [(r, "queued") for r in rcpts], qid
    return spooled


def test_acknowledged_messages_survive_kill_9(make_cmcd) -> None:
    started = time.monotonic()
    d: Cmcd = make_cmcd()
    load = Load()
    rng = random.Random()
    ctx = d.client_context()
    rounds = 0
    while rounds < ROUNDS and time.monotonic() - started < ROUNDS_BUDGET_S:
        with d.smtp():  # one AUTH pays for scrypt; the clients' logins then hit the daemon's auth cache
            pass
        stop = threading.Event()
        logged_in = threading.Semaphore(0)
        threads = [
            threading.Thread(
                target=_client, args=(d.smtp_port, ctx, stop, logged_in, load, rng.randrange(2**32)), daemon=True
            )
            for _ in range(CLIENTS)
        ]
        for t in threads:
            t.start()
        try:
            # The load starts once every client is through AUTH; the kill lands at a random point of it.
            deadline = time.monotonic() + 15
            for _ in range(CLIENTS):
                logged_in.acquire(timeout=max(0.0, deadline - time.monotonic()))
            time.sleep(rng.uniform(*KILL_AFTER_S))  # the clock is the subject: a kill after a random delay
            d.kill9()
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert not any(t.is_alive() for t in threads), "a client thread hung"
        assert load.errors == [], load.errors
        assert load.unexpected == [], load.unexpected
        rounds += 1
        # Before anything restarts: what was acknowledged is already on disk.
        _check_spool(d, load)
        lines = _restart(d)
        assert any("event=spool_recovered" in line for line in lines), lines

    assert rounds >= 3, f"only {rounds} rounds fitted in the time budget"
    assert len(load.accepted) > 0, "no message was acknowledged: the test proved nothing"
    assert load.interrupted > 0, "no kill landed during a session"

    assert d.stop() == 0
    spooled = _check_spool(d, load)
    assert len(spooled) >= len(load.accepted)

    lines = _restart(d)
    assert any(re.search(r"event=spool_recovered inflight_requeued=0\b", line) for line in lines), lines
    starts = rounds + 2  # the first start, one restart a round, and this one
    # every worker recovers its own shard at every start
    assert sum("event=spool_recovered" in line for line in d.log) == starts * len(_shards(d))
    assert set(d.spooled()) == set(spooled), "a clean restart changes nothing in the spool"
