"""The console's words in English and Japanese, and which of the two a reader gets; no I/O.

Every text a page shows is a key here ("users.title"). The words shared by every page are below;
each page module adds its own with `add()` when it is imported, in both languages (a key missing
in Japanese falls back to English; one missing in English is a bug, and raises). Values are
str.format templates; what fills them is escaped by the template, never here.
"""

from __future__ import annotations

from typing import Any

LANGUAGES = ("en", "ja")
DEFAULT = "en"

_TEXT: dict[str, dict[str, str]] = {"en": {}, "ja": {}}


def add(table: dict[str, dict[str, str]]) -> None:
    """Add a page's texts: {"en": {key: text}, "ja": {key: text}}; a key added twice is a bug."""
    for lang, texts in table.items():
        for key, value in texts.items():
            if key in _TEXT[lang] and _TEXT[lang][key] != value:
                raise KeyError(f"console text {key!r} ({lang}) is defined twice")
            _TEXT[lang][key] = value


def has(key: str) -> bool:
    return key in _TEXT["en"]


def text(lang: str, key: str, **values: Any) -> str:
    template = _TEXT.get(lang, {}).get(key) or _TEXT[DEFAULT][key]
    return template.format(**values) if values else template


def choose(explicit: str, accept_language: str) -> str:
    """The reader's language: EXPLICIT (the switch's choice) if it is one of ours, else the first of
    ours in Accept-Language by its q values, else English."""
    if explicit in LANGUAGES:
        return explicit
    best, best_q = DEFAULT, 0.0
    for part in accept_language.split(",")[:20]:
        tag, _, params = part.strip().partition(";")
        q = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                q = float(params[2:])
            except ValueError:
                continue
        lang = tag.strip().lower().split("-")[0]
        if lang in LANGUAGES and q > best_q:  # strictly: among equal q values the first wins
            best, best_q = lang, q
    return best


add(
    {
        "en": {
            "app.title": "cmcd console",
            "app.skip": "Skip to content",
            "nav.label": "Main menu",
            "nav.dashboard": "Dashboard",
            "nav.mail": "Mail log",
            "nav.users": "Users",
            "nav.keys": "Sending credentials",
            "nav.domains": "Domains",
            "nav.blocks": "Blocks",
            "nav.webhooks": "Webhooks",
            "nav.logins": "Login log",
            "nav.ops": "Operation log",
            "nav.account": "My account",
            "nav.contact": "Contact the operator",
            "nav.signout": "Sign out",
            "nav.signed_in_as": "Signed in as {login} ({role}) of {tenant}",
            "nav.language": "Language",
            "role.admin": "admin",
            "role.viewer": "viewer",
            "role.sender": "sender",
            "common.save": "Save",
            "common.add": "Add",
            "common.delete": "Delete",
            "common.search": "Search",
            "common.download_csv": "Download CSV",
            "common.yes": "yes",
            "common.no": "no",
            "common.none": "None yet.",
            "common.next_page": "Next page",
            "common.copy": "Copy",
            "common.copied": "Copied",
            "common.actions": "Actions",
            "common.since": "From",
            "common.until": "Until",
            "common.time": "Time",
            "common.status": "Status",
            "common.shown_once": "Shown only now: copy it before you leave this page.",
            "common.back": "Back",
            "common.time_hint": "local time, e.g. 2026-12-01T09:00",
            "error.title": "Error",
            "error.forbidden": "Your role may not do this.",
            "error.not_found": "There is no such page or item in your tenant.",
            "error.csrf": "This form has expired or did not come from this console. Reload the page and try again.",
            "error.form_type": "Send the form as a web form.",
            "error.form_encoding": "The form is not valid UTF-8.",
            "error.bad_time": "{field}: enter a time like 2026-12-01T09:00",
            "error.store": "The change could not be saved now; try again in a moment.",
            "error.back": "Back to the dashboard",
        },
        "ja": {
            "app.title": "cmcd 管理コンソール",
            "app.skip": "本文へ移動",
            "nav.label": "メインメニュー",
            "nav.dashboard": "ダッシュボード",
            "nav.mail": "メールログ",
            "nav.users": "ユーザー",
            "nav.keys": "送信用の認証情報",
            "nav.domains": "ドメイン",
            "nav.blocks": "ブロック",
            "nav.webhooks": "Webhook",
            "nav.logins": "ログインログ",
            "nav.ops": "操作ログ",
            "nav.account": "アカウント",
            "nav.contact": "運用者へのお問い合わせ",
            "nav.signout": "サインアウト",
            "nav.signed_in_as": "{tenant} の {login}（{role}）でサインイン中",
            "nav.language": "言語",
            "role.admin": "管理者",
            "role.viewer": "閲覧者",
            "role.sender": "送信者",
            "common.save": "保存",
            "common.add": "追加",
            "common.delete": "削除",
            "common.search": "検索",
            "common.download_csv": "CSV をダウンロード",
            "common.yes": "はい",
            "common.no": "いいえ",
            "common.none": "まだありません。",
            "common.next_page": "次のページ",
            "common.copy": "コピー",
            "common.copied": "コピーしました",
            "common.actions": "操作",
            "common.since": "開始",
            "common.until": "終了",
            "common.time": "日時",
            "common.status": "状態",
            "common.shown_once": "この画面でしか表示されません。移動する前に控えてください。",
            "common.back": "戻る",
            "common.time_hint": "現地時刻（例: 2026-12-01T09:00）",
            "error.title": "エラー",
            "error.forbidden": "このロールではこの操作はできません。",
            "error.not_found": "このテナントにそのページまたは項目はありません。",
            "error.csrf": "フォームの有効期限が切れたか、このコンソールから送信されていません。再読み込みしてやり直してください。",
            "error.form_type": "Web フォームとして送信してください。",
            "error.form_encoding": "フォームが UTF-8 ではありません。",
            "error.bad_time": "{field}: 2026-12-01T09:00 の形式で入力してください",
            "error.store": "今は変更を保存できませんでした。しばらくしてからやり直してください。",
            "error.back": "ダッシュボードへ戻る",
        },
    }
)
