"""Admin verbs for tenants' webhook endpoints: add and delete (tenancy commands, cmcd.tenancy.webhooks:
the URL is checked there by the SSRF guard), list and status.

The signing secret leaves the daemon once, in the reply to webhook.add; the store keeps it
encrypted with the data key. The URL's host is resolved through the daemon's own resolver (on
dns.nameservers), never the system's, as the dispatcher does before every request.
"""

from __future__ import annotations

from typing import Any

from cmcd.admin.verb import Args, BadRequest, Context, Verb, command, read
from cmcd.deliver.routing import make_resolver
from cmcd.store.webhook_store import iso


def _shown(row: dict[str, Any]) -> dict[str, Any]:
    """A listing row with its times also in ISO 8601 UTC."""
    out = dict(row)
    for key in ("created", "last_success", "failing_since", "next_attempt"):
        out[f"{key}_iso"] = iso(row.get(key))
    return out


async def _webhook_add(ctx: Context, a: Args) -> Any:
    tenant, url, events = a.text("tenant"), a.text("url"), a.optional_text("events")
    row, secret = await ctx.tenancy.webhooks.add(a.op, tenant, url, events, make_resolver(ctx.config))
    return {**_shown(row), "secret": secret}


async def _webhook_list(ctx: Context, a: Args) -> Any:
    rows = await ctx.astore.call(ctx.store.webhooks, a.text("tenant"))
    return [_shown(r) for r in rows]


async def _webhook_delete(ctx: Context, a: Args) -> Any:
    tenant, value = a.text("tenant"), a.raw.get("id")
    if value is None:
        raise BadRequest(f"{a.verb}: missing argument 'id'")
    webhook_id = await ctx.tenancy.webhooks.delete(a.op, tenant, value)
    return {"tenant": tenant, "id": webhook_id, "deleted": True}


async def _webhook_status(ctx: Context, a: Args) -> Any:
    rows = await ctx.astore.call(ctx.store.webhooks, a.optional_text("tenant"))
    return [_shown(r) for r in rows]


WEBHOOK_VERBS: dict[str, Verb] = {
    "webhook.add": command(_webhook_add, ("tenant", "url", "events"), "{tenant} {url} events={events}"),
    "webhook.list": read(_webhook_list, "tenant"),
    "webhook.delete": command(_webhook_delete, ("tenant", "id"), "{tenant} webhook={id}"),
    "webhook.status": read(_webhook_status, "tenant"),
}
