"""Tenant admins manage their own webhook endpoints through the API: list, add (the signing secret
returned once), delete. The same tenancy commands as `cmcctl webhook` (events, the SSRF guard, at
most ten per tenant, the operation-log row); this module maps HTTP to them and their refusals
back. A refused URL is told in the tenant's words (UrlRefused.public: nothing the daemon's
resolver learned about the host); the operation log keeps the whole reason. Never imports
cmcd.api.server: the server passes itself as an ApiContext.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from cmcd.api.context import ApiContext, api_op
from cmcd.api.problems import Problem, iso, problem
from cmcd.tenancy.refusals import Reason, Refused
from cmcd.tenancy.webhooks import UrlRefused


def _shown(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"], "url": row["url"], "events": row["events"], "created": iso(row["created"]),
        "last_success": iso(row["last_success"]) if row["last_success"] else None, "sent": row["sent"],
        "dropped": row["dropped"], "attempts": row["attempts"],
        "failing_since": iso(row["failing_since"]) if row["failing_since"] else None,
        "last_error": row["last_error"] or "",
    }  # fmt: skip


def _added(row: dict[str, Any]) -> tuple[str, str]:
    """The operation-log row of an endpoint added: its id, and the events it gets."""
    return f"webhook={row['id']}", ",".join(row["events"])


async def list_hooks(api: ApiContext, request: web.Request) -> web.Response:
    caller = await api.caller(request, "manage")
    rows = await api.astore.call(api.store.webhooks, caller.tenant)
    return web.json_response({"data": [_shown(r) for r in rows]})


async def add_hook(api: ApiContext, request: web.Request) -> web.Response:
    caller = await api.caller(request, "manage")
    body, _ = await api.read_json(request)
    if not isinstance(body, dict) or set(body) - {"url", "events"} or not isinstance(body.get("url"), str):
        raise Problem(422, "invalid", 'expected {"url": "https://...", "events": ["delivered", ...] (optional)}')
    events = body.get("events")
    if events is not None and (not isinstance(events, list) or not all(isinstance(e, str) for e in events)):
        raise Problem(422, "invalid", "events: a list of event names", extra={"field": "events"})
    op = api_op(caller, "api.webhooks.add", "-", ok_row=_added)
    try:
        row, secret = await api.tenancy.webhooks.add(op, caller.tenant, body["url"], events, api.resolver)
    except UrlRefused as exc:
        raise problem(exc.public) from None
    except Refused as exc:
        raise problem(exc.refusal) from None
    return web.json_response(_shown(row) | {"secret": secret}, status=201)


async def delete_hook(api: ApiContext, request: web.Request) -> web.Response:
    caller = await api.caller(request, "manage")
    raw = request.match_info["webhook_id"]
    try:
        await api.tenancy.webhooks.delete(
            api_op(caller, "api.webhooks.delete", f"webhook={raw[:20]}"), caller.tenant, raw
        )
    except Refused as exc:
        if exc.refusal.reason is Reason.NOT_FOUND:
            raise Problem(404, "not-found", "no such webhook in your tenant") from None
        raise problem(exc.refusal) from None
    return web.Response(status=204)
