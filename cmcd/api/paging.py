"""Query parameters and pages of the API's list endpoints: ISO 8601 times, opaque cursors, limits,
unknown parameters refused, and one page written as JSON or CSV; no I/O here.

A bad parameter is a 400 Problem naming it; the handlers (records.py, blocks.py) read the store.
"""

from __future__ import annotations

import base64
import datetime
import io
from typing import Any

from aiohttp import web

from cmcd.api.problems import Problem
from cmcd.textout import CsvWriter

PAGE_MAX = 1000
_ISO_HINT = 'an ISO 8601 time like "2026-11-26T10:00:00Z"'


def parse_time(name: str, value: str | None) -> float | None:
    if value is None or value == "":
        return None
    try:
        t = datetime.datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise Problem(400, "bad-parameter", f"{name}: expected {_ISO_HINT}", extra={"field": name}) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.UTC)
    return t.timestamp()


def cursor_out(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"c{last_id}".encode()).decode().rstrip("=")


def cursor_in(value: str | None) -> int:
    if not value:
        return 0
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
        if raw.startswith("c") and raw[1:].isdigit() and int(raw[1:]) < 2**63:  # SQLite's INTEGER range
            return int(raw[1:])
    except (ValueError, UnicodeDecodeError):
        pass
    raise Problem(400, "bad-parameter", "cursor: not a cursor this API returned", extra={"field": "cursor"})


def limit(value: str | None) -> int:
    if value is None or value == "":
        return 100
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= PAGE_MAX:  # "²".isdigit() is true
        raise Problem(400, "bad-parameter", f"limit: expected 1 to {PAGE_MAX}", extra={"field": "limit"})
    return int(value)


def known(query: Any, allowed: set[str]) -> None:
    for name in query:
        if name not in allowed:
            raise Problem(400, "bad-parameter", f"unknown parameter {name!r}; known: {', '.join(sorted(allowed))}",
                          extra={"field": name})  # fmt: skip


def page(request: web.Request, rows: list[dict[str, Any]], last_id: int | None) -> web.StreamResponse:
    """One page as JSON ({"data": [...], "next_cursor": ...}) or CSV (?format=csv; the next cursor
    in the Link header)."""
    fmt = request.query.get("format", "json")
    cursor = cursor_out(last_id) if last_id is not None else None
    if fmt == "json":
        return web.json_response({"data": rows, "next_cursor": cursor})
    if fmt != "csv":
        raise Problem(400, "bad-parameter", "format: expected json or csv", extra={"field": "format"})
    buf = io.StringIO()
    if rows:  # through the one CSV writer: remote replies and addresses are outsiders' text
        w = CsvWriter(buf)
        w.writerow(rows[0])
        for r in rows:
            w.writerow(r.values())
    headers = {}
    if cursor:
        query = dict(request.query)
        query["cursor"] = cursor
        headers["Link"] = f'<{request.url.with_query(query).path_qs}>; rel="next"'
    return web.Response(text=buf.getvalue(), content_type="text/csv", charset="utf-8", headers=headers)
