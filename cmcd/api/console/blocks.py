"""The console's Blocks page: the tenant's suppression list (addresses mail is no longer sent to),
a page at a time or searched by address, added to or removed from by an admin, and downloaded
whole as CSV; and the tenant's block policy (what a bounce of each class does to its recipient),
seen by every role and set by an admin.

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

from cmcd import bounces
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
    c.post("/blocks/policy", policy_set)


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
         "stream": r["stream"], "scope": page.t(SCOPE_TEXTS.get(r["stream"], "stream.all")),
         "bounce_class": r["bounce_class"], "class_label": _class_label(page, r["bounce_class"]),
         "expires": page.when(r["expires"]) if r["expires"] is not None else ""}
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
        policy=await _policy(page),
    )


def _class_label(page: Page, bounce_class: str) -> str:
    return page.t(f"bounce_class.{bounce_class}") if bounce_class in bounces.CLASSES else bounce_class


async def _policy(page: Page) -> dict[str, Any]:
    """The block policy in force for the tenant, as the page shows it: a row per class (its action,
    the tenant's own or "" for the host's, and the host's), and the host's threshold, window and watch period."""
    api = page.api
    host = api.config.bounces.policy()
    own = (await api.astore.call(api.store.tenant_block_actions)).get(page.caller.tenant_id, {})
    return {
        "rows": [
            {"class": cls, "label": _class_label(page, cls), "action": host.action(cls, own), "own": own.get(cls, ""),
             "host": host.action(cls)}
            for cls in bounces.CLASSES
        ],
        "actions": [(a, page.t(f"blocks.action.{a}")) for a in bounces.ACTIONS],
        "rule": page.t(
            "blocks.policy_rule", threshold=host.count_threshold, window=_days(host.count_window_s),
            watch=_days(host.watch_s) if host.watch_s > 0 else page.t("blocks.never"),
        ),
    }  # fmt: skip


def _days(seconds: float) -> str:
    days = seconds / 86400
    return f"{days:g} d" if days >= 1 else f"{seconds / 3600:g} h"


async def policy_set(page: Page) -> web.StreamResponse:
    """The admin's form: one select a class, "default" for the host's action; the whole set replaces the tenant's own."""
    api = page.api
    changes = {cls: page.form.get(f"action.{cls}", bounces.DEFAULT) for cls in bounces.CLASSES}
    try:
        bounces.check_tenant_actions(changes)
    except ValueError as exc:
        return await _list(page, 400, str(exc))
    try:
        await api.tenancy.accounts.tenant_set(
            page.op("console.blocks.policy", "block policy"), page.caller.tenant, block_actions=changes
        )
    except Refused as exc:
        return await _list(page, 400, exc.refusal.text)
    return page.redirect("/blocks", done="blocks_policy_set")


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
            yield [[r["address"], r["domain"], r["reason"], iso(r["created"]), r["stream"], r["bounce_class"],
                    iso(r["expires"]) if r["expires"] is not None else ""] for r in rows]  # fmt: skip

    columns = ["address", "domain", "reason", "created", "stream", "bounce_class", "expires"]
    return CsvDownload("blocks.csv", columns, pages)


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
            "done.blocks_policy_set": "The block policy is saved: the next bounces follow it.",
            "blocks.class": "Bounce class",
            "blocks.expires": "Expires",
            "blocks.never": "never",
            "blocks.policy_title": "Block policy",
            "blocks.policy_intro": (
                "What a bounce of each class does to its recipient. Choose your own action for a class, or keep "
                "the server's default."
            ),
            "blocks.policy_rule": (
                "Block after repeated bounces: once {threshold} bounces of the class come within {window}. A block "
                "ends {watch} after the last bounce that made or renewed it."
            ),
            "blocks.policy_action": "Action",
            "blocks.policy_default": "Server default",
            "blocks.policy_default_option": "Server default ({action})",
            "blocks.policy_save": "Save the block policy",
            "blocks.action.suppress": "block at once",
            "blocks.action.count": "block after repeated bounces",
            "blocks.action.alert": "never block; alert",
            "blocks.action.none": "never block; log only",
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
            "done.blocks_policy_set": "ブロックポリシーを保存しました。以後のバウンスに適用されます。",
            "blocks.class": "バウンスの種類",
            "blocks.expires": "有効期限",
            "blocks.never": "無期限",
            "blocks.policy_title": "ブロックポリシー",
            "blocks.policy_intro": (
                "バウンスの種類ごとに、その宛先をどう扱うかを決めます。種類ごとに独自の動作を選ぶか、"
                "サーバーの既定値のままにしてください。"
            ),
            "blocks.policy_rule": (
                "繰り返し: {window} 以内に同じ種類のバウンスが {threshold} 回あるとブロックします。"
                "ブロックは最後のバウンスから {watch} 後に解除されます。"
            ),
            "blocks.policy_action": "動作",
            "blocks.policy_default": "サーバーの既定値",
            "blocks.policy_default_option": "サーバーの既定値（{action}）",
            "blocks.policy_save": "ブロックポリシーを保存",
            "blocks.action.suppress": "すぐにブロック",
            "blocks.action.count": "繰り返したらブロック",
            "blocks.action.alert": "ブロックせず警告",
            "blocks.action.none": "ブロックせず記録のみ",
        },
    }
)
