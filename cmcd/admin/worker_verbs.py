"""The verbs only a worker's private admin socket serves, for its supervisor and the host's worker 0:
the directory read again, metrics as text, a tenant's purge in this worker's shard. Never on the
operators' socket (cmcd/admin/verbs.py does not include them)."""

from __future__ import annotations

import dataclasses
from typing import Any

from cmcd.admin.verb import Args, BadRequest, Context, Verb, read


def _tenant(a: Args) -> int:
    value = a.raw.get("tenant_id")
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{a.verb}: argument 'tenant_id' must be an integer")
    return value


async def _refresh(ctx: Context, a: Args) -> Any:
    """Read the store's directory now: returns once this worker sees every change committed before."""
    directory = ctx.tenancy.directory
    await directory.refresh()
    return {"version": directory.snapshot.version}


async def _metrics(ctx: Context, a: Args) -> Any:
    if ctx.metrics_text is None:
        raise BadRequest("worker.metrics: this process has no metrics")
    return {"text": (await ctx.metrics_text()).decode("utf-8")}


async def _figures(ctx: Context, a: Args) -> Any:
    """This shard's queue figures (worker 0 adds them up for the evidence report)."""
    return dataclasses.asdict(await ctx.spool.figures())


async def _purge_tenant(ctx: Context, a: Args) -> Any:
    """Worker 0's purge of a tenant, in this worker: intake closed to it, its sessions dropped, its
    messages erased from this shard (intake stays closed until worker.reopen_tenant)."""
    tenant_id = _tenant(a)
    logins = a.raw.get("logins") or []
    if not isinstance(logins, list) or not all(isinstance(x, str) for x in logins):
        raise BadRequest("worker.purge_tenant: argument 'logins' must be a list of strings")
    if ctx.intake is not None:
        ctx.intake.close_tenant(tenant_id, tuple(logins))
    sessions = ctx.drop_sessions(tenant_id) if ctx.drop_sessions is not None else 0
    messages = await ctx.spool.purge_tenant(tenant_id, tuple(logins))
    return {"sessions": sessions, "messages": messages}


async def _reopen_tenant(ctx: Context, a: Args) -> Any:
    tenant_id = _tenant(a)
    await ctx.tenancy.directory.refresh()
    if ctx.intake is not None:
        ctx.intake.reopen_tenant(tenant_id)
    return {"tenant_id": tenant_id}


WORKER_VERBS: dict[str, Verb] = {
    "worker.refresh": read(_refresh),
    "worker.metrics": read(_metrics),
    "worker.figures": read(_figures),
    "worker.purge_tenant": read(_purge_tenant, "tenant_id", "logins"),
    "worker.reopen_tenant": read(_reopen_tenant, "tenant_id"),
}
