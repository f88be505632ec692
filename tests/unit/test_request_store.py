"""Idempotency-Keys across worker processes: the claim rule as a table, the store's claims (taken,
busy, answered, released, expired, per tenant, nothing in the clear), and the protocol around the
spool and the store (cmcd/queue/requests.py) with two spool shards and two store connections on
one file standing for two workers: a retry on the other worker is answered, never sent again,
also after a crash between the spool commit and the store write (reconcile at start)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cmcd.queue import requests
from cmcd.queue.ids import QueueIdGenerator
from cmcd.queue.requests import Action, ApiRequest, Idempotency, Verdict
from cmcd.queue.spool import Spool
from cmcd.store import AsyncStore, Store, open_store
from cmcd.store.request_store import Claim, ClaimOutcome, claim_rule
from tests.unit.test_spool_ops import _message

T0 = 1_794_999_600.0
TTL = 86400.0
H1, H2 = b"1" * 32, b"2" * 32
RESPONSE = '{"id": "Q1", "message_id": "<m1@acme.test>", "recipients": 1}'
TAKEN, ANSWERED, BUSY = ClaimOutcome.TAKEN, ClaimOutcome.ANSWERED, ClaimOutcome.BUSY


@pytest.mark.parametrize(
    ("row_shard", "answered", "shard", "workers", "outcome"),
    [
        (None, False, 0, 2, TAKEN),
        (0, False, 0, 2, TAKEN),
        (1, False, 0, 2, BUSY),
        (0, True, 0, 2, ANSWERED),
        (1, True, 0, 2, ANSWERED),
        (3, False, 0, 2, TAKEN),
        (3, True, 0, 2, ANSWERED),
        (0, False, 0, 1, TAKEN),
        (1, False, 0, 1, TAKEN),
    ],
    ids=[
        "no-row-is-taken",
        "own-unanswered-is-taken-again",
        "another-workers-unanswered-is-busy",
        "own-answered-is-answered",
        "another-workers-answered-is-answered",
        "unanswered-of-a-shard-no-worker-runs-is-taken",
        "answered-of-a-shard-no-worker-runs-is-answered",
        "one-worker-own",
        "one-worker-after-two",
    ],
)
def test_claim_rule(row_shard: int | None, answered: bool, shard: int, workers: int, outcome: ClaimOutcome) -> None:
    assert claim_rule(row_shard, answered, shard, workers) is outcome


# -- the store's claims ------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(tmp_path / "cmcd.db", tmp_path / "data.key")
    s.tenant_add("acme")
    s.tenant_add("beta")
    yield s
    s.close()


def _claim(store: Store, shard: int, h: bytes = H1, *, tenant: int = 1, key: str = "k1", now: float = T0) -> Claim:
    return store.idempotency_claim(tenant, key, h, shard, 2, now, now - TTL)


def test_a_claim_is_busy_for_another_worker_until_answered(store: Store) -> None:
    assert _claim(store, 0).outcome is TAKEN
    busy = store.idempotency_claim(1, "k1", H1, 1, 2, T0 + 1, T0 + 1 - TTL)
    assert (busy.outcome, busy.shard) == (BUSY, 0)
    assert store.idempotency_answer(1, "k1", H1, 0, 202, RESPONSE, T0 + 2)
    replay = store.idempotency_claim(1, "k1", H1, 1, 2, T0 + 3, T0 + 3 - TTL)
    assert (replay.outcome, replay.shard, replay.same_request, replay.status, replay.response) == (
        ANSWERED, 0, True, 202, RESPONSE)  # fmt: skip
    other = store.idempotency_claim(1, "k1", H2, 1, 2, T0 + 3, T0 + 3 - TTL)
    assert (other.outcome, other.same_request) == (ANSWERED, False)
    assert store.idempotency_claim(2, "k1", H2, 1, 2, T0 + 3, T0 + 3 - TTL).outcome is TAKEN  # keys are per tenant
    # another shard cannot overwrite the row: the first answer stands
    assert not store.idempotency_answer(1, "k1", H2, 1, 202, "{}", T0 + 4)
    assert store.idempotency_claim(1, "k1", H1, 1, 2, T0 + 5, T0 + 5 - TTL).response == RESPONSE


def test_a_released_claim_may_be_taken_by_any_worker(store: Store) -> None:
    _claim(store, 0)
    assert not store.idempotency_release(1, "k1", 1)  # not its claim
    assert store.idempotency_release(1, "k1", 0)
    assert store.idempotency_claim(1, "k1", H2, 1, 2, T0, T0 - TTL).outcome is TAKEN
    store.idempotency_answer(1, "k1", H2, 1, 202, RESPONSE, T0)
    assert not store.idempotency_release(1, "k1", 1)  # answered: stays
    assert _claim(store, 0, H2).outcome is ANSWERED


def test_an_own_unanswered_claim_is_taken_again_with_the_new_request(store: Store) -> None:
    _claim(store, 0, H1)
    assert _claim(store, 0, H2).outcome is TAKEN
    store.idempotency_answer(1, "k1", H2, 0, 202, RESPONSE, T0)
    assert store.idempotency_claim(1, "k1", H2, 1, 2, T0, T0 - TTL).same_request


def test_rows_older_than_the_ttl_go_with_the_next_claim(store: Store) -> None:
    _claim(store, 0, key="old")
    store.idempotency_answer(1, "old", H1, 0, 202, RESPONSE, T0)
    _claim(store, 0, key="new", now=T0 + TTL - 1)
    assert _count(store) == 2
    later = T0 + TTL + 1
    assert store.idempotency_claim(1, "old", H2, 1, 2, later, later - TTL).outcome is TAKEN  # forgotten: runs again
    assert _count(store) == 2  # the old row went, the claim is a new one; "new" is not old yet


def test_keys_and_responses_are_not_in_the_clear_and_a_purge_takes_them(store: Store) -> None:
    _claim(store, 0, key="welcome-bob@dst.test")
    store.idempotency_answer(1, "welcome-bob@dst.test", H1, 0, 202, RESPONSE, T0)
    raw = [bytes(v) if isinstance(v, bytes) else str(v).encode() for row in _all(store) for v in row]
    assert not any(b"bob@dst.test" in v or b"m1@acme.test" in v or v == H1 for v in raw)
    _claim(store, 0, tenant=2, key="beta-key")
    assert store.tenant_purge("acme")["idempotency_keys"] == 1
    assert _count(store) == 1  # beta's stays


def test_an_answer_for_a_tenant_that_is_gone_is_not_kept(store: Store) -> None:
    assert not store.idempotency_answer(99, "k1", H1, 0, 202, RESPONSE, T0)
    assert _count(store) == 0


def _all(store: Store) -> list[tuple[object, ...]]:
    return [tuple(r) for r in store.conn.execute("SELECT * FROM idempotency_keys")]


def _count(store: Store) -> int:
    return int(store.conn.execute("SELECT COUNT(*) FROM idempotency_keys").fetchone()[0])


# -- two workers: a spool shard and a store connection each, one store file ---------------------


@dataclass
class Worker:
    spool: Spool
    astore: AsyncStore
    keys: Idempotency

    async def commit(self, key: str, h: bytes, response: str = RESPONSE, rcpt: str = "r@dst.test") -> None:
        """What send.py does once a request is queued: the messages with the key, in the spool."""
        message = _message(QueueIdGenerator(self.keys.shard), rcpt)
        await self.spool.commit_all([message], "2026-11-18", ApiRequest(1, key, h, 202, response), 0.0)

    async def run(self, key: str, h: bytes, response: str = RESPONSE) -> Verdict:
        """A whole request: begin, and if it may go, commit and answer."""
        verdict = await self.keys.begin(1, key, h)
        if verdict.action is Action.GO:
            await self.commit(key, h, response)
            await self.keys.answered(1, key, h, 202, response)
        return verdict

    def messages(self) -> int:
        conn = sqlite3.connect(f"file:{self.spool.path}?mode=ro", uri=True)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
        finally:
            conn.close()


@pytest.fixture
async def workers(tmp_path: Path) -> AsyncIterator[tuple[Worker, Worker]]:
    first = open_store(tmp_path / "cmcd.db", tmp_path / "data.key")
    first.tenant_add("acme")
    made = []
    for shard, store in enumerate((first, open_store(tmp_path / "cmcd.db", tmp_path / "data.key"))):
        spool = Spool(tmp_path / "spool", store.keys, "queue.db" if shard == 0 else f"queue-{shard}.db")
        spool.start()
        astore = AsyncStore(store)
        # the spool stamps a key with the time of its commit: these workers run on the clock too
        made.append(Worker(spool, astore, Idempotency(spool, astore, shard, 2, lambda: TTL, time.time)))
    try:
        yield made[0], made[1]
    finally:
        for w in made:
            w.spool.stop()
            w.astore.close()


async def test_a_retry_on_the_other_worker_is_answered_never_sent_again(workers: tuple[Worker, Worker]) -> None:
    w0, w1 = workers
    assert (await w0.keys.begin(1, "k1", H1)).action is Action.GO
    assert (await w0.keys.begin(1, "k1", H1)).action is Action.BUSY  # running here
    assert (await w1.keys.begin(1, "k1", H1)).action is Action.BUSY  # running in the other worker
    await w0.commit("k1", H1)
    await w0.keys.answered(1, "k1", H1, 202, RESPONSE)
    for w in (w1, w0):
        assert await w.keys.begin(1, "k1", H1) == Verdict(Action.REPLAY, 202, RESPONSE)
        assert (await w.keys.begin(1, "k1", H2)).action is Action.REUSED
    assert (w0.messages(), w1.messages()) == (1, 0)


async def test_a_refused_request_lets_the_key_go_to_any_worker(workers: tuple[Worker, Worker]) -> None:
    w0, w1 = workers
    assert (await w0.keys.begin(1, "k1", H1)).action is Action.GO
    await w0.keys.refused(1, "k1")
    assert (await w1.run("k1", H2)).action is Action.GO
    assert await w0.keys.begin(1, "k1", H2) == Verdict(Action.REPLAY, 202, RESPONSE)
    assert (w0.messages(), w1.messages()) == (0, 1)


async def test_a_crash_after_the_spool_commit_is_answered_after_the_restart(workers: tuple[Worker, Worker]) -> None:
    w0, w1 = workers
    assert (await w0.keys.begin(1, "k1", H1)).action is Action.GO
    await w0.commit("k1", H1)  # ... and the process dies before answered()
    assert (await w1.keys.begin(1, "k1", H1)).action is Action.BUSY  # retry later
    assert await requests.reconcile(w0.spool, w0.astore, 0, time.time(), TTL) == (1, 0)  # its next start
    assert await w1.keys.begin(1, "k1", H1) == Verdict(Action.REPLAY, 202, RESPONSE)
    assert (w0.messages(), w1.messages()) == (1, 0)


async def test_a_crash_before_the_spool_commit_frees_the_key_at_the_restart(workers: tuple[Worker, Worker]) -> None:
    w0, w1 = workers
    assert (await w0.keys.begin(1, "k1", H1)).action is Action.GO  # ... and the process dies
    assert (await w1.keys.begin(1, "k1", H1)).action is Action.BUSY
    assert await requests.reconcile(w0.spool, w0.astore, 0, time.time(), TTL) == (0, 1)
    assert (await w1.run("k1", H1)).action is Action.GO
    assert (w0.messages(), w1.messages()) == (0, 1)


async def test_a_cancelled_request_is_settled_by_the_next_one_on_its_worker(workers: tuple[Worker, Worker]) -> None:
    w0, w1 = workers
    assert (await w0.keys.begin(1, "k1", H1)).action is Action.GO
    await w0.commit("k1", H1)
    w0.keys.forget(1, "k1")  # cancelled after the commit: the store was not told
    assert await w0.keys.begin(1, "k1", H1) == Verdict(Action.REPLAY, 202, RESPONSE)  # the spool knows
    assert await w1.keys.begin(1, "k1", H1) == Verdict(Action.REPLAY, 202, RESPONSE)  # and now the store
    assert (w0.messages(), w1.messages()) == (1, 0)


async def test_reconcile_copies_spool_keys_the_store_never_had(workers: tuple[Worker, Worker]) -> None:
    """A spool written by a cmcd before the store kept claims (or a store restored from a backup)."""
    w0, w1 = workers
    await w0.commit("old-1", H1)
    await w0.commit("old-2", H2, rcpt="s@dst.test")
    assert await requests.reconcile(w0.spool, w0.astore, 0, time.time(), TTL) == (2, 0)
    assert await requests.reconcile(w0.spool, w0.astore, 0, time.time(), TTL) == (0, 0)  # once
    assert await w1.keys.begin(1, "old-2", H2) == Verdict(Action.REPLAY, 202, RESPONSE)
    assert (w0.messages(), w1.messages()) == (2, 0)


async def test_a_tenant_purge_takes_its_keys_from_the_spool_too(workers: tuple[Worker, Worker]) -> None:
    """Tenant ids are reused: a new tenant must not be answered the purged one's responses."""
    w0, _ = workers
    await w0.commit("k1", H1)
    await w0.spool.purge_tenant(1)
    assert await w0.spool.find_request(1, "k1", 0.0) is None
