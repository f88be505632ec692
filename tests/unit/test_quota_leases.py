"""The daily quota across processes: the store's reservations (grant, clip, return, a new day, the
start from daily_counts) and the leases taken from them (cmcd/submit/leases.py), on real stores in a
temporary directory; two lease holders on one store file stand for two worker processes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cmcd.store import AsyncStore, Store, open_store
from cmcd.submit import refusals
from cmcd.submit.leases import MAX_BLOCK, RECHECK_S, Leases, LeaseUnavailable, block_size
from cmcd.submit.refusals import Accepted
from tests.unit.test_intake_refusals import BODY, INFO, running

T0 = 1_794_999_600.0
DAY = "2026-11-18"


def _store(root: Path) -> Store:
    return open_store(root / "cmcd.db", root / "data.key")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = _store(tmp_path)
    s.tenant_add("acme")
    s.tenant_add("beta")
    yield s
    s.close()


def _id(store: Store, name: str) -> int:
    return store.tenant(name).id


# -- the store's reservations -----------------------------------------------------------------


def test_a_reservation_is_granted_then_clipped_at_the_quota(store: Store) -> None:
    acme = _id(store, "acme")
    assert store.quota_reserve(acme, DAY, 4, 10) == (4, 4)
    assert store.quota_reserve(acme, DAY, 4, 10) == (4, 8)
    assert store.quota_reserve(acme, DAY, 4, 10) == (2, 10)  # clipped
    assert store.quota_reserve(acme, DAY, 4, 10) == (0, 10)  # used up
    assert store.quota_reserve(_id(store, "beta"), DAY, 4, 10) == (4, 4)  # another tenant's own


def test_an_unused_remainder_returned_can_be_reserved_again(store: Store) -> None:
    acme = _id(store, "acme")
    store.quota_reserve(acme, DAY, 10, 10)
    assert store.quota_return(acme, DAY, 3) == 7
    assert store.quota_reserve(acme, DAY, 5, 10) == (3, 10)
    assert store.quota_return(acme, "2026-11-01", 3) == 0  # no row: nothing to return to


def test_a_new_day_starts_from_zero_and_old_days_go(store: Store) -> None:
    acme = _id(store, "acme")
    store.quota_reserve(acme, "2026-11-15", 10, 10)
    store.quota_reserve(acme, "2026-11-17", 10, 10)
    assert store.quota_reserve(acme, DAY, 4, 10) == (4, 4)
    assert store.quota_reserved(acme, "2026-11-17") == 10  # yesterday stays (a process just past midnight)
    assert store.quota_reserved(acme, "2026-11-15") == 0  # older days are dropped with the new day's first


def test_the_first_reservation_of_a_day_starts_from_the_counted_messages(store: Store) -> None:
    acme = _id(store, "acme")
    # accepted and shipped by a process that did not reserve (a cmcd before leases)
    store.add_daily_counts("spool-a", [(1, acme, DAY, 7)])
    assert store.quota_reserve(acme, DAY, 5, 10) == (3, 10)
    beta = _id(store, "beta")
    store.add_daily_counts("spool-a", [(2, beta, DAY, 12)])  # over the quota already
    assert store.quota_reserve(beta, DAY, 5, 10) == (0, 12)


def test_a_lowered_quota_grants_nothing_and_a_purged_tenant_leaves_no_reservation(store: Store) -> None:
    acme = _id(store, "acme")
    store.quota_reserve(acme, DAY, 8, 10)
    assert store.quota_reserve(acme, DAY, 5, 6) == (0, 8)
    assert store.tenant_purge("acme")["quota_reserved"] == 1
    assert store.quota_reserve(acme, DAY, 5, 10) == (0, 0)  # gone: nothing granted, no row written


# -- leases -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quota", "workers", "block"),
    [
        (1, 1, 1),
        (4, 1, 1),
        (40, 2, 5),
        (1000, 1, 100),
        (1000, 2, 100),
        (1000, 4, 62),
        (100_000, 16, MAX_BLOCK),
        (10, 16, 1),
    ],
    ids=["one", "tiny", "small-shared", "one-worker", "two-workers", "four-workers", "large", "many-workers"],
)
def test_block_size(quota: int, workers: int, block: int) -> None:
    assert block_size(quota, workers) == block


class Holder:
    """One process's view: its own store connection and its own leases."""

    def __init__(self, root: Path, workers: int = 2):
        self.astore = AsyncStore(_store(root))
        self.leases = Leases(self.astore, lambda: workers)

    async def take(self, tenant_id: int, quota: int, n: int = 1, now: float = T0, day: str = DAY) -> bool:
        return await self.leases.take(tenant_id, day, quota, n, now)

    def reserved(self, tenant_id: int, day: str = DAY) -> int:
        return self.astore.store.quota_reserved(tenant_id, day)

    def trips(self) -> int:
        return sum(self.leases.reservations.values())


@pytest.fixture
async def holders(tmp_path: Path, store: Store) -> AsyncIterator[tuple[Holder, Holder]]:
    a, b = Holder(tmp_path), Holder(tmp_path)
    yield a, b
    for h in (a, b):
        await h.leases.close()
        h.astore.close()


async def test_a_block_serves_many_messages_and_concurrent_takes_share_one_reservation(
    store: Store, holders: tuple[Holder, Holder]
) -> None:
    a, _ = holders
    acme = _id(store, "acme")
    assert all(await asyncio.gather(*(a.take(acme, 1000) for _ in range(40))))
    assert a.leases.reservations == {"full": 1, "short": 0, "none": 0, "failed": 0}
    assert a.reserved(acme) == 100  # one block (1000 // (4 * 2), at most 100)
    assert a.leases.room(acme, DAY, 1000, T0) == 960


async def test_a_message_not_committed_goes_back_to_the_lease_not_the_store(
    store: Store, holders: tuple[Holder, Holder]
) -> None:
    a, _ = holders
    acme = _id(store, "acme")
    assert await a.take(acme, 8)  # block 1: the lease is one message
    a.leases.give_back(acme, DAY, 1)
    assert await a.take(acme, 8)
    assert a.leases.reservations["full"] == 1 and a.reserved(acme) == 1


async def test_two_processes_never_exceed_the_quota_together(store: Store, holders: tuple[Holder, Holder]) -> None:
    acme = _id(store, "acme")
    quota = 37
    taken = [0, 0]
    while True:  # rounds: two sessions on each process at once, until every one is refused
        results = await asyncio.gather(*(h.take(acme, quota) for h in holders for _ in range(2)))
        if not any(results):
            break
        taken = [taken[0] + sum(results[:2]), taken[1] + sum(results[2:])]
    assert sum(taken) == quota and all(taken)
    assert holders[0].reserved(acme) == quota
    assert all(h.trips() < quota for h in holders)  # blocks, not a round trip a message


async def test_a_batch_takes_all_or_nothing(store: Store, holders: tuple[Holder, Holder]) -> None:
    a, b = holders
    acme = _id(store, "acme")
    assert await b.take(acme, 10, 6)
    assert not await a.take(acme, 10, 5)  # 4 are left: none of the 5 is taken
    assert await a.take(acme, 10, 4)  # what the short answer granted stays in the lease
    assert not await a.take(acme, 10)
    assert a.reserved(acme) == 10


async def test_a_clean_shutdown_returns_the_unused_part(store: Store, holders: tuple[Holder, Holder]) -> None:
    a, b = holders
    acme = _id(store, "acme")
    for _ in range(3):
        assert await a.take(acme, 80)  # block 10
    await a.leases.close()
    assert a.reserved(acme) == 3 and a.leases.returned_messages == 7
    for _ in range(77):
        assert await b.take(acme, 80)
    assert not await b.take(acme, 80)


async def test_after_a_crash_the_quota_is_never_exceeded_and_at_most_a_block_is_lost(
    store: Store, tmp_path: Path
) -> None:
    acme = _id(store, "acme")
    quota = 80  # block 10 with two workers
    dead = Holder(tmp_path)
    for _ in range(3):
        assert await dead.take(acme, quota)
    dead.astore.close()  # kill -9: the lease is never returned
    survivor = Holder(tmp_path)
    n = 0
    while await survivor.take(acme, quota):
        n += 1
    accepted = 3 + n
    assert accepted <= quota and quota - accepted <= block_size(quota, 2)  # over by one block at most, never under
    assert survivor.reserved(acme) == quota >= accepted
    await survivor.leases.close()
    survivor.astore.close()


async def test_a_new_day_starts_new_leases(store: Store, holders: tuple[Holder, Holder]) -> None:
    a, _ = holders
    acme = _id(store, "acme")
    assert await a.take(acme, 2, 2)
    assert not await a.take(acme, 2)
    assert await a.take(acme, 2, day="2026-11-19", now=T0 + 86400)
    assert a.leases.room(acme, DAY, 2, T0 + 86400) == 2  # yesterday's lease is gone (nothing known)


async def test_a_quota_lowered_below_what_is_reserved_refuses_the_rest_of_the_day(
    store: Store, holders: tuple[Holder, Holder]
) -> None:
    a, b = holders
    acme = _id(store, "acme")
    assert await a.take(acme, 800)  # a holds 99 of its block of 100
    assert await b.take(acme, 800)
    assert not await a.take(acme, 150)  # 200 reserved > 150: the lease is dropped, not used
    assert not await b.take(acme, 150)
    assert a.reserved(acme) == 200
    assert await a.take(acme, 1000)  # raised: reserved from at once


async def test_used_up_is_believed_for_a_while_then_asked_again(store: Store, holders: tuple[Holder, Holder]) -> None:
    a, b = holders
    acme = _id(store, "acme")
    assert await b.take(acme, 8)  # block 1
    for _ in range(7):
        assert await a.take(acme, 8)
    assert not await a.take(acme, 8)
    trips = a.trips()
    assert not await a.take(acme, 8, now=T0 + 1)
    assert a.trips() == trips and a.leases.room(acme, DAY, 8, T0 + 1) == 0  # believed: no round trip
    b.leases.give_back(acme, DAY, 1)  # b's message was not committed after all; b shuts down
    await b.leases.close()
    assert not await a.take(acme, 8, now=T0 + 2)  # still believed
    assert a.leases.room(acme, DAY, 8, T0 + RECHECK_S) == 8  # time to ask again: the store will say
    assert await a.take(acme, 8, now=T0 + RECHECK_S)
    assert not await a.take(acme, 8, now=T0 + RECHECK_S)


async def test_a_store_that_does_not_answer_is_an_error_not_a_refusal(tmp_path: Path, store: Store) -> None:
    acme = _id(store, "acme")
    h = Holder(tmp_path)
    h.astore.store.close()  # every call now fails
    with pytest.raises(LeaseUnavailable):
        await h.take(acme, 10)
    assert h.leases.reservations["failed"] == 1
    h.astore.close()


async def test_topped_up_ahead_of_need_and_returned_on_close(store: Store, holders: tuple[Holder, Holder]) -> None:
    a, _ = holders
    acme = _id(store, "acme")
    for _ in range(76):  # a block of 100: at 25 left the lease is topped up in the background, back to 100
        assert await a.take(acme, 10_000)
    await a.leases.close()  # waits for the top-up, then returns what is unused
    assert a.leases.reserved_messages == 175 and a.leases.returned_messages == 99
    assert a.reserved(acme) == 76
    assert a.leases.reservations["full"] == 2


# -- SubmitService with leases ----------------------------------------------------------------


async def test_unlimited_never_touches_leases(tmp_path: Path) -> None:
    async with running(tmp_path, messages_per_day=0) as intake:
        service, sender = intake.service, intake.sender
        for _ in range(3):
            assert isinstance(await service.finish(sender, "alice@acme.test", ["b@example.net"], BODY, INFO), Accepted)
        assert sum(service.leases.reservations.values()) == 0


async def test_the_service_returns_its_leases_when_it_closes(tmp_path: Path) -> None:
    async with running(tmp_path, messages_per_day=400) as intake:  # block 50 with two workers
        service, sender = intake.service, intake.sender
        assert isinstance(await service.finish(sender, "alice@acme.test", ["b@example.net"], BODY, INFO), Accepted)
        store, tenant_id = service.astore.store, sender.tenant_id
        assert store.quota_reserved(tenant_id, DAY) == block_size(400, service.config.server.workers)
    assert service.leases.reserved_messages - service.leases.returned_messages == 1


async def test_a_purged_tenant_is_refused_as_closing_not_over_quota(tmp_path: Path) -> None:
    async with running(tmp_path) as intake:
        service, sender = intake.service, intake.sender
        assert isinstance(await service.finish(sender, "alice@acme.test", ["b@example.net"], BODY, INFO), Accepted)
        service.close_tenant(sender.tenant_id, ("alice",))
        result = await service.finish(sender, "alice@acme.test", ["b@example.net"], BODY, INFO)
        assert result is refusals.TENANT_CLOSING
