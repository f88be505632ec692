"""Tenancy commands for erasing a tenant: the purge mark, the store's part of the purge and the
erase that follows it. Never touches the queue, intake or sessions: the door that purges
(cmcd/admin/purge.py) closes those first and then hands the store's part to `Tenants.purge`.

A purge is two steps that each survive a crash: `begin_purge` marks the tenant (committed before
its queue is touched), `purge` deletes every row of it in one transaction with the directory
version, the operation-log row and the clearing of the mark; `finish_erase` (checkpoint and
vacuum) then leaves no page of the file or its WAL holding the deleted rows.
"""

from __future__ import annotations

from typing import Any

from cmcd.records import Tenant
from cmcd.tenancy.core import Core, Op


class Tenants:
    def __init__(self, core: Core):
        self.core = core

    async def begin_purge(self, op: Op, name: str) -> Tenant:
        """Mark tenant NAME as being purged, so a purge cut short is finished by the next start
        (pending_purges). An unknown tenant is refused, and on record."""
        return await self.core.need(op, None, self.core.store.purge_begin, name, op.actor, op.actor_uid)

    async def pending_purges(self) -> list[dict[str, Any]]:
        """Purges begun and not committed: [{"tenant_id", "name", "actor", "actor_uid"}]."""
        return await self.core.astore.call(self.core.store.purges_pending)

    async def purge(self, op: Op, tenant: Tenant) -> dict[str, int]:
        """Delete TENANT and every row of it (users, credentials, domains and keys, suppressions,
        webhooks, logs) in one transaction with OP's row, whose detail is followed by the counts;
        the row names no tenant (it would name what was just erased). Then the erase. Returns the
        counts, after the directory in this process no longer holds the tenant."""

        def detail(counts: dict[str, int]) -> str:
            return " ".join([op.detail, *(f"{k}={v}" for k, v in counts.items())]).strip()

        counts = await self.core.change(op, None, lambda s: s.tenant_purge(tenant.name), detail=detail, removals=True)
        await self.finish_erase()
        return counts

    async def finish_erase(self) -> bool:
        """Checkpoint and vacuum after a purge (again, after a crash); False when none was pending."""
        return await self.core.astore.call(self.core.store.finish_erase)
