"""Erasing a tenant (`tenant.delete --purge`), and finishing at start a purge a crash cut short.

This module orchestrates what spans the daemon: intake closed to the tenant, its SMTP sessions
dropped, its queue purged (the spool; with workers, every worker's shard through Context.peers),
then the store's part through the tenancy command
(cmcd.tenancy.tenants: every row in one transaction with the operation-log row, then the erase),
which returns once the directory no longer holds the tenant; only then is intake reopened (the
tenant's number may be given to a new tenant). Never deletes a store row itself.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from cmcd.admin.verb import Args, BadRequest, Context, Peers, Verb, command
from cmcd.errors import CmcdError
from cmcd.records import Tenant
from cmcd.tenancy import Op

log = logging.getLogger("cmcd.admin")


async def _tenant_delete(ctx: Context, a: Args) -> Any:
    name = a.text("name")
    if not a.flag("purge"):
        raise BadRequest("tenant.delete: a tenant is only removed with everything it owns; pass purge: true")
    actor, actor_uid = a.actor
    # marked first: a purge cut short (kill -9 after the queue went, before the store's
    # transaction committed) is finished by the next start (resume)
    tenant = await ctx.tenancy.tenants.begin_purge(a.op, name)
    result = await _purge(ctx, tenant, actor, actor_uid)
    return {"tenant": name} | result


async def resume(ctx: Context) -> None:
    """Finish what a crash (kill -9, power loss) cut short: a tenant purge begun and not
    committed is run again from the start; a committed one's checkpoint and vacuum are redone."""
    tenants = ctx.tenancy.tenants
    try:
        pending = await tenants.pending_purges()
        if pending and ctx.peers is not None:
            await _peers_up(ctx.peers)
        for p in pending:
            log.warning("event=tenant_purge_resumed tenant_id=%d", p["tenant_id"])
            tenant = Tenant(id=p["tenant_id"], name=p["name"])
            await _purge(ctx, tenant, p["actor"], p["actor_uid"], note="resumed after a restart; ")
        if await tenants.finish_erase():
            log.warning("event=tenant_purge_erase_finished reason=interrupted")
    except Exception:
        log.exception("event=tenant_purge_resume_failed")


async def _peers_up(peers: Peers, attempts: int = 12) -> None:
    """Wait for the host's other workers to answer (they start beside worker 0), with backoff; a
    purge to finish needs every shard. Raises the last failure after ATTEMPTS."""
    delay = 0.25
    for attempt in range(attempts):
        try:
            await peers.each("worker.refresh")
            return
        except CmcdError:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(delay)  # backoff between attempts: the workers are still starting
            delay = min(delay * 2, 10.0)


async def _purge(ctx: Context, tenant: Tenant, actor: str, actor_uid: int | None, note: str = "") -> dict[str, int]:
    """Intake closed to the tenant, sessions dropped, queue purged, then the store's rows in one
    transaction with the operation-log row that says so (the tenant's number, no name, login or
    address), then the erase (checkpoint and vacuum). Proceed carefully: each step may be cut
    short by a crash and is then run again by the next start, so each must be safe to repeat."""
    log.info("event=tenant_purge_started tenant_id=%d", tenant.id)
    logins = tuple(u.login for u in await ctx.astore.call(ctx.store.users, tenant.name))
    try:
        return await _purge_closed(ctx, tenant, logins, actor, actor_uid, note)
    finally:
        if ctx.intake is not None:
            ctx.intake.reopen_tenant(tenant.id)
        if ctx.peers is not None:  # each worker reads the directory first: the tenant is gone there too
            await ctx.peers.each("worker.reopen_tenant", tenant_id=tenant.id)


async def _purge_closed(
    ctx: Context, tenant: Tenant, logins: tuple[str, ...], actor: str, actor_uid: int | None, note: str
) -> dict[str, int]:
    if ctx.intake is not None:
        # Closes the race with intake. From here on no way in hands the spool anything of the
        # tenant; what was handed over before is already in the writer's FIFO queue, ahead of
        # the purge queued below, so it lands first and is erased with the rest (its sender
        # got a 250 or 202 for a message that is then erased, or was cut off by the drop).
        ctx.intake.close_tenant(tenant.id, logins)
    sessions = ctx.drop_sessions(tenant.id) if ctx.drop_sessions is not None else 0
    messages = await ctx.spool.purge_tenant(tenant.id, logins)
    if ctx.peers is not None:  # the other workers: their intake closed, sessions dropped, shards purged
        for done in await ctx.peers.each("worker.purge_tenant", tenant_id=tenant.id, logins=list(logins)):
            sessions += int(done["sessions"])
            messages += int(done["messages"])
    log.info("event=tenant_purge_queue_done tenant_id=%d messages=%d", tenant.id, messages)
    op = Op(
        actor=actor, actor_uid=actor_uid, action="tenant.purge", target=f"tenant #{tenant.id}",
        detail=f"{note}sessions={sessions} messages={messages}",
    )  # fmt: skip
    # returns when this process's directory (and the caches built on it) no longer holds the tenant
    counts = await ctx.tenancy.tenants.purge(op, tenant)
    log.info("event=tenant_purge_store_done tenant_id=%d", tenant.id)
    log.info("event=tenant_purge_done tenant_id=%d", tenant.id)
    return {"sessions": sessions, "messages": messages} | counts


PURGE_VERBS: dict[str, Verb] = {
    # its "ok" row is the purge's own ("tenant.purge", naming the tenant by number only)
    "tenant.delete": command(_tenant_delete, ("name", "purge"), "name={name}"),
}
