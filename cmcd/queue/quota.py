"""Daily message counts per tenant: committed in the spool with the messages, kept for good in the store.

The store holds the count of every process: the record of what each tenant had accepted. What
limits is not this count but the store's reservations, taken in blocks by each process
(cmcd/submit/leases.py); a tenant's first reservation of a day starts from this count, so it is
shipped once before a process takes mail (SubmitService.start). A commit cannot span the spool
and the store, so each commit of messages adds its counts to the spool's counts outbox in its own
transaction, and ship() moves them to the store: the store adds rows past the last outbox id it
has from this spool and records that id in the same transaction, so a shipment repeated after a
crash adds nothing twice, and a count is never lost. Never decides whether a message may be taken.
"""

from __future__ import annotations

from cmcd.queue.spool import Spool
from cmcd.store import AsyncStore

BATCH = 2000


async def daily_counts(spool: Spool, astore: AsyncStore, day: str) -> dict[int, int]:
    """Messages each tenant has had accepted on DAY: the store's count and what this spool has not
    shipped yet (read together, with no shipment between them)."""
    async with spool.counts_lock:
        counts, up_to = await astore.call(astore.store.daily_counts, day, spool.spool_id)
        for tenant_id, n in (await spool.unshipped_counts(day, up_to)).items():
            counts[tenant_id] = counts.get(tenant_id, 0) + n
        return counts


async def ship(spool: Spool, astore: AsyncStore) -> int:
    """Move the spool's counts outbox to the store; returns the outbox rows shipped."""
    total = 0
    async with spool.counts_lock:
        while True:
            rows = await spool.take_counts(BATCH)
            if not rows:
                return total
            await astore.call(astore.store.add_daily_counts, spool.spool_id, rows)
            await spool.drop_counts(rows[-1][0])
            total += len(rows)
