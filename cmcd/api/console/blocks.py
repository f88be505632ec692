"""The console's Blocks page: the tenant's suppression list (addresses mail is no longer sent to),
a page at a time or searched by address, added to or removed from by an admin, and downloaded
whole as CSV.

Each change is the tenancy command the API's /v1/blocks uses (the address rule, its transaction,
its operation-log row, which names no address: the log is kept for years); a refused one shows
the refusal on the page and changes nothing. Reads are the API's page read
(store.suppression_page). Remote text (a bounce's reason) is shown escaped, with its control
characters made visible, and goes to CSV through cmcd.textout.CsvWriter only.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from cmcd.api import paging
from cmcd.api.console import i18n
from cmcd.api.console.logs import CsvDownload, Rows, steps
from cmcd.api.console.web import Console, Page
from cmcd.api.problems import iso
from cmcd.tenancy.refusals import Reason, Refused
from cmcd.textout import escape_controls

#: rows on one page of the list
PAGE_ROWS = 50
REASON_MAX_CHARS = 200
#: what a suppression holds back, by its stream scope (store.suppression_page's "all" or "broadcast")
SCOPE_TEXTS = {"all": "stream.all", "broadcast": "stream.broadcast_scope"}


def register(c: Console) -> None:
    c.get("/blocks", block_list)
    c.get("/blocks.csv", block_csv)
    c.post("/blocks", block_add)
    c.post("/blocks/delete", block_delete)


async def block_list(page: Page) -> web.StreamResponse:
    return await _list(page)


async def _list(page: Page, status: int = 200, error: str = "", typed: dict[str, str] | None = None) -> web.Response:
    """The list page (STATUS, with ERROR and the add form's TYPED values after a refused change)."""
    api = page.api
    q = page.request.query
    search = q.get("address", "").strip()[:320]
    after = paging.cursor_in(q.get("after"))  # a cursor that is not ours: a 400 page naming it
    rows = await api.astore.call(api.store.suppression_page, page.caller.tenant_id, after, PAGE_ROWS, search or None)
    shown = [
        {"address": r["address"], "reason": escape_controls(r["reason"] or ""), "created": page.when(r["created"]),
         "stream": r["stream"], "scope": page.t(SCOPE_TEXTS.get(r["stream"], "stream.all"))}
        for r in rows
    ]  # fmt: skip
    next_page = ""
    if len(rows) == PAGE_ROWS:
        query = {"after": paging.cursor_out(rows[-1]["id"])} | ({"address": search} if search else {})
        next_page = "/blocks?" + urllib.parse.urlencode(query)
    return page.render(
        "blocks.html",
        status=status,
        rows=shown,
        search=search,
        first_page=after == 0,
        next_page=next_page,
        error=error,
        typed=typed or {"address": "", "reason": ""},
    )


async def block_add(page: Page) -> web.StreamResponse:
    api = page.api
    address = page.form.get("address", "").strip()
    reason = page.form.get("reason", "").strip()[:REASON_MAX_CHARS] or "added in the console"
    typed = {"address": address, "reason": page.form.get("reason", "")}
    try:
        added = await api.tenancy.accounts.suppression_add(
            page.op("console.blocks.add", "1 address"), page.caller.tenant, address, reason
        )
    except Refused as exc:  # the address rule
        return await _list(page, 400, exc.refusal.text, typed)
    return page.redirect("/blocks", done="blocks_added" if added else "blocks_listed")


async def block_delete(page: Page) -> web.StreamResponse:
    api = page.api
    address = page.form.get("address", "").strip()
    try:
        await api.tenancy.accounts.suppression_delete(
            page.op("console.blocks.delete", "1 address"), page.caller.tenant, address
        )
    except Refused as exc:
        if exc.refusal.reason is Reason.NOT_FOUND:
            return await _list(page, 404, page.t("blocks.not_listed"))
        return await _list(page, 400, exc.refusal.text)
    return page.redirect("/blocks", done="blocks_removed")


async def block_csv(page: Page) -> web.StreamResponse:
    """Every blocked address as CSV, read and sent a piece at a time (a long list is never held
    whole in memory), under api.write_timeout (logs.CsvDownload)."""
    api = page.api
    tenant_id = page.caller.tenant_id

    async def read(after: int, limit: int) -> list[dict[str, Any]]:
        return await api.astore.call(api.store.suppression_page, tenant_id, after, limit, None)

    async def pages() -> AsyncIterator[Rows]:
        async for rows in steps(read):
            yield [[r["address"], r["domain"], r["reason"], iso(r["created"]), r["stream"]] for r in rows]

    return CsvDownload("blocks.csv", ["address", "domain", "reason", "created", "stream"], pages)


i18n.add(
    {
        "en": {
            "blocks.title": "Blocks",
            "blocks.intro": (
                "Mail to these addresses is not sent. A hard bounce adds its address here; remove an address "
                "only when you know it receives mail again."
            ),
            "blocks.search": "Address",
            "blocks.search_hint": "the whole address; case does not matter",
            "blocks.show_all": "Show all",
            "blocks.address": "Address",
            "blocks.reason": "Reason",
            "blocks.added": "Added",
            "blocks.scope": "Not sent",
            "blocks.remove": "Remove",
            "blocks.remove_confirm": "Remove this address from the block list? Mail to it will be sent again.",
            "blocks.add_title": "Block an address",
            "blocks.reason_hint": "optional, up to 200 characters",
            "blocks.none": "No blocked addresses.",
            "blocks.none_found": "That address is not on your block list.",
            "blocks.not_listed": "That address is not on your block list.",
            "blocks.first_page": "First page",
            "done.blocks_added": "The address is blocked: mail to it is no longer sent.",
            "done.blocks_listed": "The address was already on the block list.",
            "done.blocks_removed": "The address is no longer blocked.",
        },
        "ja": {
            "blocks.title": "ブロック",
            "blocks.intro": (
                "これらのアドレスにはメールを送信しません。ハードバウンスしたアドレスはここに追加されます。"
                "再び受信できると分かっているときだけ削除してください。"
            ),
            "blocks.search": "アドレス",
            "blocks.search_hint": "アドレス全体（大文字小文字は区別しません）",
            "blocks.show_all": "すべて表示",
            "blocks.address": "アドレス",
            "blocks.reason": "理由",
            "blocks.added": "追加日時",
            "blocks.scope": "送信しないメール",
            "blocks.remove": "削除",
            "blocks.remove_confirm": "このアドレスをブロックリストから削除しますか？ 再びメールが送信されます。",
            "blocks.add_title": "アドレスをブロック",
            "blocks.reason_hint": "任意、200 文字まで",
            "blocks.none": "ブロック中のアドレスはありません。",
            "blocks.none_found": "そのアドレスはブロックリストにありません。",
            "blocks.not_listed": "そのアドレスはブロックリストにありません。",
            "blocks.first_page": "最初のページ",
            "done.blocks_added": "アドレスをブロックしました。今後このアドレスにはメールを送信しません。",
            "done.blocks_listed": "そのアドレスはすでにブロックリストにあります。",
            "done.blocks_removed": "アドレスのブロックを解除しました。",
        },
    }
)
