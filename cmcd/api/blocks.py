"""The tenant's block list (suppressed recipients) through the API: list a page of it (viewer or
admin), add or remove an address (admin).

Scoped to the caller's tenant by construction. Each change is one tenancy command (the address
rule, its transaction, its operation-log row); this module maps HTTP to it and its refusals back.
Never imports cmcd.api.server: the server passes itself as an ApiContext.
"""

from __future__ import annotations

from aiohttp import web

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
            "stream": r["stream"]} for r in rows]  # fmt: skip
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
