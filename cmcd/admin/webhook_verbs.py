"""Admin verbs for tenants' webhook endpoints: add (URL checked by the SSRF guard), list, delete, status.

The signing secret leaves the daemon once, in the reply to webhook.add; the store keeps it
encrypted with the data key. The URL's host is resolved through the daemon's own resolver (on
dns.nameservers), never the system's, as the dispatcher does before every request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cmcd.admin.server import BadRequest, _Args, _Verb
from cmcd.api.webhooks import WebhookUrlError, check_url, new_secret
from cmcd.deliver.routing import make_resolver
from cmcd.store.webhook_store import iso, parse_events

if TYPE_CHECKING:
    from cmcd.admin.server import AdminServer


def _webhook_id(a: _Args) -> int:
    value = a.raw.get("id")
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"{a.verb}: argument 'id' must be a webhook id (a positive integer, see webhook list)")
    return value


def _shown(row: dict[str, Any]) -> dict[str, Any]:
    """A listing row with its times also in ISO 8601 UTC."""
    out = dict(row)
    for key in ("created", "last_success", "failing_since", "next_attempt"):
        out[f"{key}_iso"] = iso(row.get(key))
    return out


async def _webhook_add(server: AdminServer, a: _Args) -> Any:
    tenant, url = a.text("tenant"), a.text("url")
    events = parse_events(a.optional_text("events"))
    await server._astore.call(server._store.tenant, tenant)  # an unknown tenant before any DNS lookup
    try:
        await check_url(url, make_resolver(server._config), server._config.api.webhook_allow_private)
    except WebhookUrlError as exc:
        raise BadRequest(str(exc)) from None
    secret = new_secret()
    row = await server._astore.call(server._store.webhook_add, tenant, url, events, secret.encode())
    return {**_shown(row), "secret": secret}


async def _webhook_list(server: AdminServer, a: _Args) -> Any:
    rows = await server._astore.call(server._store.webhooks, a.text("tenant"))
    return [_shown(r) for r in rows]


async def _webhook_delete(server: AdminServer, a: _Args) -> Any:
    tenant, webhook_id = a.text("tenant"), _webhook_id(a)
    await server._astore.call(server._store.webhook_delete, tenant, webhook_id)
    return {"tenant": tenant, "id": webhook_id, "deleted": True}


async def _webhook_status(server: AdminServer, a: _Args) -> Any:
    rows = await server._astore.call(server._store.webhooks, a.optional_text("tenant"))
    return [_shown(r) for r in rows]


WEBHOOK_VERBS: dict[str, _Verb] = {
    "webhook.add": _Verb(_webhook_add, ("tenant", "url", "events"), target="{tenant} {url} events={events}"),
    "webhook.list": _Verb(_webhook_list, ("tenant",)),
    "webhook.delete": _Verb(_webhook_delete, ("tenant", "id"), target="{tenant} webhook={id}"),
    "webhook.status": _Verb(_webhook_status, ("tenant",)),
}
