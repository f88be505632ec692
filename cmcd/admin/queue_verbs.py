"""The queue.* admin verbs: list, show and summarise the spool, retry, hold, release and delete
messages; never shows a message body. The server logs every change they make (they are not
tenancy commands); a tenant named with --tenant scopes what they see and touch.
"""

from __future__ import annotations

import time
from typing import Any

from cmcd.admin.shaping_verbs import shaped_sites
from cmcd.admin.verb import Args, BadRequest, Context, Verb, change, read
from cmcd.records import PENDING_STATES

QUEUE_LIST_DEFAULT = 100
QUEUE_LIST_MAX = 10_000


async def _named(ctx: Context, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    names = {t.id: t.name for t in await ctx.astore.call(ctx.store.tenants)}
    return [{"tenant": names.get(r["tenant_id"], str(r["tenant_id"]))} | r for r in rows]


def _wake(ctx: Context) -> None:
    if ctx.scheduler is not None:
        ctx.scheduler.wake()


async def _queue_list(ctx: Context, a: Args) -> Any:
    tenant_id = await ctx.tenant_id(a.optional_text("tenant"))
    limit = a.integer("limit", QUEUE_LIST_DEFAULT, 1, QUEUE_LIST_MAX)
    state = a.optional_text("state")
    if state is not None and state not in PENDING_STATES:
        raise BadRequest(f"queue.list: state must be one of {', '.join(PENDING_STATES)}")
    older = a.integer("older_than", 0, 0, 10 * 365 * 86400)
    page = await ctx.spool.list_page(
        tenant_id=tenant_id,
        state=state,
        domain=a.optional_text("domain"),
        received_before=time.time() - older if older else None,
        after=a.optional_text("after") or "",
        limit=limit,
    )
    return {"items": await _named(ctx, page["items"]), "next": page["next"]}


async def _queue_show(ctx: Context, a: Args) -> Any:
    tenant_id = await ctx.tenant_id(a.optional_text("tenant"))
    row = await ctx.spool.show(a.text("queue_id"), tenant_id)
    return (await _named(ctx, [row]))[0]


async def _queue_summary(ctx: Context, a: Args) -> Any:
    tenant_id = await ctx.tenant_id(a.optional_text("tenant"))
    summary = await ctx.spool.summary(time.time(), tenant_id)
    if ctx.engine is not None:  # where each domain's mail goes, and the shaped sites (cmcd/shaping.py)
        for d in summary["domains"]:
            d["site"] = ctx.engine.site_of(d["domain"])
        summary["sites"] = shaped_sites(ctx, tenant_id)
    return summary


async def _queue_retry(ctx: Context, a: Args) -> Any:
    tenant_id = await ctx.tenant_id(a.optional_text("tenant"))
    everything = a.flag("all")
    queue_id, domain = a.optional_text("queue_id"), a.optional_text("domain")
    if sum((queue_id is not None, domain is not None, everything)) != 1:
        raise BadRequest("queue.retry: give exactly one of queue_id, domain or all")
    if domain is not None and ctx.engine is not None:
        ctx.engine.revive(domain)
    n = await ctx.spool.retry(time.time(), queue_id=queue_id, domain=domain, everything=everything, tenant_id=tenant_id)
    _wake(ctx)
    return {"recipients": n}


def _one_target(a: Args) -> str | None:
    """A queue id (optionally scoped by tenant), or a tenant for all its messages."""
    queue_id = a.optional_text("queue_id")
    if queue_id is None and a.optional_text("tenant") is None:
        raise BadRequest(f"{a.verb}: give a queue_id or a tenant")
    return queue_id


async def _queue_hold(ctx: Context, a: Args) -> Any:
    queue_id = _one_target(a)
    tenant_id = await ctx.tenant_id(a.optional_text("tenant"))
    n = await ctx.spool.hold(queue_id=queue_id, tenant_id=tenant_id)
    return {"recipients": n}


async def _queue_release(ctx: Context, a: Args) -> Any:
    queue_id = _one_target(a)
    tenant_id = await ctx.tenant_id(a.optional_text("tenant"))
    n = await ctx.spool.release(time.time(), queue_id=queue_id, tenant_id=tenant_id)
    _wake(ctx)
    return {"recipients": n}


async def _queue_delete(ctx: Context, a: Args) -> Any:
    tenant_id = await ctx.tenant_id(a.optional_text("tenant"))
    n = await ctx.spool.delete(time.time(), a.text("queue_id"), tenant_id)
    if ctx.engine is not None:
        ctx.engine.erased()
    return {"queue_id": a.text("queue_id"), "recipients": n, "deleted": True}


QUEUE_VERBS: dict[str, Verb] = {
    "queue.list": read(_queue_list, "tenant", "state", "domain", "older_than", "after", "limit"),
    "queue.show": read(_queue_show, "queue_id", "tenant"),
    "queue.summary": read(_queue_summary, "tenant"),
    "queue.retry": change(
        _queue_retry, ("queue_id", "domain", "all", "tenant"), "{queue_id} domain={domain} tenant={tenant}"
    ),
    "queue.hold": change(_queue_hold, ("queue_id", "tenant"), "{queue_id} tenant={tenant}"),
    "queue.release": change(_queue_release, ("queue_id", "tenant"), "{queue_id} tenant={tenant}"),
    "queue.delete": change(_queue_delete, ("queue_id", "tenant"), "{queue_id} tenant={tenant}"),
}
