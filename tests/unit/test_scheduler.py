"""The scheduler with a fake clock and a handler that records what it is handed; a real spool in tmp_path."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cmcd.crypto import DataKeys
from cmcd.queue.ids import QueueIdGenerator
from cmcd.queue.scheduler import MAX_SLEEP_S, Scheduler
from cmcd.queue.spool import Spool
from cmcd.queue.work import Job
from cmcd.records import Recipient, SpoolMessage

T0 = 1_794_999_600.0
WAIT_S = 10.0  # a failsafe only: every wait below ends on a condition


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Handler:
    """The delivery engine's side: records each dispatch and lets a test wait for the next one."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self._changed = asyncio.Event()

    def __call__(self, jobs: list[Job]) -> None:
        self.jobs += jobs
        self._changed.set()

    def recipients(self) -> int:
        return sum(len(j.recipients) for j in self.jobs)

    async def until(self, recipients: int) -> None:
        async def wait() -> None:
            while self.recipients() < recipients:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), WAIT_S)


class Parts:
    def __init__(self, spool: Spool, clock: Clock, handler: Handler):
        self.spool, self.clock, self.handler = spool, clock, handler
        self.ids = QueueIdGenerator()
        self.scheduler: Scheduler | None = None

    def start(self, max_inflight: int = 100) -> Scheduler:
        self.scheduler = Scheduler(self.spool, self.handler, max_inflight=max_inflight, clock=self.clock)
        self.spool.on_commit = self.scheduler.wake
        self.scheduler.start()
        return self.scheduler

    async def queue(self, *rcpts: str, at: float = T0) -> str:
        qid = self.ids.next(at)
        recipients = tuple(Recipient(r, r.rpartition("@")[2]) for r in rcpts)
        await self.spool.commit(SpoolMessage(qid, 1, 1, "a@acme.test", recipients, b"x\r\n", at), "2026-11-18")
        return qid


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[Parts]:
    spool = Spool(tmp_path / "spool", DataKeys(os.urandom(32), os.urandom(32)))
    spool.start()
    p = Parts(spool, Clock(T0), Handler())
    try:
        yield p
    finally:
        if p.scheduler is not None:
            await p.scheduler.close()
        spool.stop()


async def test_a_commit_wakes_it_and_due_recipients_are_handed_over_by_message_and_domain(parts: Parts) -> None:
    scheduler = parts.start()
    qid = await parts.queue("r1@dst.test", "r2@dst.test", "r3@other.test")
    await parts.handler.until(3)
    assert sorted((j.queue_id, j.domain, len(j.recipients)) for j in parts.handler.jobs) == [
        (qid, "dst.test", 2),
        (qid, "other.test", 1),
    ]
    assert (scheduler.inflight, scheduler.claimed) == (3, 3)
    scheduler.release(3)
    assert scheduler.inflight == 0


async def test_nothing_is_handed_over_before_it_is_due_on_the_clock(parts: Parts) -> None:
    scheduler = parts.start()
    await parts.queue("r1@dst.test", at=T0 + 3600)  # due in an hour of the fake clock
    await parts.queue("r2@dst.test")  # due now: the round that hands it over saw the later one too
    await parts.handler.until(1)
    assert [j.recipients[0].address for j in parts.handler.jobs] == ["r2@dst.test"]
    assert await scheduler._round() == MAX_SLEEP_S  # one hour away: the longest sleep, until woken
    parts.clock.now = T0 + 3600
    scheduler.wake()
    await parts.handler.until(2)
    assert parts.handler.jobs[-1].recipients[0].address == "r1@dst.test"


async def test_at_most_max_inflight_are_out_and_a_release_makes_room(parts: Parts) -> None:
    scheduler = parts.start(max_inflight=2)
    await parts.queue("r1@a.test", "r2@b.test", "r3@c.test")
    await parts.handler.until(2)
    assert scheduler.inflight == 2
    assert await scheduler._round() == MAX_SLEEP_S  # full: it waits for release(), whatever is due
    assert parts.handler.recipients() == 2
    scheduler.release(1)
    await parts.handler.until(3)
    assert scheduler.inflight == 2
    assert sorted(j.domain for j in parts.handler.jobs) == ["a.test", "b.test", "c.test"]


async def test_claimed_recipients_are_never_handed_over_twice(parts: Parts) -> None:
    scheduler = parts.start()
    await parts.queue("r1@dst.test")
    await parts.handler.until(1)
    parts.clock.now = T0 + 86400
    assert await scheduler._round() == MAX_SLEEP_S  # nothing waiting: the inflight one is not due again
    assert parts.handler.recipients() == 1
