"""The tenant's block list (suppressed recipients) through the API: list a page of it (viewer or
admin), add or remove an address (admin); and its block policy (what a bounce of each class does:
GET for any role, PUT for an admin).

Scoped to the caller's tenant by construction. Each change is one tenancy command (the address
rule, its transaction, its operation-log row); this module maps HTTP to it and its refusals back.
Never imports cmcd.api.server: the server passes itself as an ApiContext.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from cmcd import bounces
from cmcd.api import paging
from cmcd.api.context import ApiContext, api_op
from cmcd.api.problems import Problem, iso, problem
from cmcd.tenancy.refusals import Reason, Refused


async def list_blocks(api: ApiContext, request: web.Request) -> web.StreamResponse:
    caller = await api.caller(request, "read")
    q = request.query
    paging.known(q, {"recipient", "cursor", "limit", "format"})
    limit = paging.limit(q.get("limit"))
    rows = await api.astore.call(
        api.store.suppression_page,
        caller.tenant_id,
        paging.cursor_in(q.get("cursor")),
        limit,
        q.get("recipient") or None,
    )
    out = [{"address": r["address"], "domain": r["domain"], "reason": r["reason"], "created": iso(r["created"]),
            "stream": r["stream"], "bounce_class": r["bounce_class"],
            "expires": iso(r["expires"]) if r["expires"] is not None else None} for r in rows]  # fmt: skip
    return paging.page(request, out, rows[-1]["id"] if len(rows) == limit else None)


async def add_block(api: ApiContext, request: web.Request) -> web.Response:
    caller = await api.caller(request, "manage")
    body, _ = await api.read_json(request)
    if not isinstance(body, dict) or not isinstance(body.get("address"), str) or set(body) - {"address", "reason"}:
        raise Problem(422, "invalid", 'expected {"address": "user@example.com", "reason": "optional text"}')
    address = body["address"].strip()
    reason = str(body.get("reason") or "added through the API")[:200]
    op = api_op(caller, "api.blocks.add", "1 address")  # the row says "added" or "already listed"
    try:
        added = await api.tenancy.accounts.suppression_add(op, caller.tenant, address, reason)
    except Refused as exc:  # the address rule
        raise problem(exc.refusal) from None
    return web.json_response({"address": address, "added": added}, status=201 if added else 200)


async def delete_block(api: ApiContext, request: web.Request) -> web.Response:
    caller = await api.caller(request, "manage")
    address = request.match_info["address"]
    try:
        await api.tenancy.accounts.suppression_delete(
            api_op(caller, "api.blocks.delete", "1 address"), caller.tenant, address
        )
    except Refused as exc:
        if exc.refusal.reason is Reason.NOT_FOUND:
            raise Problem(404, "not-found", "that address is not on your block list") from None
        raise problem(exc.refusal) from None
    return web.Response(status=204)


async def _policy(api: ApiContext, tenant_id: int) -> dict[str, Any]:
    """TENANT_ID's block policy: every class's action in force, its own ones (overrides), the host's,
    and the host's count threshold, window and watch period (the same for every tenant)."""
    host = api.config.bounces.policy()
    own = dict((await api.astore.call(api.store.tenant_block_actions)).get(tenant_id, {}))
    return {
        "actions": host.effective(own),
        "overrides": own,
        "host_actions": host.effective(),
        "count_threshold": host.count_threshold,
        "count_window_s": host.count_window_s,
        "watch_period_s": host.watch_s,
    }


async def get_policy(api: ApiContext, request: web.Request) -> web.Response:
    caller = await api.caller(request, "read")
    return web.json_response(await _policy(api, caller.tenant_id))


async def put_policy(api: ApiContext, request: web.Request) -> web.Response:
    """{"overrides": {class: action}} replaces the tenant's own actions whole: a class it does not
    name (or names with "default") goes back to the host's."""
    caller = await api.caller(request, "manage")
    body, _ = await api.read_json(request)
    overrides = body.get("overrides") if isinstance(body, dict) and not set(body) - {"overrides"} else None
    if not isinstance(overrides, dict) or not all(isinstance(v, str) for v in overrides.values()):
        raise Problem(422, "invalid", 'expected {"overrides": {"mailbox_full": "suppress", ...}}')
    try:
        bounces.check_tenant_actions(overrides)
    except ValueError as exc:
        raise Problem(422, "invalid", str(exc), extra={"field": "overrides"}) from None
    changes = {cls: overrides.get(cls, bounces.DEFAULT) for cls in bounces.CLASSES}
    try:
        await api.tenancy.accounts.tenant_set(
            api_op(caller, "api.block_policy.put", "block policy"), caller.tenant, block_actions=changes
        )
    except Refused as exc:
        raise problem(exc.refusal) from None
    return web.json_response(await _policy(api, caller.tenant_id))
