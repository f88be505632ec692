"""The console's "Webhooks" page (admins only): the tenant's endpoints with their delivery state,
adding one (the signing secret shown once) and deleting one.

The same tenancy commands as the HTTP API and cmcctl (webhooks.add with the daemon's resolver and
its SSRF guard, at most ten a tenant; webhooks.delete), named `console.webhooks.*` in the
operation log. A refused URL is told in the tenant's words (UrlRefused.public: nothing the
daemon's resolver learned about the host). Another tenant's webhook id is "not found". Never
posts to an endpoint (cmcd.api.webhooks does).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from cmcd.api.console import i18n
from cmcd.api.console.web import Console, ConsoleError, Page
from cmcd.store.webhook_store import WEBHOOK_EVENTS
from cmcd.tenancy.refusals import Reason, Refused
from cmcd.tenancy.webhooks import UrlRefused

#: the add form's checkbox of an event is named EVENT_FIELD + the event
EVENT_FIELD = "event_"


def register(c: Console) -> None:
    c.get("/webhooks", hooks_page, need="manage")
    c.post("/webhooks", hook_add, need="manage")
    c.post("/webhooks/{webhook_id}/delete", hook_delete, need="manage")


async def hooks_page(page: Page) -> web.StreamResponse:
    return await _render(page)


async def _render(
    page: Page, status: int = 200, error: str = "", url: str = "", events: tuple[str, ...] = WEBHOOK_EVENTS
) -> web.Response:
    """The page: every endpoint with its delivery state, and the form that adds one (with ERROR,
    the refusal of the URL and EVENTS it held)."""
    api = page.api
    hooks = await api.astore.call(api.store.webhooks, page.caller.tenant)
    rows = [
        {"id": h["id"], "url": h["url"], "events": ", ".join(page.t(f"webhooks.event_{e}") for e in h["events"]),
         "created": page.when(h["created"]), "sent": h["sent"], "dropped": h["dropped"], "attempts": h["attempts"],
         "last_success": page.when(h["last_success"]) if h["last_success"] else "",
         "failing_since": page.when(h["failing_since"]) if h["failing_since"] else "",
         "next_attempt": page.when(h["next_attempt"]) if h["failing_since"] and h["next_attempt"] else "",
         "last_error": h["last_error"] or ""}
        for h in hooks
    ]  # fmt: skip
    return page.render(
        "webhooks.html",
        status=status,
        hooks=rows,
        events=[
            {"name": e, "field": EVENT_FIELD + e, "label": page.t(f"webhooks.event_{e}"), "on": e in events}
            for e in WEBHOOK_EVENTS
        ],
        error=error,
        url=url,
    )


def _added(row: dict[str, Any]) -> tuple[str, str]:
    """The operation-log row of an endpoint added: its id, and the events it gets."""
    return f"webhook={row['id']}", ",".join(row["events"])


async def hook_add(page: Page) -> web.StreamResponse:
    url = page.form.get("url", "").strip()
    wanted = tuple(e for e in WEBHOOK_EVENTS if page.form.get(EVENT_FIELD + e))
    op = page.op("console.webhooks.add", "-", ok_row=_added)
    try:
        row, secret = await page.api.tenancy.webhooks.add(op, page.caller.tenant, url, list(wanted), page.api.resolver)
    except UrlRefused as exc:
        return await _render(page, 422, exc.public.text, url, wanted)
    except Refused as exc:
        status = 409 if exc.refusal.reason is Reason.CONFLICT else 422
        return await _render(page, status, exc.refusal.text, url, wanted)
    return page.render(
        "webhooks_created.html",
        url=row["url"],
        events=", ".join(page.t(f"webhooks.event_{e}") for e in row["events"]),
        secret=secret,
    )


async def hook_delete(page: Page) -> web.StreamResponse:
    raw = page.request.match_info["webhook_id"]
    try:
        await page.api.tenancy.webhooks.delete(
            page.op("console.webhooks.delete", f"webhook={raw[:20]}"), page.caller.tenant, raw
        )
    except Refused as exc:
        if exc.refusal.reason is Reason.NOT_FOUND:  # another tenant's, or none
            raise ConsoleError(404, page.t("error.not_found")) from None
        raise ConsoleError(409 if exc.refusal.reason is Reason.CONFLICT else 422, exc.refusal.text) from None
    return page.redirect("/webhooks", done="webhooks_deleted")


i18n.add(
    {
        "en": {
            "webhooks.title": "Webhooks",
            "webhooks.intro": "cmcd posts delivery events to these URLs, signed with each endpoint's secret.",
            "webhooks.url": "URL",
            "webhooks.events": "Events",
            "webhooks.created": "Created",
            "webhooks.sent": "Sent",
            "webhooks.dropped": "Dropped",
            "webhooks.last_success": "Last success",
            "webhooks.never": "never",
            "webhooks.ok": "working",
            "webhooks.waiting": "nothing posted yet",
            "webhooks.failing": "failing since {since} ({attempts} attempts)",
            "webhooks.next_attempt": "next attempt {when}",
            "webhooks.last_error": "last error: {error}",
            "webhooks.delete_confirm": "Delete the webhook to {url}? Events stop going there at once.",
            "webhooks.add_title": "New webhook",
            "webhooks.url_hint": "https:// (or http://) and a host that resolves to public addresses.",
            "webhooks.add": "Add webhook",
            "webhooks.event_delivered": "delivered",
            "webhooks.event_deferred": "deferred",
            "webhooks.event_bounced": "bounced",
            "webhooks.event_expired": "expired",
            "webhooks.event_suppressed": "suppressed",
            "webhooks.event_unsubscribed": "unsubscribed (one-click)",
            "webhooks.created_title": "Webhook added",
            "webhooks.created_intro": "Events ({events}) go to {url} from now on.",
            "webhooks.secret": "Signing secret",
            "webhooks.secret_note": "Check each request's signature with this secret before you trust it.",
            "webhooks.back": "Back to webhooks",
            "done.webhooks_deleted": "The webhook is deleted.",
        },
        "ja": {
            "webhooks.title": "Webhook",
            "webhooks.intro": "cmcd は配信イベントをこれらの URL に送信します。各エンドポイントのシークレットで署名されます。",
            "webhooks.url": "URL",
            "webhooks.events": "イベント",
            "webhooks.created": "作成日時",
            "webhooks.sent": "送信済み",
            "webhooks.dropped": "破棄",
            "webhooks.last_success": "最終成功",
            "webhooks.never": "なし",
            "webhooks.ok": "正常",
            "webhooks.waiting": "まだ送信していません",
            "webhooks.failing": "{since} から失敗中（{attempts} 回試行）",
            "webhooks.next_attempt": "次回の試行 {when}",
            "webhooks.last_error": "最後のエラー: {error}",
            "webhooks.delete_confirm": "{url} への Webhook を削除しますか？ イベントはすぐに送られなくなります。",
            "webhooks.add_title": "新しい Webhook",
            "webhooks.url_hint": "https://（または http://）で、公開アドレスに解決されるホスト。",
            "webhooks.add": "Webhook を追加",
            "webhooks.event_delivered": "配信済み",
            "webhooks.event_deferred": "遅延",
            "webhooks.event_bounced": "バウンス",
            "webhooks.event_expired": "期限切れ",
            "webhooks.event_suppressed": "抑止",
            "webhooks.event_unsubscribed": "配信停止（ワンクリック）",
            "webhooks.created_title": "Webhook を追加しました",
            "webhooks.created_intro": "これから {url} にイベント（{events}）を送信します。",
            "webhooks.secret": "署名用シークレット",
            "webhooks.secret_note": "受け取ったリクエストは、このシークレットで署名を確認してから信頼してください。",
            "webhooks.back": "Webhook へ戻る",
            "done.webhooks_deleted": "Webhook を削除しました。",
        },
    }
)
