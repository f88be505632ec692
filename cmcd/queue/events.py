"""Ships mail-log events from the spool's outbox to the store; never touches a message body.

Events are committed in the same transaction as the messages they describe, so an accepted
message always has its record even if the daemon dies right after the 250. Shipping is
at-least-once; the store ignores an event_key it already has.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from cmcd.queue.spool import Spool, drop_events, take_events
from cmcd.store import AsyncStore

log = logging.getLogger("cmcd.events")

BATCH = 2000
INTERVAL_S = 0.5


class EventShipper:
    def __init__(self, spool: Spool, astore: AsyncStore):
        self.spool = spool
        self.astore = astore
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.shipped = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop, after shipping everything committed so far."""
        self._stop.set()
        if self._task is not None:
            await self._task
        await self.ship_all()

    async def ship_all(self) -> int:
        total = 0
        while True:
            rows = await self.spool.call(lambda conn: take_events(conn, BATCH))
            if not rows:
                return total
            await self.astore.call(self.astore.store.insert_mail_events, [r[:-1] for r in rows])
            last_id = rows[-1][-1]
            await self.spool.call(functools.partial(drop_events, up_to_id=last_id))
            total += len(rows)
            self.shipped += len(rows)

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.ship_all()
            except Exception:
                log.exception("event=mail_log_ship_failed")
            try:
                await asyncio.wait_for(self._stop.wait(), INTERVAL_S)
            except TimeoutError:
                pass
