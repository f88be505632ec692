"""Log queries for cmcctl (the log.* verbs): time arguments, printed times, and rows streamed a
page at a time; never changes a row.

Times are stored as UTC epoch seconds and printed in server.timezone. An argument is either
ISO 8601 (a time without an offset is read in server.timezone) or relative to now: "-2h",
"-7d", "-30m", "-90s".
"""

from __future__ import annotations

import datetime
import functools
import re
import time
from collections.abc import AsyncIterator
from typing import Any
from zoneinfo import ZoneInfo

from cmcd.admin.verb import Args, BadRequest, Context, Stream, Verb, read
from cmcd.records import STREAMS
from cmcd.store import AsyncStore

PAGE = 1000
_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class TimeError(ValueError):
    pass


def parse_when(text: str, now: float, tz: ZoneInfo) -> float:
    """Epoch seconds for "-2h"-style or ISO 8601 TEXT."""
    m = _RELATIVE.match(text.strip())
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise TimeError(
            f"{text!r}: expected ISO 8601 (2026-11-26T09:00:00+09:00) or a relative time (-2h, -7d)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=tz)
    return when.timestamp()


def format_time(ts: float, tz: ZoneInfo) -> str:
    return datetime.datetime.fromtimestamp(ts, tz).isoformat(timespec="seconds")


async def rows(
    astore: AsyncStore, kind: str, tz: ZoneInfo, limit: int | None, **filters: Any
) -> AsyncIterator[dict[str, Any]]:
    """Every matching row, oldest first, read a page at a time on the store's thread."""
    after, sent = 0, 0
    while limit is None or sent < limit:
        size = PAGE if limit is None else min(PAGE, limit - sent)
        page = await astore.call(functools.partial(astore.store.log_page, kind, after=after, limit=size, **filters))
        for row in page:
            after = row.pop("id")
            row = {"time": format_time(row["ts"], tz)} | row
            del row["ts"]
            yield row
        sent += len(page)
        if len(page) < size:
            return


async def _log(ctx: Context, a: Args, kind: str) -> Stream:
    tz = ZoneInfo(ctx.config.server.timezone)
    now = time.time()
    filters: dict[str, Any] = {}
    try:
        for key in ("since", "until"):
            text = a.optional_text(key)
            if text is not None:
                filters[key] = parse_when(text, now, tz)
    except TimeError as exc:
        raise BadRequest(f"{a.verb}: {exc}") from None
    filters["tenant_id"] = await ctx.tenant_id(a.optional_text("tenant"))
    filters["status"] = a.optional_text("status")
    if kind == "mail":
        filters |= {k: a.optional_text(k) for k in ("rcpt", "sender", "queue_id", "stream")}
        if filters["stream"] is not None and filters["stream"] not in STREAMS:
            raise BadRequest(f"{a.verb}: stream {filters['stream']!r}: expected one of {', '.join(STREAMS)}")
    limit = a.integer("limit", 0, 0, 100_000_000) or None
    return Stream(rows(ctx.astore, kind, tz, limit, **filters))


async def _log_mail(ctx: Context, a: Args) -> Any:
    return await _log(ctx, a, "mail")


async def _log_login(ctx: Context, a: Args) -> Any:
    return await _log(ctx, a, "login")


async def _log_ops(ctx: Context, a: Args) -> Any:
    return await _log(ctx, a, "ops")


LOG_VERBS: dict[str, Verb] = {
    "log.mail": read(_log_mail, "tenant", "since", "until", "rcpt", "sender", "queue_id", "status", "stream", "limit"),
    "log.login": read(_log_login, "tenant", "since", "until", "status", "limit"),
    "log.ops": read(_log_ops, "tenant", "since", "until", "status", "limit"),
}
