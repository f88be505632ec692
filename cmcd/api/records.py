"""The tenant's records through the API, read-only: deliveries and bounces (the mail log) and the
audit logs (operations, logins), a page at a time as JSON or CSV (paging.py).

Every read is filtered by the caller's tenant, which comes from the credential, never from the
request. Changes nothing. Never imports cmcd.api.server: the server passes itself as an ApiContext.
"""

from __future__ import annotations

from aiohttp import web

from cmcd.api import paging
from cmcd.api.context import ApiContext
from cmcd.api.problems import Problem, iso
from cmcd.records import STREAMS

#: mail-log events each record endpoint lists (a recipient's one-click unsubscribe is a mail-log event with no queue id)
DELIVERY_EVENTS = (
    "accepted", "deferred", "delivered", "bounced", "expired", "suppressed", "deleted", "lost", "unsubscribed",
)  # fmt: skip
BOUNCE_EVENTS = ("bounced", "expired")


async def deliveries(api: ApiContext, request: web.Request) -> web.StreamResponse:
    return await _mail_records(api, request, DELIVERY_EVENTS)


async def bounces(api: ApiContext, request: web.Request) -> web.StreamResponse:
    return await _mail_records(api, request, BOUNCE_EVENTS)


async def _mail_records(api: ApiContext, request: web.Request, events: tuple[str, ...]) -> web.StreamResponse:
    caller = await api.caller(request, "read")
    q = request.query
    paging.known(q, {"since", "until", "recipient", "status", "tag", "queue_id", "stream", "cursor", "limit", "format"})
    status = q.get("status")
    if status is not None and status not in events:
        raise Problem(400, "bad-parameter", f"status: expected one of {', '.join(events)}", extra={"field": "status"})
    stream = q.get("stream")
    if stream is not None and stream not in STREAMS:
        raise Problem(400, "bad-parameter", f"stream: expected one of {', '.join(STREAMS)}", extra={"field": "stream"})
    rows = await api.astore.call(
        api.store.log_page,
        "mail",
        tenant_id=caller.tenant_id,
        since=paging.parse_time("since", q.get("since")),
        until=paging.parse_time("until", q.get("until")),
        rcpt=q.get("recipient") or None,
        queue_id=q.get("queue_id") or None,
        events=(status,) if status else events,
        tag=q.get("tag") or None,
        stream=stream,
        after=paging.cursor_in(q.get("cursor")),
        limit=paging.limit(q.get("limit")),
    )
    tags = await api.astore.call(api.store.message_tags, sorted({r["queue_id"] for r in rows}))
    out = [
        {
            "time": iso(r["ts"]), "queue_id": r["queue_id"], "event": r["event"], "status": r["status"],
            "sender": r["sender"], "recipient": r["rcpt"], "domain": r["rcpt_domain"], "response": r["response"] or "",
            "bounce_class": r.get("bounce_class") or "", "attempt": r["attempt"], "mx": r["mx"], "ip": r["ip"], "tls": r["tls"], "delay": round(r["delay"], 3),
            "size": r["size"], "message_id": r["message_id"], "tags": tags.get(r["queue_id"], []),
            "stream": r["stream"],
        }
        for r in rows
    ]  # fmt: skip
    return paging.page(request, out, rows[-1]["id"] if len(rows) == paging.limit(q.get("limit")) else None)


async def audit(api: ApiContext, request: web.Request) -> web.StreamResponse:
    caller = await api.caller(request, "read")
    q = request.query
    paging.known(q, {"log", "since", "until", "status", "cursor", "limit", "format"})
    kind = q.get("log", "ops")
    if kind not in ("ops", "login"):
        raise Problem(400, "bad-parameter", "log: expected ops or login", extra={"field": "log"})
    limit = paging.limit(q.get("limit"))
    rows = await api.astore.call(
        api.store.log_page,
        kind,
        tenant_id=caller.tenant_id,
        since=paging.parse_time("since", q.get("since")),
        until=paging.parse_time("until", q.get("until")),
        status=q.get("status") or None,
        after=paging.cursor_in(q.get("cursor")),
        limit=limit,
    )
    skip = {"id", "ts", "tenant", "actor_uid"}
    out = [{"time": iso(r["ts"]), **{k: v for k, v in r.items() if k not in skip}} for r in rows]
    return paging.page(request, out, rows[-1]["id"] if len(rows) == limit else None)
