"""Tenant admins manage their own webhook endpoints through the API: list, add (SSRF-checked, the
signing secret returned once), delete. The same store rows and checks as `cmcctl webhook`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from cmcd.api.problems import Problem, iso
from cmcd.api.webhooks import WebhookUrlError, check_url, new_secret
from cmcd.errors import NotFound, StoreError
from cmcd.store.webhook_store import parse_events

if TYPE_CHECKING:
    from cmcd.api.server import ApiServer


def _shown(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"], "url": row["url"], "events": row["events"], "created": iso(row["created"]),
        "last_success": iso(row["last_success"]) if row["last_success"] else None, "sent": row["sent"],
        "dropped": row["dropped"], "attempts": row["attempts"],
        "failing_since": iso(row["failing_since"]) if row["failing_since"] else None,
        "last_error": row["last_error"] or "",
    }  # fmt: skip


async def list_hooks(api: ApiServer, request: web.Request) -> web.Response:
    caller = await api.caller(request, "manage")
    rows = await api.astore.call(api.store.webhooks, caller.tenant)
    return web.json_response({"data": [_shown(r) for r in rows]})


async def add_hook(api: ApiServer, request: web.Request) -> web.Response:
    caller = await api.caller(request, "manage")
    body, _ = await api.read_json(request)
    if not isinstance(body, dict) or set(body) - {"url", "events"} or not isinstance(body.get("url"), str):
        raise Problem(422, "invalid", 'expected {"url": "https://...", "events": ["delivered", ...] (optional)}')
    events = body.get("events")
    if events is not None and (not isinstance(events, list) or not all(isinstance(e, str) for e in events)):
        raise Problem(422, "invalid", "events: a list of event names", extra={"field": "events"})
    try:
        wanted = parse_events(events)
        await check_url(body["url"], api.resolver, api.config.api.webhook_allow_private)
    except (StoreError, WebhookUrlError) as exc:
        await api.log_op(caller, "api.webhooks.add", "-", str(exc))
        field = "events" if isinstance(exc, StoreError) else "url"
        raise Problem(422, "invalid", str(exc), extra={"field": field}) from None
    secret = new_secret()
    row = await api.astore.call(api.store.webhook_add, caller.tenant, body["url"], wanted, secret.encode())
    await api.log_op(caller, "api.webhooks.add", f"webhook={row['id']}", None, ",".join(wanted))
    return web.json_response(_shown(row) | {"secret": secret}, status=201)


async def delete_hook(api: ApiServer, request: web.Request) -> web.Response:
    caller = await api.caller(request, "manage")
    raw = request.match_info["webhook_id"]
    try:
        if not raw.isascii() or not raw.isdigit() or int(raw) >= 2**63:
            raise NotFound(raw)
        await api.astore.call(api.store.webhook_delete, caller.tenant, int(raw))
    except NotFound:
        await api.log_op(caller, "api.webhooks.delete", f"webhook={raw[:20]}", "not found")
        raise Problem(404, "not-found", "no such webhook in your tenant") from None
    await api.log_op(caller, "api.webhooks.delete", f"webhook={raw}", None)
    return web.Response(status=204)
