"""The delivery engine's results writer: outcomes into the spool in batches, the commit window, checkpoints
after erasure; never speaks SMTP or decides an outcome.

Every claimed recipient yields exactly one Result; results are written to the spool in
batches (one transaction per batch, bounces and body erasure included). The window in which a
kill -9 causes a duplicate is the remote's 250 to that commit, so it is kept short: a result
starts a write at once unless one is already waiting for the writer thread, and that waiting
write takes every result that arrived until the writer thread runs it (never a batch fixed
while an earlier one was still being written). What remains is the writer thread's current
work and the fsync of the outcome's own commit (commit_window_ms, in `cmcctl status`).
Bodies are deleted with secure_delete; a checkpoint then moves the zeroed pages out of the WAL.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable

from cmcd.queue.ids import QueueIdGenerator
from cmcd.queue.spool import Spool
from cmcd.queue.work import Result
from cmcd.records import RESULT_STATES, RecipientState
from cmcd.stats import DELIVERY_BUCKETS_S, Histogram

log = logging.getLogger("cmcd.deliver")

CHECKPOINT_INTERVAL_S = 1.0


class ResultsWriter:
    """Takes every Result the engine knows, counts it and writes it to the spool; see the module docstring."""

    def __init__(
        self,
        spool: Spool,
        *,
        hostname: Callable[[], str],
        release: Callable[[int], None],
        wake: Callable[[], None],
        dsn_off: Callable[[], frozenset[int]],
        clock: Callable[[], float],
        mono: Callable[[], float],
    ):
        self.spool = spool
        self.hostname = hostname  # the configured server.hostname now (a reload may change it): bounces' From
        self.release = release  # tells the scheduler how many claimed recipients are done
        self.wake = wake  # tells the scheduler new work was queued (a bounce)
        self.dsn_off = dsn_off
        self.clock = clock
        self.mono = mono
        self.ids = QueueIdGenerator()
        #: outcomes not yet handed to the writer thread, and when each was known (mono); the writer
        #: thread takes them (under the lock) when it runs the write that is waiting for it
        self._results: list[Result] = []
        self._stamps: list[float] = []
        self._results_lock = threading.Lock()
        self._write_waiting = False  # a write is queued on the writer thread and has not started
        self._write_paused = False  # a write failed: the next one waits for its retry
        self._writes: set[asyncio.Task[None]] = set()
        self.commit_windows: deque[float] = deque(maxlen=20000)  # seconds, remote reply to outcome committed
        self._erased = False
        self._checkpointer: asyncio.Task[None] | None = None
        self._closing = False
        self.counts: dict[str, int] = dict.fromkeys(RESULT_STATES, 0)
        self.delivery_seconds = Histogram(DELIVERY_BUCKETS_S)  # received to final state, read by /metrics

    def start(self) -> None:
        self._checkpointer = asyncio.get_running_loop().create_task(self._checkpoint_loop())

    def closing(self) -> None:
        """The engine is closing: a failed write no longer waits to retry (close() makes the last try)."""
        self._closing = True

    async def close(self) -> None:
        """Stop checkpointing and write every outcome already known (one last try after a failed write)."""
        self._closing = True
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            await asyncio.gather(self._checkpointer, return_exceptions=True)
        while self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        if self._results:  # a write failed and its retry was cancelled: one last try
            self._write_paused = False
            self._start_write()
            await asyncio.gather(*self._writes, return_exceptions=True)

    def commit_window_ms(self) -> dict[str, float]:
        """Remote reply to outcome committed, over the last results: p50, p99, max (milliseconds)."""
        w = sorted(self.commit_windows)
        if not w:
            return {"n": 0, "p50": 0.0, "p99": 0.0, "max": 0.0}
        pick = lambda q: round(w[min(len(w) - 1, int(q * len(w)))] * 1000, 2)  # noqa: E731
        return {"n": len(w), "p50": pick(0.5), "p99": pick(0.99), "max": round(w[-1] * 1000, 2)}

    def erased(self) -> None:
        """A body was deleted outside the engine (an operator's delete): checkpoint soon."""
        self._erased = True

    def add(self, result: Result) -> None:
        """One recipient's outcome: counted now, written by the write waiting for the writer thread (or a new one)."""
        self.counts[result.state] = self.counts.get(result.state, 0) + 1
        if result.state != RecipientState.DEFERRED:
            self.delivery_seconds.observe(self.clock() - result.job.received)
        with self._results_lock:
            self._results.append(result)
            self._stamps.append(self.mono())
            if self._write_waiting or self._write_paused:
                return  # the waiting write takes this one too
            self._write_waiting = True
        self._start_write(queued=True)

    def _start_write(self, *, queued: bool = False) -> None:
        if not queued:
            with self._results_lock:
                if self._write_waiting or not self._results:
                    return
                self._write_waiting = True
        task = asyncio.get_running_loop().create_task(self._write(self.dsn_off()))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, dsn_off: frozenset[int]) -> None:
        taken: list[tuple[list[Result], list[float]]] = []

        def take() -> list[Result]:
            """On the writer thread: every result known by now goes in this write (with its stamp)."""
            with self._results_lock:
                batch, stamps = self._results, self._stamps
                self._results, self._stamps = [], []
                self._write_waiting = False  # from here on a new result needs a write of its own
            taken.append((batch, stamps))
            return batch

        try:
            report = await self.spool.apply_results(
                take, clock=self.clock, hostname=self.hostname(), ids=self.ids, dsn_off=dsn_off, mono=self.mono
            )
        except Exception as exc:
            with self._results_lock:  # rolled back: they go first in the next write
                for batch, stamps in taken:
                    self._results[:0], self._stamps[:0] = batch, stamps
            log.error("event=results_write_failed error=%r", str(exc))  # the results wait for the retry
            if self._closing:
                return  # close() makes the last try
            self._write_paused = True
            await asyncio.sleep(1.0)
            self._write_paused = False
            self._start_write()
            return
        if not report.results:
            return
        self.commit_windows.extend(report.committed_at - t for t in taken[0][1])
        self.release(len(report.results))
        self.wake()  # a deferral may now be the earliest due time, and a bounce is new work
        if report.finished:
            self._erased = True

    async def _checkpoint_loop(self) -> None:
        """Bodies are deleted with secure_delete; a checkpoint then moves the zeroed pages out of the WAL."""
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL_S)
            if self._erased:
                self._erased = False
                try:
                    await self.spool.checkpoint()
                except Exception:
                    log.exception("event=checkpoint_failed")
