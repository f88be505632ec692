"""Daily counts: committed with the messages in the spool's outbox, shipped to the store once, read from both."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cmcd.crypto import DataKeys
from cmcd.queue import quota
from cmcd.queue.ids import QueueIdGenerator
from cmcd.queue.spool import Spool
from cmcd.records import Recipient, SpoolMessage
from cmcd.store import AsyncStore, open_store

T0 = 1_794_999_600.0
DAY = "2026-11-18"


class Parts:
    def __init__(self, spool: Spool, astore: AsyncStore, acme: int, beta: int):
        self.spool, self.astore, self.acme, self.beta = spool, astore, acme, beta
        self.ids = QueueIdGenerator()

    def message(self, tenant_id: int) -> SpoolMessage:
        qid = self.ids.next(T0)
        return SpoolMessage(qid, tenant_id, 1, "a@acme.test", (Recipient("r@dst.test", "dst.test"),), b"x\r\n", T0)

    def stored(self) -> dict[int, int]:
        return self.astore.store.daily_counts(DAY, self.spool.spool_id)[0]


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[Parts]:
    store = open_store(tmp_path / "cmcd.db", tmp_path / "data.key")
    acme, beta = store.tenant_add("acme").id, store.tenant_add("beta").id
    astore = AsyncStore(store)
    spool = Spool(tmp_path / "spool", store.keys)
    spool.start()
    try:
        yield Parts(spool, astore, acme, beta)
    finally:
        spool.stop()
        astore.close()


async def test_counts_wait_in_the_spool_until_shipped_and_are_read_from_both(parts: Parts) -> None:
    await parts.spool.commit(parts.message(parts.acme), DAY)
    await parts.spool.commit_all([parts.message(parts.acme), parts.message(parts.beta)], DAY, None, 0.0)
    await parts.spool.commit(parts.message(parts.acme), "2026-11-17")  # another day
    assert parts.stored() == {}
    assert await quota.daily_counts(parts.spool, parts.astore, DAY) == {parts.acme: 2, parts.beta: 1}
    assert await quota.ship(parts.spool, parts.astore) == 4  # outbox rows: one a commit, tenant and day
    assert parts.stored() == {parts.acme: 2, parts.beta: 1}
    assert await quota.ship(parts.spool, parts.astore) == 0
    await parts.spool.commit(parts.message(parts.beta), DAY)
    assert await quota.daily_counts(parts.spool, parts.astore, DAY) == {parts.acme: 2, parts.beta: 2}


async def test_a_shipment_repeated_after_a_crash_adds_nothing_twice(parts: Parts) -> None:
    await parts.spool.commit(parts.message(parts.acme), DAY)
    rows = await parts.spool.take_counts(100)
    # the store took them, and the process died before the outbox rows were deleted
    assert parts.astore.store.add_daily_counts(parts.spool.spool_id, rows) == 1
    assert await quota.daily_counts(parts.spool, parts.astore, DAY) == {parts.acme: 1}
    assert await quota.ship(parts.spool, parts.astore) == 1  # shipped again: skipped by the store
    assert parts.stored() == {parts.acme: 1}
    await parts.spool.commit(parts.message(parts.acme), DAY)  # a later id, though the outbox was emptied
    await quota.ship(parts.spool, parts.astore)
    assert parts.stored() == {parts.acme: 2}


async def test_a_purged_tenant_leaves_no_count_in_either_place(parts: Parts) -> None:
    await parts.spool.commit(parts.message(parts.acme), DAY)
    await quota.ship(parts.spool, parts.astore)
    await parts.spool.commit(parts.message(parts.acme), DAY)
    await parts.spool.commit(parts.message(parts.beta), DAY)
    assert await parts.spool.purge_tenant(parts.acme) == 2
    parts.astore.store.tenant_purge("acme")
    await quota.ship(parts.spool, parts.astore)
    assert parts.stored() == {parts.beta: 1}


def test_a_spool_of_an_older_cmcd_hands_its_counts_to_the_outbox(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    conn = sqlite3.connect(tmp_path / "spool" / "queue.db")
    conn.execute(
        "CREATE TABLE daily_counts (tenant_id INTEGER, day TEXT, messages INTEGER, PRIMARY KEY (tenant_id, day))"
    )
    conn.executemany("INSERT INTO daily_counts VALUES (?,?,?)", [(1, DAY, 5), (2, DAY, 7)])
    conn.commit()
    conn.close()
    spool = Spool(tmp_path / "spool", DataKeys(os.urandom(32), os.urandom(32)))
    try:
        conn = sqlite3.connect(f"file:{spool.path}?mode=ro", uri=True)
        assert conn.execute("SELECT tenant_id, day, messages FROM counts_outbox ORDER BY id").fetchall() == [
            (1, DAY, 5),
            (2, DAY, 7),
        ]
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'daily_counts'").fetchone() is None
        conn.close()
    finally:
        spool.stop()
