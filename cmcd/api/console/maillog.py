"""The mail log of the signed-in user's tenant: a search (time window, recipient, sender, event,
stream, tag, queue id) a page at a time, one message's history (every attempt for every recipient), and
the whole selection as a CSV download with the API's /v1/deliveries columns.

Reads only, always of page.caller.tenant_id, through the same store reads as the API's records.py
(store.log_page, store.message_tags): changes nothing. A queue id the tenant has no row for is
"not found", whoever's it is. Paging, the time window and the streamed CSV are logs.py's.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from cmcd.api.console import i18n
from cmcd.api.console.logs import (
    PAGE_ROWS,
    CsvDownload,
    Rows,
    Window,
    choice,
    cursor,
    field,
    filename,
    link,
    next_link,
    steps,
    window,
)
from cmcd.api.console.web import Console, ConsoleError, Page
from cmcd.api.problems import iso
from cmcd.api.records import DELIVERY_EVENTS
from cmcd.records import STREAMS

#: the window the search shows when the URL names none
DEFAULT_WINDOW_S = 86400.0
#: rows on one page of a message's history (a bulk message to many recipients has many)
HISTORY_ROWS = 500
#: a queue id is short; a longer one names nothing
QUEUE_ID_MAX = 64
#: the CSV's columns: the API's /v1/deliveries rows
CSV_COLUMNS = (
    "time", "queue_id", "event", "status", "sender", "recipient", "domain", "response", "bounce_class", "attempt", "mx",
    "ip", "tls", "delay", "size", "message_id", "tags", "stream",
)  # fmt: skip


def register(c: Console) -> None:
    c.get("/mail", search)
    c.get("/mail.csv", download)
    c.get("/mail/{queue_id}", history)


@dataclass(frozen=True)
class MailFilters:
    window: Window
    recipient: str
    sender: str
    status: str  # one of DELIVERY_EVENTS, "" for any
    tag: str
    queue_id: str
    stream: str = ""  # one of STREAMS, "" for any

    def query(self) -> dict[str, str]:
        named = {"recipient": self.recipient, "sender": self.sender, "status": self.status, "tag": self.tag,
                 "queue_id": self.queue_id, "stream": self.stream}  # fmt: skip
        return self.window.query() | {k: v for k, v in named.items() if v}


def filters(page: Page) -> MailFilters:
    return MailFilters(
        window(page, DEFAULT_WINDOW_S),
        recipient=field(page, "recipient"),
        sender=field(page, "sender"),
        status=choice(page, "status", DELIVERY_EVENTS),
        tag=field(page, "tag"),
        queue_id=field(page, "queue_id")[:QUEUE_ID_MAX],
        stream=choice(page, "stream", STREAMS),
    )


async def _rows(page: Page, f: MailFilters, after: int, limit: int) -> list[dict[str, Any]]:
    """A page of the selection, as the API's deliveries endpoint reads it."""
    api = page.api
    rows: list[dict[str, Any]] = await api.astore.call(
        api.store.log_page, "mail", tenant_id=page.caller.tenant_id, since=f.window.since, until=f.window.until,
        rcpt=f.recipient or None, sender=f.sender or None, queue_id=f.queue_id or None,
        events=(f.status,) if f.status else DELIVERY_EVENTS, tag=f.tag or None, stream=f.stream or None, after=after,
        limit=limit,
    )  # fmt: skip
    return rows


async def _tags(page: Page, rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    api = page.api
    tags: dict[str, list[str]] = await api.astore.call(api.store.message_tags, sorted({r["queue_id"] for r in rows}))
    return tags


def event_label(page: Page, event: str) -> str:
    key = f"maillog.event.{event}"
    return page.t(key) if i18n.has(key) else event


def stream_label(page: Page, stream: str) -> str:
    key = f"stream.{stream}"
    return page.t(key) if i18n.has(key) else stream


def class_label(page: Page, bounce_class: str) -> str:
    """A bounce class in the reader's language ("" for a row with none: a delivery, an acceptance)."""
    key = f"bounce_class.{bounce_class}"
    return page.t(key) if bounce_class and i18n.has(key) else bounce_class


def _shown(page: Page, r: dict[str, Any], tags: dict[str, list[str]]) -> dict[str, Any]:
    """A row as a page shows it: the tenant's local time, the event in the reader's language."""
    return r | {
        "when": page.when(r["ts"]),
        "event_label": event_label(page, r["event"]),
        "delay_text": f"{r['delay']:.1f} s" if r["delay"] else "",
        "stream_label": stream_label(page, r["stream"]),
        "class_label": class_label(page, r["bounce_class"] or ""),
        "tags": tags.get(r["queue_id"], []),
        "response": r["response"] or "",
    }


async def search(page: Page) -> web.StreamResponse:
    f = filters(page)
    rows = await _rows(page, f, cursor(page), PAGE_ROWS)
    tags = await _tags(page, rows)
    return page.render(
        "maillog.html",
        f=f,
        rows=[_shown(page, r, tags) for r in rows],
        events=[(e, event_label(page, e)) for e in DELIVERY_EVENTS],
        streams=[(s, page.t(f"stream.{s}")) for s in STREAMS],
        next_url=next_link("/mail", f.query(), rows, PAGE_ROWS),
        csv_url=link("/mail.csv", f.query()),
    )


def delivery_row(r: dict[str, Any], tags: dict[str, list[str]]) -> tuple[Any, ...]:
    """A mail-log row as the API's /v1/deliveries gives it, in CSV_COLUMNS order."""
    return (
        iso(r["ts"]), r["queue_id"], r["event"], r["status"], r["sender"], r["rcpt"], r["rcpt_domain"],
        r["response"] or "", r["bounce_class"] or "", r["attempt"], r["mx"], r["ip"], r["tls"], round(r["delay"], 3),
        r["size"],
        r["message_id"], tags.get(r["queue_id"], []), r["stream"],
    )  # fmt: skip


async def download(page: Page) -> web.StreamResponse:
    """The whole selection (every page of it, from the first: no cursor) as CSV."""
    f = filters(page)

    async def pages() -> AsyncIterator[Rows]:
        async for rows in steps(lambda after, limit: _rows(page, f, after, limit)):
            tags = await _tags(page, rows)
            yield [delivery_row(r, tags) for r in rows]

    return CsvDownload(filename(page, "mail-log"), CSV_COLUMNS, pages)


async def history(page: Page) -> web.StreamResponse:
    """Every row of one queue id in this tenant, oldest first; not found when there is none."""
    queue_id = page.request.match_info["queue_id"]
    if not queue_id or len(queue_id) > QUEUE_ID_MAX:
        raise ConsoleError(404, page.t("error.not_found"))
    api = page.api
    after = cursor(page)
    rows: list[dict[str, Any]] = await api.astore.call(
        api.store.log_page, "mail", tenant_id=page.caller.tenant_id, queue_id=queue_id, after=after,
        limit=HISTORY_ROWS,
    )  # fmt: skip
    if not rows:
        raise ConsoleError(404, page.t("error.not_found"))
    tags = await _tags(page, rows)
    first = rows[0]
    accepted = next((r for r in rows if r["event"] == "accepted"), None)
    return page.render(
        "maillog_history.html",
        queue_id=queue_id,
        sender=first["sender"],
        message_id=first["message_id"],
        size=first["size"],
        tags=tags.get(queue_id, []),
        stream=first["stream"],
        stream_label=stream_label(page, first["stream"]),
        accepted=page.when(accepted["ts"]) if accepted is not None else "",
        recipients=len({r["rcpt"] for r in rows}),
        rows=[_shown(page, r, tags) for r in rows],
        next_url=next_link("/mail/" + urllib.parse.quote(queue_id, safe=""), {}, rows, HISTORY_ROWS),
        csv_url=link("/mail.csv", {"since": "", "queue_id": queue_id}),
    )


i18n.add(
    {
        "en": {
            "maillog.title": "Mail log",
            "maillog.intro": "Every message your applications sent: when it was accepted, each delivery attempt and "
            "how it ended. Addresses must be typed in full.",
            "maillog.recipient": "Recipient",
            "maillog.sender": "Sender",
            "maillog.event": "Event",
            "maillog.tag": "Tag",
            "maillog.queue_id": "Queue ID",
            "maillog.any": "Any",
            "maillog.response": "Response",
            "maillog.tls": "TLS",
            "maillog.delay": "Delay",
            "maillog.tags": "Tags",
            "maillog.caption": "Mail-log events, oldest first",
            "maillog.none": "No mail-log events match this search.",
            "maillog.history.title": "Message {queue_id}",
            "maillog.history.facts": "About this message",
            "maillog.history.accepted": "Accepted",
            "maillog.history.message_id": "Message-ID",
            "maillog.history.size": "Size (bytes)",
            "maillog.history.recipients": "Recipients on this page",
            "maillog.history.caption": "Every event of this message, oldest first",
            "maillog.history.attempt": "Attempt",
            "maillog.history.mx": "MX",
            "maillog.history.ip": "IP",
            "maillog.history.reply": "Remote reply",
            "maillog.history.back": "Back to the mail log",
            "maillog.event.accepted": "accepted",
            "maillog.event.deferred": "deferred",
            "maillog.event.delivered": "delivered",
            "maillog.event.bounced": "bounced",
            "maillog.event.expired": "expired",
            "maillog.event.suppressed": "suppressed",
            "maillog.event.deleted": "deleted",
            "maillog.event.lost": "lost",
        },
        "ja": {
            "maillog.title": "メールログ",
            "maillog.intro": "アプリケーションが送信したすべてのメールについて、受付日時、配信の試行と結果を表示します。"
            "アドレスは完全な形で入力してください。",
            "maillog.recipient": "宛先",
            "maillog.sender": "送信者",
            "maillog.event": "イベント",
            "maillog.tag": "タグ",
            "maillog.queue_id": "キュー ID",
            "maillog.any": "すべて",
            "maillog.response": "応答",
            "maillog.tls": "TLS",
            "maillog.delay": "遅延",
            "maillog.tags": "タグ",
            "maillog.caption": "メールログのイベント（古い順）",
            "maillog.none": "この条件に一致するイベントはありません。",
            "maillog.history.title": "メッセージ {queue_id}",
            "maillog.history.facts": "このメッセージについて",
            "maillog.history.accepted": "受付日時",
            "maillog.history.message_id": "Message-ID",
            "maillog.history.size": "サイズ（バイト）",
            "maillog.history.recipients": "このページの宛先数",
            "maillog.history.caption": "このメッセージのすべてのイベント（古い順）",
            "maillog.history.attempt": "試行",
            "maillog.history.mx": "MX",
            "maillog.history.ip": "IP",
            "maillog.history.reply": "相手サーバーの応答",
            "maillog.history.back": "メールログへ戻る",
            "maillog.event.accepted": "受付",
            "maillog.event.deferred": "再送待ち",
            "maillog.event.delivered": "配信済み",
            "maillog.event.bounced": "バウンス",
            "maillog.event.expired": "期限切れ",
            "maillog.event.suppressed": "抑止",
            "maillog.event.deleted": "削除",
            "maillog.event.lost": "消失",
        },
    }
)
