"""The login log and the operation log of the signed-in user's tenant: a page at a time with
filters, and the whole selection as a CSV download; and the pieces every log page shares (the
time window, the cursor, the streamed CSV), which the mail log (maillog.py) uses too.

Reads only, always of page.caller.tenant_id (store.log_page, as the API's /v1/audit): changes
nothing. A CSV download is written page by page as the store is read, never held whole in
memory, and under api.write_timeout like every API response (CsvDownload).
"""

from __future__ import annotations

import datetime
import io
import re
import urllib.parse
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from cmcd.api import paging
from cmcd.api.console import i18n
from cmcd.api.console.web import Console, ConsoleError, Page, secure_headers
from cmcd.api.problems import Problem, iso
from cmcd.textout import CsvWriter

#: rows on one page of a log
PAGE_ROWS = 100
#: rows read from the store per step of a CSV download
CSV_PAGE_ROWS = 100
#: the window a log page shows when the URL names none
LOGINS_DEFAULT_S = 7 * 86400
OPS_DEFAULT_S = 30 * 86400
#: what a filter may hold (longer is cut)
FIELD_MAX = 320

LOGIN_RESULTS = ("ok", "fail", "throttled")
OP_RESULTS = ("ok", "refused")
LOGIN_COLUMNS = ("time", "login", "client_ip", "mechanism", "result", "detail")
OP_COLUMNS = ("time", "actor", "action", "target", "result", "detail")

#: one step of a download: the rows the store gave (a short list ends it)
Rows = list[Sequence[Any]]


def register(c: Console) -> None:
    c.get("/logins", logins)
    c.get("/logins.csv", logins_csv)
    c.get("/ops", ops)
    c.get("/ops.csv", ops_csv)


# -- what every log page shares -------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """The time window of a log page: as typed (and carried by its links) and as epoch seconds."""

    since_text: str
    until_text: str
    since: float | None
    until: float | None

    def query(self) -> dict[str, str]:
        """The window as URL parameters: "since" always (empty is "no lower bound", absent is the default)."""
        return {"since": self.since_text} | ({"until": self.until_text} if self.until_text else {})


def local_text(page: Page, ts: float) -> str:
    """TS as the tenant's local time the way the forms take it (2026-12-01T09:00)."""
    return datetime.datetime.fromtimestamp(ts, page.tz).strftime("%Y-%m-%dT%H:%M")


def window(page: Page, default_s: float) -> Window:
    """The window ?since= and ?until= name, read in the tenant's time zone; without ?since the
    last DEFAULT_S seconds (to the minute, so the page's links carry the same window)."""
    q = page.request.query
    since_text = q["since"].strip() if "since" in q else local_text(page, page.api.clock() - default_s)
    until_text = q.get("until", "").strip()
    since = page.local_time(since_text, page.t("common.since"))
    until = page.local_time(until_text, page.t("common.until"))
    return Window(since_text, until_text, since, until)


def field(page: Page, name: str) -> str:
    """The filter ?NAME= as typed (trimmed, cut at FIELD_MAX), "" when absent."""
    return page.request.query.get(name, "").strip()[:FIELD_MAX]


def choice(page: Page, name: str, allowed: Sequence[str]) -> str:
    """The filter ?NAME=, which must be one of ALLOWED or "" (any); else a 400."""
    value = field(page, name)
    if value and value not in allowed:
        raise ConsoleError(400, page.t("logs.bad_choice", field=name, allowed=", ".join(allowed)))
    return value


def cursor(page: Page) -> int:
    """The ?cursor= of a "next page" link (paging.cursor_in's), 0 on the first page."""
    try:
        return paging.cursor_in(page.request.query.get("cursor") or None)
    except Problem:
        raise ConsoleError(400, page.t("logs.bad_cursor")) from None


def link(path: str, params: dict[str, str]) -> str:
    return path + "?" + urllib.parse.urlencode(params)


def next_link(path: str, params: dict[str, str], rows: list[dict[str, Any]], limit: int) -> str:
    """The "next page" link after ROWS (a full page of LIMIT), "" after the last page."""
    if len(rows) < limit:
        return ""
    return link(path, params | {"cursor": paging.cursor_out(rows[-1]["id"])})


def filename(page: Page, what: str) -> str:
    """A download's file name: what, the tenant and when (only characters every system keeps)."""
    tenant = re.sub(r"[^A-Za-z0-9._-]", "_", page.caller.tenant)
    stamp = datetime.datetime.fromtimestamp(page.api.clock(), page.tz).strftime("%Y%m%d-%H%M")
    return f"{what}-{tenant}-{stamp}.csv"


class CsvDownload(web.StreamResponse):
    """A CSV file (an attachment named FILENAME; HEADER, then the rows of each step PAGES yields)
    written as the store is read, so a selection of any size never sits in memory.

    The handler returns it unwritten: ApiServer's middleware (server.py _write_response) prepares
    it and calls write_eof under api.write_timeout, and write_eof is where the rows are read and
    written, step by step, each write waiting for the client to take the bytes. A client that
    stops reading is reset by that timer and the reading stops with it. (Prepared and written
    inside the handler instead, the writes would run before the middleware's timer, with none.)
    A store failure half-way ends the connection without the last chunk, so the download fails
    visibly instead of looking complete."""

    def __init__(self, name: str, header: Sequence[str], pages: Callable[[], AsyncIterator[Rows]]):
        super().__init__(
            headers={
                "Content-Disposition": f'attachment; filename="{name}"',
                "Cache-Control": "no-store",  # records of people's mail and sign-ins: never cached
            }
        )
        self.content_type = "text/csv"
        self.charset = "utf-8"
        secure_headers(self)
        self._header = header
        self._pages: Callable[[], AsyncIterator[Rows]] | None = pages

    async def write_eof(self, data: bytes = b"") -> None:
        pages, self._pages = self._pages, None
        if pages is not None and self.prepared:
            buf = io.StringIO()
            out = CsvWriter(buf)  # the one CSV writer: remote replies and addresses are outsiders' text
            out.writerow(self._header)
            async for rows in pages():
                for row in rows:
                    out.writerow(row)
                await self.write(buf.getvalue().encode())
                buf.seek(0)
                buf.truncate()
            if buf.tell():
                await self.write(buf.getvalue().encode())
        await super().write_eof(data)


async def steps(read: Callable[[int, int], Any]) -> AsyncIterator[list[dict[str, Any]]]:
    """The pages READ(after, limit) returns (awaitable store reads), CSV_PAGE_ROWS at a time, to the end."""
    after = 0
    while True:
        rows: list[dict[str, Any]] = await read(after, CSV_PAGE_ROWS)
        yield rows
        if len(rows) < CSV_PAGE_ROWS:
            return
        after = rows[-1]["id"]


# -- the login log --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoginFilters:
    window: Window
    result: str

    def query(self) -> dict[str, str]:
        return self.window.query() | ({"result": self.result} if self.result else {})


def login_filters(page: Page) -> LoginFilters:
    return LoginFilters(window(page, LOGINS_DEFAULT_S), choice(page, "result", LOGIN_RESULTS))


async def _login_rows(page: Page, f: LoginFilters, after: int, limit: int) -> list[dict[str, Any]]:
    api = page.api
    rows: list[dict[str, Any]] = await api.astore.call(
        api.store.log_page, "login", tenant_id=page.caller.tenant_id, since=f.window.since,
        until=f.window.until, status=f.result or None, after=after, limit=limit,
    )  # fmt: skip
    return rows


async def logins(page: Page) -> web.StreamResponse:
    f = login_filters(page)
    rows = await _login_rows(page, f, cursor(page), PAGE_ROWS)
    shown = [
        {"when": page.when(r["ts"]), "login": r["login"], "client_ip": r["client_ip"], "mechanism": r["mechanism"],
         "result": r["result"], "result_label": result_label(page, r["result"]), "detail": r["detail"]}
        for r in rows
    ]  # fmt: skip
    return page.render(
        "logs_logins.html",
        f=f,
        rows=shown,
        results=[(v, result_label(page, v)) for v in LOGIN_RESULTS],
        next_url=next_link("/logins", f.query(), rows, PAGE_ROWS),
        csv_url=link("/logins.csv", f.query()),
    )


async def logins_csv(page: Page) -> web.StreamResponse:
    f = login_filters(page)

    async def pages() -> AsyncIterator[Rows]:
        async for rows in steps(lambda after, limit: _login_rows(page, f, after, limit)):
            yield [(iso(r["ts"]), *(r[k] for k in LOGIN_COLUMNS[1:])) for r in rows]

    return CsvDownload(filename(page, "login-log"), LOGIN_COLUMNS, pages)


# -- the operation log ----------------------------------------------------------------------------


@dataclass(frozen=True)
class OpFilters:
    window: Window
    result: str
    action: str  # a prefix: "console." or "api.users"

    def query(self) -> dict[str, str]:
        return (
            self.window.query()
            | ({"result": self.result} if self.result else {})
            | ({"action": self.action} if self.action else {})
        )


def op_filters(page: Page) -> OpFilters:
    return OpFilters(window(page, OPS_DEFAULT_S), choice(page, "result", OP_RESULTS), field(page, "action")[:100])


async def _op_rows(page: Page, f: OpFilters, after: int, limit: int) -> list[dict[str, Any]]:
    api = page.api
    common: dict[str, Any] = {
        "tenant_id": page.caller.tenant_id, "since": f.window.since, "until": f.window.until,
        "status": f.result or None, "after": after, "limit": limit,
    }  # fmt: skip
    rows: list[dict[str, Any]]
    if f.action:
        rows = await api.astore.call(api.store.ops_page_by_action, f.action, **common)
    else:
        rows = await api.astore.call(api.store.log_page, "ops", **common)
    return rows


async def ops(page: Page) -> web.StreamResponse:
    f = op_filters(page)
    rows = await _op_rows(page, f, cursor(page), PAGE_ROWS)
    shown = [
        {"when": page.when(r["ts"]), "actor": r["actor"], "action": r["action"], "target": r["target"],
         "result": r["result"], "result_label": result_label(page, r["result"]), "detail": r["detail"]}
        for r in rows
    ]  # fmt: skip
    return page.render(
        "logs_ops.html",
        f=f,
        rows=shown,
        results=[(v, result_label(page, v)) for v in OP_RESULTS],
        next_url=next_link("/ops", f.query(), rows, PAGE_ROWS),
        csv_url=link("/ops.csv", f.query()),
    )


async def ops_csv(page: Page) -> web.StreamResponse:
    f = op_filters(page)

    async def pages() -> AsyncIterator[Rows]:
        async for rows in steps(lambda after, limit: _op_rows(page, f, after, limit)):
            yield [(iso(r["ts"]), *(r[k] for k in OP_COLUMNS[1:])) for r in rows]

    return CsvDownload(filename(page, "operation-log"), OP_COLUMNS, pages)


def result_label(page: Page, result: str) -> str:
    key = f"logs.result.{result}"
    return page.t(key) if i18n.has(key) else result


i18n.add(
    {
        "en": {
            "logs.bad_choice": "{field}: choose one of {allowed}",
            "logs.bad_cursor": "This page link is not valid any more; start again from the first page.",
            "logs.any": "Any",
            "logs.result": "Result",
            "logs.detail": "Detail",
            "logs.zone": "Times are in {zone}.",
            "logs.result.ok": "succeeded",
            "logs.result.fail": "failed",
            "logs.result.throttled": "held back (too many failures)",
            "logs.result.refused": "refused",
            "logs.logins.title": "Login log",
            "logs.logins.intro": "Every sign-in to your tenant through SMTP, the API or this console, "
            "successful or not. A sign-in you do not recognise, from an address you do not know, "
            "is a reason to change that password and revoke keys.",
            "logs.logins.caption": "Sign-ins, oldest first",
            "logs.logins.login": "Login",
            "logs.logins.client_ip": "Client IP",
            "logs.logins.mechanism": "Mechanism",
            "logs.logins.none": "No sign-ins in this window.",
            "logs.ops.title": "Operation log",
            "logs.ops.intro": "Every change made to your tenant, by whom, through the console, the API or the operator.",
            "logs.ops.caption": "Changes, oldest first",
            "logs.ops.actor": "Who",
            "logs.ops.action": "Action",
            "logs.ops.action_hint": "the start of an action, e.g. console. or api.users",
            "logs.ops.target": "Target",
            "logs.ops.none": "No changes in this window.",
        },
        "ja": {
            "logs.bad_choice": "{field}: {allowed} のいずれかを選んでください",
            "logs.bad_cursor": "このページのリンクはもう使えません。最初のページからやり直してください。",
            "logs.any": "すべて",
            "logs.result": "結果",
            "logs.detail": "詳細",
            "logs.zone": "時刻は {zone} です。",
            "logs.result.ok": "成功",
            "logs.result.fail": "失敗",
            "logs.result.throttled": "制限中（失敗が多すぎます）",
            "logs.result.refused": "拒否",
            "logs.logins.title": "ログインログ",
            "logs.logins.intro": "SMTP、API、このコンソールからのテナントへのサインインを、成功・失敗を問わずすべて記録しています。"
            "心当たりのないサインインや知らないアドレスからのサインインがあれば、パスワードを変更し、キーを無効にしてください。",
            "logs.logins.caption": "サインイン（古い順）",
            "logs.logins.login": "ログイン名",
            "logs.logins.client_ip": "接続元 IP",
            "logs.logins.mechanism": "方式",
            "logs.logins.none": "この期間のサインインはありません。",
            "logs.ops.title": "操作ログ",
            "logs.ops.intro": "コンソール、API、運用者によるテナントへの変更と、その実行者をすべて記録しています。",
            "logs.ops.caption": "変更（古い順）",
            "logs.ops.actor": "実行者",
            "logs.ops.action": "操作",
            "logs.ops.action_hint": "操作名の先頭（例: console. や api.users）",
            "logs.ops.target": "対象",
            "logs.ops.none": "この期間の変更はありません。",
        },
    }
)
