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


def _public_reason(reason: str) -> str:
    """What a tenant is told about a refused URL: the scheme and form problems as they are; for
    anything learned through DNS only that the host is not a public, resolvable one."""
    if "resolves to" in reason or "does not exist" in reason or "address" in reason:
        return (
            "the URL's host does not resolve to public addresses only (loopback, private and link-local "
            "addresses are refused, api.webhook_allow_private allows them)"
        )
    return reason


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
    except StoreError as exc:
        await api.log_op(caller, "api.webhooks.add", "-", str(exc))
        raise Problem(422, "invalid", str(exc), extra={"field": "events"}) from None
    except WebhookUrlError as exc:
        # the operation log (the operator's) keeps the reason; the tenant learns no more than that
        # the URL is not usable, so the daemon's resolver cannot map internal names for it
        await api.log_op(caller, "api.webhooks.add", "-", str(exc))
        raise Problem(422, "invalid", _public_reason(str(exc)), extra={"field": "url"}) from None
    secret = new_secret()
    try:
        row = await api.astore.call(api.store.webhook_add, caller.tenant, body["url"], wanted, secret.encode())
    except StoreError as exc:
        await api.log_op(caller, "api.webhooks.add", "-", str(exc))
        raise Problem(409, "conflict", str(exc)) from None
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
