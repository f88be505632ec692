"""Ships mail-log events, daily counts, and login and operation-log rows from the spool's outbox to the store; never touches a message body.

Events and daily counts are committed in the same transaction as the messages they describe, so
an accepted message always has its record and its count even if the daemon dies right after the
250; the counts reach the store before the events (cmcd/queue/quota.py). Login and operation
rows come into the outbox only when the store could not take them (cmcd/queue/audit.py).
Shipping is at-least-once; the store ignores an event_key it already has. While the store
cannot be written, every INTERVAL_S the shipment is tried again (the first failure is logged with
its traceback, later ones once a minute).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from cmcd.bounces import BlockPolicy
from cmcd.queue import quota
from cmcd.queue.audit import AuditLog, group_by_kind
from cmcd.queue.spool import Spool
from cmcd.queue.tables import EVENT_COLUMNS
from cmcd.stats import StreamStats
from cmcd.store import AsyncStore

log = logging.getLogger("cmcd.events")

BATCH = 2000
_EVENT = EVENT_COLUMNS.index("event")  # a shipped row: the event columns, tags, bounce class, stream, outbox id
INTERVAL_S = 0.5
FAILURE_LOG_S = 60.0  # while shipping keeps failing, one log line a minute


class EventShipper:
    def __init__(
        self,
        spool: Spool,
        astore: AsyncStore,
        audit: AuditLog | None = None,
        *,
        blocks: Callable[[], BlockPolicy | None] = lambda: None,
    ):
        self.spool = spool
        self.astore = astore
        self.audit = audit
        self.blocks = blocks  # the bounce block policy now (a reload may change it); None: flags only
        if audit is not None:
            audit.on_outbox = self.wake
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self.shipped = 0
        self.audit_shipped = 0
        self.streams = StreamStats()  # the shipped events by stream, for /metrics
        self._failing_since: float | None = None
        self._failure_logged = 0.0

    def wake(self) -> None:
        """Ship now rather than at the next interval (rows just went to the outbox)."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop, after shipping everything committed so far."""
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            await self._task
        await self.ship_all()

    async def ship_all(self) -> int:
        total = await self._ship_audit()
        while True:
            rows = await self.spool.take_events(BATCH)
            # the counts of these events' messages (committed with them) reach the store first
            await quota.ship(self.spool, self.astore)
            if not rows:
                return total
            await self.astore.call(self.astore.store.insert_mail_events, [r[:-1] for r in rows], self.blocks())
            await self.spool.drop_events(rows[-1][-1])
            total += len(rows)
            self.shipped += len(rows)
            for r in rows:
                self.streams.count(r[-2], r[_EVENT])

    async def _ship_audit(self) -> int:
        """Ship the outbox's login and operation rows (and first any the AuditLog holds in memory)."""
        if self.audit is None:
            return 0
        await self.audit.retry_unwritten()
        store = self.astore.store
        total = 0
        while True:
            rows = await self.spool.take_audit(BATCH)
            if not rows:
                return total
            kinds = group_by_kind(rows)
            if kinds["login"]:
                await self.astore.call(store.log_logins, kinds["login"])
            if kinds["ops"]:
                await self.astore.call(store.log_ops, kinds["ops"])
            await self.spool.drop_audit(rows[-1][0])
            total += len(rows)
            self.audit_shipped += len(rows)

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                shipped = await self.ship_all()
            except Exception as exc:
                now = time.monotonic()
                if self._failing_since is None:
                    self._failing_since = now
                    self._failure_logged = now
                    log.exception("event=outbox_ship_failed")
                elif now - self._failure_logged >= FAILURE_LOG_S:
                    self._failure_logged = now
                    log.error("event=outbox_ship_failed failing_s=%.0f error=%r", now - self._failing_since, str(exc))
            else:
                if self._failing_since is not None:
                    log.info(
                        "event=outbox_ship_recovered failing_s=%.1f shipped=%d",
                        time.monotonic() - self._failing_since,
                        shipped,
                    )
                    self._failing_since = None
            try:
                await asyncio.wait_for(self._wake.wait(), INTERVAL_S)
            except TimeoutError:
                pass
            self._wake.clear()
