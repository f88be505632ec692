"""The queue's running counts (cmcd/queue/counts.py) on a real spool: after every kind of change
(intake, claims, outcomes and the bounces they queue, hold, release, retry, delete, a tenant's
purge, recovery) they equal a count of every row, the summary read from them equals qshape's
buckets computed from every row, and a spool without them gets them built when it opens."""

from __future__ import annotations

import os
import random
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cmcd.crypto import DataKeys
from cmcd.queue import counts
from cmcd.queue.ids import QueueIdGenerator
from cmcd.queue.spool import Spool
from cmcd.queue.work import Job, Result
from cmcd.records import PENDING_STATES, Recipient, RecipientState, SpoolMessage

T0 = 1_794_999_600.0  # a whole minute: the buckets' edges fall on minute boundaries at T0
HOST = "mail.example.test"
BODY = b"From: a@acme.test\r\nSubject: hi\r\n\r\nhello\r\n"
#: ages in seconds that sit on, just inside and just outside the buckets' edges at T0 (5 and 10 minutes...)
AGES_S = (0.0, 30.0, 299.5, 300.0, 300.25, 600.0, 1199.0, 2400.5, 9600.0, 76800.0, 76801.0, 90000.0)


@pytest.fixture
def keys() -> DataKeys:
    return DataKeys(os.urandom(32), os.urandom(32))


@pytest.fixture
async def spool(tmp_path: Path, keys: DataKeys) -> AsyncIterator[Spool]:
    s = Spool(tmp_path / "spool", keys)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _kept(path: Path) -> dict[str, Counter[tuple[Any, ...]]]:
    conn = _connect(path)
    try:
        return {
            table: Counter({tuple(row[:-1]): row[-1] for row in conn.execute(f"SELECT {columns}, n FROM {table}")})
            for table, columns in (
                ("queue_counts", "state, domain, tenant_id"),
                ("queue_ages", "domain, minute, tenant_id"),
                ("queue_minutes", "minute, tenant_id"),
            )
        }
    finally:
        conn.close()


def _scanned(path: Path) -> dict[str, Counter[tuple[Any, ...]]]:
    conn = _connect(path)
    try:
        rows = conn.execute(
            "SELECT m.tenant_id, r.state, r.domain, m.received FROM recipients r JOIN messages m USING (queue_id)"
        ).fetchall()
    finally:
        conn.close()
    pending = [(t, s, d, int(received) // 60) for t, s, d, received in rows if s in PENDING_STATES]
    return {
        "queue_counts": Counter((s, d, t) for t, s, d, _ in rows),
        "queue_ages": Counter((d, minute, t) for t, _, d, minute in pending),
        "queue_minutes": Counter((minute, t) for t, _, _, minute in pending),
    }


def _summary_by_scan(path: Path, now: float, tenant_id: int | None = None, top: int = 50) -> dict[str, Any]:
    """What queue summary computed before the counts: qshape's buckets from every pending row."""
    conn = _connect(path)
    scope, args = ("", ()) if tenant_id is None else (" AND m.tenant_id = ?", (tenant_id,))
    by_state = dict.fromkeys(PENDING_STATES, 0)
    domains: dict[str, list[int]] = {}
    cuts = [now - b * 60 for b in counts.AGE_BUCKETS_MIN]
    for domain, state, received in conn.execute(
        "SELECT r.domain, r.state, m.received FROM recipients r JOIN messages m ON m.queue_id = r.queue_id "
        f"WHERE r.state IN ('queued', 'deferred', 'inflight', 'held'){scope}",
        args,
    ):
        by_state[state] += 1
        c = domains.setdefault(domain, [0] * (len(cuts) + 2))
        c[0] += 1
        c[1 + next((i for i, cut in enumerate(cuts) if received > cut), len(cuts))] += 1
    conn.close()
    ranked = sorted(domains.items(), key=lambda kv: (-kv[1][0], kv[0]))
    return {
        "states": by_state,
        "buckets_min": list(counts.AGE_BUCKETS_MIN),
        "total": [sum(c[i] for c in domains.values()) for i in range(len(cuts) + 2)],
        "domains": [{"domain": d, "counts": c} for d, c in ranked[:top]],
        "more_domains": max(0, len(ranked) - top),
    }


async def _agrees(spool: Spool, *, top: int = 50) -> None:
    """The kept counts equal a count of every row; the summary (at instants that put the buckets'
    edges on, inside and between minutes) and the figures equal what a scan gives."""
    assert _kept(spool.path) == _scanned(spool.path)
    for now in (T0, T0 + 0.25, T0 + 29.5, T0 + 59.999, T0 + 300.0, T0 + 4000.75):
        for tenant_id in (None, 1, 2):
            got = await spool.summary(now, tenant_id)
            assert got == _summary_by_scan(spool.path, now, tenant_id, top), (now, tenant_id)
    conn = _connect(spool.path)
    every = dict(conn.execute("SELECT state, COUNT(*) FROM recipients GROUP BY state").fetchall())
    (oldest,) = conn.execute("SELECT MIN(received) FROM messages WHERE held = 0").fetchone()
    conn.close()
    figures = await spool.figures()
    assert (figures.recipients, figures.oldest_received) == (every, oldest)


def _message(
    ids: QueueIdGenerator, tenant_id: int, age_s: float, *rcpts: str, sender: str = "a@acme.test"
) -> SpoolMessage:
    at = T0 - age_s
    qid = ids.next(at)
    return SpoolMessage(
        queue_id=qid,
        tenant_id=tenant_id,
        user_id=1,
        sender=sender,
        recipients=tuple(Recipient(r, r.rpartition("@")[2]) for r in rcpts),
        body=BODY,
        received_ts=at,
        message_id=f"<{qid}@acme.test>",
    )


async def _fill(spool: Spool, ids: QueueIdGenerator) -> list[SpoolMessage]:
    """Two tenants' messages at every age of AGES_S, one to three recipients at three domains."""
    messages = []
    for n, age in enumerate(AGES_S):
        tenant = 1 + n % 2
        rcpts = [f"r{n}.{i}@{('big', 'mid', 'small')[(n + i) % 3]}.test" for i in range(1 + n % 3)]
        messages.append(_message(ids, tenant, age, *rcpts))
    for m in messages[:4]:
        await spool.commit(m, "2026-11-18")
    await spool.commit_all(messages[4:], "2026-11-18", None, 0.0)  # the API's one-transaction path too
    return messages


def _results(jobs: list[Job]) -> list[Result]:
    """One of each outcome, in turn, over the claimed recipients."""
    outcomes = [
        (RecipientState.DELIVERED, "250 2.0.0 ok"),
        (RecipientState.DEFERRED, "451 4.3.0 later"),
        (RecipientState.BOUNCED, "550 5.1.1 no such user"),
        (RecipientState.EXPIRED, "451 4.4.7 too old"),
        (RecipientState.SUPPRESSED, "5.7.1 suppressed"),
    ]
    out = []
    n = 0
    for job in jobs:
        for due in job.recipients:
            state, reply = outcomes[n % len(outcomes)]
            out.append(Result(job, due, state, reply, next_attempt=T0 + 3600))
            n += 1
    return out


async def test_the_counts_equal_a_full_count_after_every_kind_of_change(tmp_path: Path, keys: DataKeys) -> None:
    ids = QueueIdGenerator()
    s = Spool(tmp_path / "spool", keys)
    s.start()
    try:
        messages = await _fill(s, ids)
        await _agrees(s)
        jobs = await s.claim_due(T0 - 500, limit=100)  # the older messages go inflight
        assert jobs
        await _agrees(s)
        report = await s.apply_results(_results(jobs), clock=lambda: T0, hostname=HOST, ids=ids)
        assert report.finished and report.bounces  # messages erased, DSNs queued (intake inside a delivery)
        await _agrees(s)
        assert await s.hold(tenant_id=2) > 0
        await _agrees(s)
        assert await s.release(T0, queue_id=messages[1].queue_id) > 0
        await _agrees(s)
        assert await s.retry(T0, everything=True) > 0  # next attempts only: the counts stay as they are
        await _agrees(s)
        first = (await s.list_page(limit=1))["items"][0]["queue_id"]
        assert await s.delete(T0, first) > 0
        await _agrees(s)
        assert await s.claim_due(T0 + 3600, limit=3)  # inflight when the process dies
        await _agrees(s)
    finally:
        s.stop()
    s = Spool(tmp_path / "spool", keys)  # a restart: recovery puts inflight back to queued
    try:
        assert s.recover().inflight_requeued == 3
        s.start()
        await _agrees(s)
        assert await s.purge_tenant(1) > 0
        await _agrees(s)
        assert await s.purge_tenant(2) > 0
        assert _kept(s.path) == {"queue_counts": Counter(), "queue_ages": Counter(), "queue_minutes": Counter()}
    finally:
        s.stop()


async def test_a_large_varied_queue_summarises_as_a_scan_does_at_any_instant(spool: Spool) -> None:
    rng = random.Random(13)
    ids = QueueIdGenerator()
    batch = []
    for n in range(400):
        age = rng.choice((rng.uniform(0, 1800), rng.uniform(0, 2 * 86400), float(rng.randrange(0, 90000, 60))))
        rcpts = [f"r{n}.{i}@d{min(rng.randrange(60), rng.randrange(60))}.test" for i in range(rng.randint(1, 4))]
        batch.append(_message(ids, rng.randint(1, 3), age, *rcpts))
    await spool.commit_all(batch, "2026-11-18", None, 0.0)
    jobs = await spool.claim_due(T0 - 3600, limit=500)
    await spool.apply_results(_results(jobs)[::2], clock=lambda: T0, hostname=HOST, ids=ids)
    await spool.hold(tenant_id=3)
    assert _kept(spool.path) == _scanned(spool.path)
    for _ in range(40):
        now = T0 + rng.uniform(-120, 4000)
        for tenant_id in (None, 1, 3):
            assert await spool.summary(now, tenant_id) == _summary_by_scan(spool.path, now, tenant_id), now


def _as_older_cmcd_left_it(path: Path) -> None:
    """Take away what this version adds: the counts, their triggers and their meta row."""
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
            conn.execute(f"DROP TRIGGER {name}")
        for table in ("queue_counts", "queue_ages", "queue_minutes"):
            conn.execute(f"DROP TABLE {table}")
        conn.execute("DROP INDEX messages_received")
        conn.execute("DELETE FROM meta WHERE key = ?", (counts.VERSION_KEY,))
        # and a change the older cmcd made after that: nothing counts it
        conn.execute("UPDATE recipients SET state = 'deferred' WHERE id % 2 = 0 AND state = 'queued'")
    finally:
        conn.close()


async def test_a_spool_without_the_counts_gets_them_built_when_it_opens(tmp_path: Path, keys: DataKeys) -> None:
    ids = QueueIdGenerator()
    s = Spool(tmp_path / "spool", keys)
    s.start()
    try:
        await _fill(s, ids)
        jobs = await s.claim_due(T0 - 500, limit=100)
        await s.apply_results(_results(jobs), clock=lambda: T0, hostname=HOST, ids=ids)
    finally:
        s.stop()
    _as_older_cmcd_left_it(tmp_path / "spool" / "queue.db")
    s = Spool(tmp_path / "spool", keys)
    s.start()
    try:
        await _agrees(s)
        await _fill(s, ids)  # and the triggers keep them from then on
        await _agrees(s)
    finally:
        s.stop()
    conn = sqlite3.connect(str(tmp_path / "spool" / "queue.db"), isolation_level=None)
    try:
        assert not counts.install(conn)  # built once: a spool that has them is not scanned again
    finally:
        conn.close()


async def test_changes_by_hand_are_counted_keys_never_change_and_recipients_go_before_their_message(
    spool: Spool,
) -> None:
    ids = QueueIdGenerator()
    m = _message(ids, 1, 60.0, "r1@big.test", "r2@mid.test")
    await spool.commit(m, "2026-11-18")
    conn = sqlite3.connect(str(spool.path), isolation_level=None, timeout=30)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="never change"):
            conn.execute("UPDATE recipients SET domain = 'other.test'")
        with pytest.raises(sqlite3.IntegrityError, match="never change"):
            conn.execute("UPDATE messages SET received = received - 3600")
        with pytest.raises(sqlite3.IntegrityError, match="never change"):
            conn.execute("UPDATE messages SET tenant_id = 2")
        # a change made by hand (an sqlite3 shell) is counted like any other, back from a final state too
        conn.execute("UPDATE recipients SET state = 'delivered' WHERE domain = 'big.test'")
        assert _kept(spool.path) == _scanned(spool.path)
        conn.execute("UPDATE recipients SET state = 'queued' WHERE domain = 'big.test'")
        assert _kept(spool.path) == _scanned(spool.path)
        conn.execute("DELETE FROM messages WHERE queue_id = ?", (m.queue_id,))  # its recipients go first
        assert conn.execute("SELECT COUNT(*) FROM recipients").fetchone() == (0,)
    finally:
        conn.close()
    assert (
        _kept(spool.path)
        == _scanned(spool.path)
        == {
            "queue_counts": Counter(),
            "queue_ages": Counter(),
            "queue_minutes": Counter(),
        }
    )


async def test_the_summary_ranks_domains_and_counts_the_rest(spool: Spool) -> None:
    ids = QueueIdGenerator()
    await spool.commit_all(
        [_message(ids, 1, 30.0 * n, *[f"r{n}.{i}@d{i}.test" for i in range(n % 7 + 1)]) for n in range(30)],
        "2026-11-18",
        None,
        0.0,
    )
    got = await spool.summary(T0)
    assert [d["domain"] for d in got["domains"]] == [f"d{i}.test" for i in range(7)]
    assert got == _summary_by_scan(spool.path, T0)
    conn = _connect(spool.path)
    small = counts.summary(conn, T0, top=3)
    conn.close()
    assert small == _summary_by_scan(spool.path, T0, top=3) and small["more_domains"] == 4
