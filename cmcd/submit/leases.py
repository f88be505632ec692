"""Daily quota leases: each process takes a tenant's messages from blocks of its daily quota reserved
in the store, so no process asks the store per message; never decides anything else about a message.

The rule: what "quota" means with several processes, and after a crash.

- The store's quota_reserved holds, per tenant and day (server.timezone), how many messages all
  processes have reserved. A reservation is one short store transaction (Store.quota_reserve):
  grant = min(want, quota - reserved), never below 0; a tenant's day starts from the messages the
  store already counts for it (daily_counts), so the total is never under what was accepted.
- A process holds per tenant and day a lease: granted - used. A message takes a unit from it with
  no store round trip. When the lease is short, the next block is reserved (one reservation in
  flight per tenant and day, which every session waiting for it shares); when it runs low, it is
  topped up ahead of need, back to one block. A block is block_size(quota, server.workers) =
  clamp(quota // (4 * workers), 1, 100) messages: small enough that the workers share a small quota
  fairly, large enough that a busy tenant costs one store transaction per block.
- A message not committed after all gives its unit back to the lease, not the store. A clean
  shutdown (Leases.close) returns what the leases still hold to the store.
- So the quota is never exceeded, by any number of processes, and the reserved total is never under
  what was accepted. After kill -9 of a process, what it held stays reserved until the day ends: the
  unused part of one block per tenant, plus the messages it was committing when it died (none of them
  got a 250). That much of the day's quota is unusable that day, never more.
- A quota lowered below what is already reserved that day refuses the tenant's further mail that
  day (each process drops its lease when it next takes from it). A raised quota is reserved from
  at once. A quota of 0 (unlimited) never comes here.

The store's last answer (the reserved total) is believed for RECHECK_S seconds: a lease that is
short while the quota was used up at that answer refuses without asking again; after that the
store is asked again (another process's clean shutdown may have given messages back).
The decision to refuse, and its words, are SubmitService's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from cmcd.store import AsyncStore

log = logging.getLogger("cmcd.submit")

#: the largest block a process reserves at a time (a batch larger than that reserves what it needs)
MAX_BLOCK = 100
#: seconds the store's answer (how much every process has reserved) is believed without asking again
RECHECK_S = 30.0
#: blocks this small are not topped up ahead of need (the quota is small: fairness before latency)
MIN_TOP_UP_BLOCK = 4
#: the results a reservation is counted by (cmcd_quota_lease_reservations_total)
RESULTS = ("full", "short", "none", "failed")


def block_size(quota: int, workers: int) -> int:
    """The messages a process reserves at a time from a daily QUOTA shared by WORKERS processes."""
    return max(1, min(MAX_BLOCK, quota // (4 * max(1, workers))))


#: store round trips one take() makes before it gives up (a grant of nothing that is no refusal)
MAX_ASKS = 3


class LeaseUnavailable(Exception):
    """The lease was short and the store could not be asked for more (it is logged)."""


@dataclass
class _Lease:
    """One tenant's day in this process (mutable: the process's own state, never shared)."""

    left: int = 0  # granted by the store, not taken yet
    quota: int = 0  # the quota of the store's last answer (0: none yet)
    reserved: int = 0  # every process's reserved total at the store's last answer
    answered_at: float | None = None  # when the store last answered
    pending: asyncio.Task[bool] | None = None  # the one reservation in flight


class Leases:
    """This process's leases, keyed by (tenant id, day); see the module docstring."""

    def __init__(self, astore: AsyncStore, workers: Callable[[], int]):
        self.astore = astore
        self.workers = workers
        self._leases: dict[tuple[int, str], _Lease] = {}
        self._day = ""  # the latest day seen: leases of earlier days are dropped when it turns
        self._closed = False
        #: store round trips by result, and messages reserved and returned (read by /metrics)
        self.reservations: dict[str, int] = dict.fromkeys(RESULTS, 0)
        self.reserved_messages = 0
        self.returned_messages = 0

    def block(self, quota: int) -> int:
        return block_size(quota, self.workers())

    # -- taking ------------------------------------------------------------------------------

    def room(self, tenant_id: int, day: str, quota: int, now: float) -> int:
        """How many messages TENANT_ID may still have on DAY, as far as this process knows without
        asking the store (an upper bound: take() is the decision)."""
        lease = self._leases.get((tenant_id, day))
        if lease is None:
            return quota
        if lease.quota != quota or not self._believed(lease, now):  # the store would have to say
            return max(quota, lease.left)
        return self._known_room(lease, quota)

    async def take(self, tenant_id: int, day: str, quota: int, n: int, now: float) -> bool:
        """Take N messages of TENANT_ID's QUOTA (> 0) on DAY from the lease, reserving from the
        store when it is short: True if taken, False if the quota has no room for N.
        Raises LeaseUnavailable when the store had to be asked and could not be."""
        key = (tenant_id, day)
        lease = self._lease(key)
        asked = 0
        while True:
            lowered = quota < lease.quota and lease.left > 0  # since the store last answered: ask it first
            if not lowered and lease.left >= n:
                lease.left -= n
                self._top_up(key, lease, quota, now)
                return True
            if lease.pending is not None:  # another session's reservation (or a top-up) is on its way: share it
                await self._wait(lease.pending)
            elif lowered:  # what is reserved over the new quota drops the lease (_reserve)
                await self._ask(key, lease, 0, quota, now)
            elif lease.quota == quota and self._believed(lease, now) and self._known_room(lease, quota) < n:
                return False
            elif asked >= MAX_ASKS:  # the store grants nothing and refuses nothing: a tenant purged meanwhile
                return False
            else:
                asked += 1
                await self._ask(key, lease, max(self.block(quota), n) - lease.left, quota, now)
            if self._leases.get(key) is not lease:  # forgotten meanwhile (a purge, a new day): start again
                lease = self._lease(key)

    def give_back(self, tenant_id: int, day: str, n: int) -> None:
        """N messages taken were not committed after all: back to the lease (if it is still there)."""
        lease = self._leases.get((tenant_id, day))
        if lease is not None:
            lease.left += n

    def forget(self, tenant_id: int) -> None:
        """Drop TENANT_ID's leases without returning them (its purge deletes its reservations)."""
        for key in [k for k in self._leases if k[0] == tenant_id]:
            del self._leases[key]

    async def close(self) -> None:
        """A clean shutdown: wait for reservations in flight, then return every lease's unused part."""
        self._closed = True
        for lease in list(self._leases.values()):
            if lease.pending is not None:
                with contextlib.suppress(LeaseUnavailable):  # logged; nothing more came of it
                    await self._wait(lease.pending)
        for (tenant_id, day), lease in list(self._leases.items()):
            if lease.left <= 0 or day != self._day:
                continue
            unused, lease.left = lease.left, 0
            try:
                await self.astore.call(self.astore.store.quota_return, tenant_id, day, unused)
            except Exception as exc:  # it stays reserved: that much of the day's quota is unusable
                log.warning("event=quota_return_failed tenant_id=%d day=%s messages=%d error=%r",
                            tenant_id, day, unused, str(exc))  # fmt: skip
                continue
            self.returned_messages += unused
        self._leases.clear()

    # -- the store ---------------------------------------------------------------------------

    def _lease(self, key: tuple[int, str]) -> _Lease:
        lease = self._leases.get(key)
        if lease is None:
            if key[1] > self._day:  # a new day: the past days' leases are of no use any more
                self._day = key[1]
                self._leases = {k: v for k, v in self._leases.items() if k[1] >= key[1]}
            lease = self._leases[key] = _Lease()
        return lease

    @staticmethod
    def _believed(lease: _Lease, now: float) -> bool:
        return lease.answered_at is not None and now - lease.answered_at < RECHECK_S

    @staticmethod
    def _known_room(lease: _Lease, quota: int) -> int:
        return lease.left + max(0, quota - lease.reserved)

    def _top_up(self, key: tuple[int, str], lease: _Lease, quota: int, now: float) -> None:
        """Reserve ahead of need when the lease runs low, so a busy tenant's sessions seldom wait
        for the store; never past one block held, never while the quota is believed used up."""
        block = self.block(quota)
        if self._closed or block < MIN_TOP_UP_BLOCK or lease.pending is not None or lease.left > block // 4:
            return
        if lease.quota != quota or lease.reserved >= quota:  # nothing left to reserve as far as is known
            return
        lease.pending = asyncio.get_running_loop().create_task(
            self._reserve(key, lease, block - lease.left, quota, now)
        )

    async def _ask(self, key: tuple[int, str], lease: _Lease, want: int, quota: int, now: float) -> None:
        lease.pending = asyncio.get_running_loop().create_task(self._reserve(key, lease, want, quota, now))
        await self._wait(lease.pending)

    @staticmethod
    async def _wait(pending: asyncio.Task[bool]) -> None:
        """Wait for a reservation (a session that goes away does not cancel it for the others)."""
        if not await asyncio.shield(pending):
            raise LeaseUnavailable

    async def _reserve(self, key: tuple[int, str], lease: _Lease, want: int, quota: int, now: float) -> bool:
        """One round trip: reserve WANT messages for KEY; False if the store could not be asked."""
        tenant_id, day = key
        try:
            granted, reserved = await self.astore.call(self.astore.store.quota_reserve, tenant_id, day, want, quota)
        except Exception as exc:
            self.reservations["failed"] += 1
            log.warning("event=quota_reserve_failed tenant_id=%d day=%s error=%r", tenant_id, day, str(exc))
            return False
        finally:
            lease.pending = None
        if want:
            self.reservations["full" if granted == want else "short" if granted else "none"] += 1
        self.reserved_messages += granted
        lease.left += granted
        lease.quota, lease.reserved, lease.answered_at = quota, reserved, now
        if reserved > quota:  # the quota was lowered below what is reserved: nothing more today
            lease.left = 0
        return True
