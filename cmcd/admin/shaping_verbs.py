"""The shaping.status admin verb: this process's providers, shaped sites and automation changes in
force, read from the delivery engine; never changes anything. Shaping state is each worker's own
(every worker holds its share of a provider's limits and its own automation counters): the
supervisor asks every worker and lists their answers side by side (cmcd/daemon/merge.py).
"""

from __future__ import annotations

from typing import Any

from cmcd.admin.verb import Args, BadRequest, Context, Verb, read


async def _shaping_status(ctx: Context, a: Args) -> Any:
    if ctx.engine is None:
        raise BadRequest("shaping.status: this process does not deliver")
    tenant_id = await ctx.tenant_id(a.optional_text("tenant"))
    status = ctx.engine.shaping_status(tenant_id)
    names = ctx.tenancy.directory.snapshot.tenant_names
    for change in status["changes"]:
        tid = change["tenant_id"]
        change["tenant"] = "" if tid is None else names.get(tid, str(tid))
    return {"workers": [{"worker": ctx.status().get("worker")} | status]}


def shaped_sites(ctx: Context, tenant_id: int | None) -> list[dict[str, Any]]:
    """The shaped sites and the changes in force at each, for queue.summary (this process's)."""
    if ctx.engine is None:
        return []
    status = ctx.engine.shaping_status(tenant_id)
    worker = ctx.status().get("worker")
    by_site: dict[str, list[dict[str, Any]]] = {}
    for c in status["changes"]:
        by_site.setdefault(c["site"], []).append(
            {k: c[k] for k in ("rule", "action", "tenant_id", "until", "ends_in_s")}
        )
    return [s | {"worker": worker, "changes": by_site.get(s["site"], [])} for s in status["sites"]]


SHAPING_VERBS: dict[str, Verb] = {
    "shaping.status": read(_shaping_status, "tenant"),
}
