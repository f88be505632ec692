"""The dashboard, the console's home page: the signed-in tenant's mail per hour or per day over a
range it chooses (a chart and the same numbers as a table), its most bouncing recipient domains,
its current queue on every worker's spool shard and today's messages against its daily quota.

Reads only, always of page.caller's tenant: the mail log's aggregates through the store
(store.mail_counts, store.top_bouncing_domains, buckets aligned to the tenant's local time), the
queue's running counts (queue/counts.py) from every shard file opened read-only on a worker
thread. Any worker may serve the page while the tenant's mail sits in every shard; reading the
files beside their workers (WAL) needs no word with the other processes, and the running counts
make each read a few rows. Never changes anything.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import math
import sqlite3
import zoneinfo
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from cmcd.api.console import i18n
from cmcd.api.console.charts import Bucket, Series, bar_chart
from cmcd.api.console.web import Console, ConsoleError, Page, choices
from cmcd.queue import counts
from cmcd.queue.startup import SHARD_FILE, SPOOL_FILE
from cmcd.records import PENDING_STATES
from cmcd.store.console_store import DASHBOARD_EVENTS, mail_counts, top_bouncing_domains

log = logging.getLogger("cmcd.api.console")

HOUR_S, DAY_S = 3600, 86400
#: the ranges offered: (bucket, buckets), the last bucket the one now is in
PRESETS = {"24h": (HOUR_S, 24), "7d": (DAY_S, 7), "30d": (DAY_S, 30)}
UNITS = {"hour": HOUR_S, "day": DAY_S}
DEFAULT_RANGE = "24h"
#: a range typed in may have at most this many buckets (a chart and a table row each)
MAX_BUCKETS = 750
#: the longest range one dashboard reads (the mail log keeps retention.mail_log_days, 40 by default)
MAX_RANGE_S = 93 * 86400
#: the times a range typed in may start and end between (1970 to 2100: the mail log is in between)
EARLIEST, LATEST = 0.0, 4_102_444_800.0
#: recipient domains shown as bouncing most
TOP_DOMAINS = 10


def register(c: Console) -> None:
    c.get("/", home)


@dataclass(frozen=True)
class Span:
    """The range a dashboard shows: [since, until) in buckets of BUCKET_S seconds that start where
    local time (UTC + OFFSET_S) is a multiple of BUCKET_S, as store.mail_counts groups them."""

    since: float
    until: float
    bucket_s: int
    offset_s: int

    @property
    def starts(self) -> list[int]:
        """Each bucket's start (epoch seconds), the first the one SINCE is in."""
        first = bucket_start(self.since, self.bucket_s, self.offset_s)
        return list(range(first, math.ceil(self.until), self.bucket_s))


def bucket_start(ts: float, bucket_s: int, offset_s: int) -> int:
    """The start of the bucket TS is in (store.mail_counts's arithmetic)."""
    return math.floor((ts + offset_s) / bucket_s) * bucket_s - offset_s


def utc_offset(tz: zoneinfo.ZoneInfo, ts: float) -> int:
    """TZ's offset from UTC at TS, in seconds. One offset aligns every bucket of a range: across
    a daylight-saving change the buckets before it start an hour off local midnight."""
    offset = datetime.datetime.fromtimestamp(ts, tz).utcoffset()
    return int(offset.total_seconds()) if offset is not None else 0


def preset_span(name: str, now: float, tz: zoneinfo.ZoneInfo) -> Span:
    bucket_s, n = PRESETS[name]
    offset = utc_offset(tz, now)
    current = bucket_start(now, bucket_s, offset)
    return Span(current - (n - 1) * bucket_s, current + bucket_s, bucket_s, offset)


class RangeError(ValueError):
    """A range typed in that cannot be shown; its text is for the page."""


def typed_span(page: Page, since_text: str, until_text: str, unit: str, now: float) -> Span:
    """The range typed in the form (local times, per hour or per day), or RangeError saying why not."""
    try:
        since = page.local_time(since_text, page.t("common.since"))
        until = page.local_time(until_text, page.t("common.until"))
    except ConsoleError as exc:
        raise RangeError(exc.text) from None
    if since is None:
        raise RangeError(page.t("dashboard.since_missing"))
    until = now if until is None else until
    if not EARLIEST <= since <= LATEST or not EARLIEST <= until <= LATEST:
        raise RangeError(page.t("dashboard.out_of_range"))
    if until <= since:
        raise RangeError(page.t("dashboard.until_before"))
    bucket_s = UNITS.get(unit, HOUR_S)
    span = Span(since, until, bucket_s, utc_offset(page.tz, until))
    n = math.ceil((until - bucket_start(since, bucket_s, span.offset_s)) / bucket_s)
    if n > MAX_BUCKETS:
        raise RangeError(page.t("dashboard.too_many", n=n, max=MAX_BUCKETS))
    if until - since > MAX_RANGE_S:
        raise RangeError(page.t("dashboard.too_long", days=MAX_RANGE_S // 86400))
    return span


def shard_files(spool_dir: Path) -> list[Path]:
    """Every spool shard file in SPOOL_DIR: queue.db (shard 0) and queue-K.db (worker K's)."""
    return [spool_dir / SPOOL_FILE, *sorted(p for p in spool_dir.glob("queue-*.db") if SHARD_FILE.fullmatch(p.name))]


async def home(page: Page) -> web.StreamResponse:
    api = page.api
    tenant_id = page.caller.tenant_id
    now = api.clock()
    query = page.request.query
    chosen = query.get("range", "")
    if chosen not in PRESETS and chosen != "custom":
        chosen = "custom" if query.get("since") else DEFAULT_RANGE
    unit = query.get("unit", "")
    if unit not in UNITS:
        unit = "hour"
    error = ""
    status = 200
    span: Span | None = None
    if chosen == "custom":
        try:
            span = typed_span(page, query.get("since", ""), query.get("until", ""), unit, now)
        except RangeError as exc:
            error, status = str(exc), 400
    else:
        span = preset_span(chosen, now, page.tz)
        unit = "day" if span.bucket_s == DAY_S else "hour"
    series = [Series(e, page.t(f"dashboard.event_{e}")) for e in DASHBOARD_EVENTS]
    values: dict[str, Any] = {
        "ranges": choices([(name, page.t(f"dashboard.range_{name}")) for name in (*PRESETS, "custom")]),
        "units": choices([(name, page.t(f"dashboard.per_{name}")) for name in UNITS]),
        "chosen": chosen,
        "unit": unit,
        "since_value": query.get("since", ""),
        "until_value": query.get("until", ""),
        "error": error,
        "series": series,
        "chart": None,
    }
    if span is not None:
        values.update(await _mail(page, span, tenant_id, series))
        if chosen != "custom":  # the form shows the range it stands for, to start from
            values["since_value"] = _field_time(span.since, page.tz)
            values["until_value"] = _field_time(min(span.until, now), page.tz)
    values.update(await _queue(page, tenant_id))
    values.update(await _today(page, now))
    return page.render("dashboard.html", status=status, **values)


async def _mail(page: Page, span: Span, tenant_id: int, series: list[Series]) -> dict[str, Any]:
    """The mail log's counts per bucket and event over SPAN, as a chart and as table rows."""
    api = page.api
    # on the store's report thread: a month of a busy tenant's log takes seconds, and must not hold
    # up sign-ins, sending and the API on the store thread meanwhile
    rows = await api.astore.report(mail_counts, tenant_id, span.since, span.until, span.bucket_s, span.offset_s)
    top = await api.astore.report(top_bouncing_domains, tenant_id, span.since, span.until, TOP_DOMAINS)
    by_bucket: dict[int, list[int]] = {}
    column = {event: i for i, event in enumerate(DASHBOARD_EVENTS)}
    for start, event, n in rows:
        by_bucket.setdefault(int(start), [0] * len(DASHBOARD_EVENTS))[column[event]] += int(n)
    starts = span.starts
    long_axis = span.bucket_s == HOUR_S and len(starts) > 24
    buckets = []
    for start in starts:
        if span.bucket_s == DAY_S:  # named by its middle: a day across a DST change starts an hour off midnight
            middle = datetime.datetime.fromtimestamp(start + DAY_S // 2, page.tz)
            title, label = middle.strftime("%Y-%m-%d"), middle.strftime("%m-%d")
        else:
            local = datetime.datetime.fromtimestamp(start, page.tz)
            title = local.strftime("%Y-%m-%d %H:%M")
            label = local.strftime("%m-%d %H:%M" if long_axis else "%H:%M")
        buckets.append(Bucket(label, title, tuple(by_bucket.get(start, [0] * len(DASHBOARD_EVENTS)))))
    totals = [sum(b.counts[i] for b in buckets) for i in range(len(DASHBOARD_EVENTS))]
    unit = page.t("dashboard.per_day" if span.bucket_s == DAY_S else "dashboard.per_hour")
    shown = page.t("dashboard.range_text", since=page.when(span.since, seconds=False),
                   until=page.when(span.until, seconds=False), unit=unit)  # fmt: skip
    chart = bar_chart(
        buckets,
        series,
        label=page.t("dashboard.chart_label", range=shown),
        desc=page.t("dashboard.chart_desc", **dict(zip(DASHBOARD_EVENTS, map(str, totals), strict=True))),
    )
    return {
        "chart": chart,
        "buckets": buckets,
        "totals": totals,
        "range_text": shown,
        "any_mail": any(totals),
        "top_domains": [(str(domain), int(n)) for domain, n in top],
    }


async def _queue(page: Page, tenant_id: int) -> dict[str, Any]:
    """The tenant's recipients not yet final, by state, over every shard."""
    config = page.api.config
    spool_dir = config.path(config.spool.dir)
    try:
        states = await asyncio.to_thread(lambda: counts.tenant_pending(shard_files(spool_dir), tenant_id))
    except (sqlite3.Error, OSError) as exc:
        log.warning("event=console_queue_unreadable tenant_id=%d error=%r", tenant_id, str(exc))
        return {"queue": None}
    return {
        "queue": [(str(s), page.t(f"dashboard.state_{s}"), states[str(s)]) for s in PENDING_STATES],
        "queue_total": sum(states.values()),
    }


async def _today(page: Page, now: float) -> dict[str, Any]:
    """Messages the tenant had accepted today (the server's day, as daily quotas count them, as far
    as the workers have shipped their counts to the store) and its daily quota (0: none)."""
    api = page.api
    day = datetime.datetime.fromtimestamp(now, api.service.tz).strftime("%Y-%m-%d")
    daily, _ = await api.astore.call(api.store.daily_counts, day, "")
    quota = api.config.tenant_limits(page.caller.tenant).messages_per_day
    return {"today": {"day": day, "messages": int(daily.get(page.caller.tenant_id, 0)), "quota": quota}}


def _field_time(ts: float, tz: zoneinfo.ZoneInfo) -> str:
    """TS as a datetime-local field's value in TZ."""
    return datetime.datetime.fromtimestamp(ts, tz).strftime("%Y-%m-%dT%H:%M")


i18n.add(
    {
        "en": {
            "dashboard.title": "Dashboard",
            "dashboard.mail": "Mail",
            "dashboard.range": "Range",
            "dashboard.range_24h": "Last 24 hours, per hour",
            "dashboard.range_7d": "Last 7 days, per day",
            "dashboard.range_30d": "Last 30 days, per day",
            "dashboard.range_custom": "From … until … below",
            "dashboard.unit": "Buckets",
            "dashboard.per_hour": "per hour",
            "dashboard.per_day": "per day",
            "dashboard.show": "Show",
            "dashboard.range_hint": "For a range of your own choose “From … until … below” and enter the times.",
            "dashboard.since_missing": "Enter the time the range starts (From).",
            "dashboard.until_before": "The range must end (Until) after it starts (From).",
            "dashboard.out_of_range": "Enter times between 1970 and 2100.",
            "dashboard.too_many": "That range has {n} buckets; at most {max} can be shown: choose per day or a shorter range.",
            "dashboard.too_long": "Choose a range of at most {days} days.",
            "dashboard.range_text": "{since} to {until}, {unit}",
            "dashboard.chart_label": "Mail {range}",
            "dashboard.chart_desc": (
                "Bars per time span: accepted {accepted}, delivered {delivered}, deferred {deferred}, "
                "bounced {bounced}, suppressed {suppressed} in all. The table below has every number."
            ),
            "dashboard.legend": "Legend and totals",
            "dashboard.numbers": "The numbers",
            "dashboard.table_caption": "Mail-log events per time span",
            "dashboard.bucket": "Time span",
            "dashboard.total": "Total",
            "dashboard.no_mail": "No mail in this range.",
            "dashboard.event_accepted": "Accepted",
            "dashboard.event_delivered": "Delivered",
            "dashboard.event_deferred": "Deferred",
            "dashboard.event_bounced": "Bounced",
            "dashboard.event_suppressed": "Suppressed",
            "dashboard.bouncing": "Most bouncing domains",
            "dashboard.bouncing_caption": "Recipient domains by bounces and expiries in this range",
            "dashboard.domain": "Domain",
            "dashboard.bounces": "Bounces",
            "dashboard.no_bounces": "No bounces in this range.",
            "dashboard.queue": "Queue now",
            "dashboard.queue_caption": "Your recipients not yet delivered, bounced or expired, by state",
            "dashboard.state": "State",
            "dashboard.recipients": "Recipients",
            "dashboard.state_queued": "Queued",
            "dashboard.state_deferred": "Deferred (will be retried)",
            "dashboard.state_inflight": "Being delivered",
            "dashboard.state_held": "Held",
            "dashboard.queue_unreadable": "The queue cannot be read now; try again in a moment.",
            "dashboard.today": "Today",
            "dashboard.today_messages": "Messages today",
            "dashboard.today_day": "accepted on {day} (the server's day, as the daily quota counts)",
            "dashboard.quota": "Daily quota",
            "dashboard.no_quota": "none",
        },
        "ja": {
            "dashboard.title": "ダッシュボード",
            "dashboard.mail": "メール",
            "dashboard.range": "期間",
            "dashboard.range_24h": "過去 24 時間（1 時間ごと）",
            "dashboard.range_7d": "過去 7 日間（1 日ごと）",
            "dashboard.range_30d": "過去 30 日間（1 日ごと）",
            "dashboard.range_custom": "下の開始・終了で指定",
            "dashboard.unit": "集計単位",
            "dashboard.per_hour": "1 時間ごと",
            "dashboard.per_day": "1 日ごと",
            "dashboard.show": "表示",
            "dashboard.range_hint": "期間を指定するには「下の開始・終了で指定」を選び、時刻を入力してください。",
            "dashboard.since_missing": "期間の開始時刻を入力してください。",
            "dashboard.until_before": "終了は開始より後の時刻にしてください。",
            "dashboard.out_of_range": "1970 年から 2100 年までの時刻を入力してください。",
            "dashboard.too_many": "この期間は {n} 区間になります。表示できるのは {max} 区間までです。1 日ごとにするか、期間を短くしてください。",
            "dashboard.too_long": "期間は {days} 日以内で指定してください。",
            "dashboard.range_text": "{since} 〜 {until}（{unit}）",
            "dashboard.chart_label": "メール {range}",
            "dashboard.chart_desc": (
                "区間ごとの棒グラフ。合計: 受付 {accepted}、配信 {delivered}、遅延 {deferred}、"
                "バウンス {bounced}、抑止 {suppressed}。すべての数値は下の表にあります。"
            ),
            "dashboard.legend": "凡例と合計",
            "dashboard.numbers": "数値",
            "dashboard.table_caption": "区間ごとのメールログのイベント数",
            "dashboard.bucket": "区間",
            "dashboard.total": "合計",
            "dashboard.no_mail": "この期間のメールはありません。",
            "dashboard.event_accepted": "受付",
            "dashboard.event_delivered": "配信",
            "dashboard.event_deferred": "遅延",
            "dashboard.event_bounced": "バウンス",
            "dashboard.event_suppressed": "抑止",
            "dashboard.bouncing": "バウンスの多いドメイン",
            "dashboard.bouncing_caption": "この期間のバウンスと期限切れの多い宛先ドメイン",
            "dashboard.domain": "ドメイン",
            "dashboard.bounces": "バウンス数",
            "dashboard.no_bounces": "この期間のバウンスはありません。",
            "dashboard.queue": "現在のキュー",
            "dashboard.queue_caption": "配信・バウンス・期限切れのいずれにもなっていない宛先（状態別）",
            "dashboard.state": "状態",
            "dashboard.recipients": "宛先数",
            "dashboard.state_queued": "待機中",
            "dashboard.state_deferred": "遅延（再試行予定）",
            "dashboard.state_inflight": "配信中",
            "dashboard.state_held": "保留",
            "dashboard.queue_unreadable": "現在キューを読み取れません。しばらくしてからやり直してください。",
            "dashboard.today": "本日",
            "dashboard.today_messages": "本日のメッセージ",
            "dashboard.today_day": "{day} に受け付けた数（1 日の上限と同じくサーバー時刻の日付）",
            "dashboard.quota": "1 日の上限",
            "dashboard.no_quota": "なし",
        },
    }
)
