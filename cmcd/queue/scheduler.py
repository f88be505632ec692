"""The scheduler: hands due recipients to the delivery engine, and sleeps until the next one is due.

Each round is one claim through the partial index on next_attempt (cost proportional to
what is due). Between rounds it sleeps until the earliest next_attempt, a commit, a bounce
or an operator's retry wakes it, so a million deferred recipients cost nothing while none
is due. At most max_inflight recipients are out at once; the engine gives them back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from cmcd.queue.spool import Spool
from cmcd.queue.work import Job

log = logging.getLogger("cmcd.scheduler")

BATCH = 1000
MAX_SLEEP_S = 60.0
MIN_SLEEP_S = 0.01


class Scheduler:
    def __init__(
        self,
        spool: Spool,
        dispatch: Callable[[list[Job]], None],
        *,
        max_inflight: int,
        clock: Callable[[], float] = time.time,
    ):
        self.spool = spool
        self.dispatch = dispatch
        self.max_inflight = max_inflight
        self.clock = clock
        self.inflight = 0
        self.claimed = 0
        self.rounds = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    def wake(self) -> None:
        """New work may be due (a commit, a bounce, an operator's retry or release)."""
        self._wake.set()

    def release(self, n: int) -> None:
        """N claimed recipients reached an outcome (or were dropped); room for more."""
        full = self.inflight >= self.max_inflight
        self.inflight -= n
        if full and self.inflight < self.max_inflight:
            self._wake.set()

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                timeout = await self._round()
            except Exception:
                log.exception("event=scheduler_round_failed")
                timeout = 1.0
            if timeout is None:
                continue  # claimed a full batch: there may be more due right now
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    async def _round(self) -> float | None:
        """Claim what is due; return how long to sleep, or None to go again at once."""
        room = self.max_inflight - self.inflight
        if room <= 0:
            return MAX_SLEEP_S  # release() wakes us
        limit = min(room, BATCH)
        jobs = await self.spool.claim_due(self.clock(), limit)
        if jobs:
            n = sum(len(j.recipients) for j in jobs)
            self.inflight += n
            self.claimed += n
            self.rounds += 1
            self.dispatch(jobs)
            if n >= limit:
                return None
        due = await self.spool.next_due()
        if due is None:
            return MAX_SLEEP_S
        return min(MAX_SLEEP_S, max(MIN_SLEEP_S, due - self.clock()))
