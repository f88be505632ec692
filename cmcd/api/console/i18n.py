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
            "stream.label": "Stream",
            "stream.transactional": "transactional",
            "stream.broadcast": "broadcast",
            "stream.all": "all mail",
            "stream.broadcast_scope": "broadcasts (unsubscribed)",
            "bounce_class.label": "Bounce class",
            "bounce_class.invalid_recipient": "invalid recipient",
            "bounce_class.bad_domain": "bad domain",
            "bounce_class.mailbox_full": "mailbox full",
            "bounce_class.message_too_large": "message too large",
            "bounce_class.spam_block": "blocked as spam",
            "bounce_class.policy": "policy",
            "bounce_class.authentication": "authentication (SPF/DKIM/DMARC)",
            "bounce_class.rate_limited": "rate limited",
            "bounce_class.tls": "TLS",
            "bounce_class.dns": "DNS",
            "bounce_class.other": "other",
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
            "stream.label": "ストリーム",
            "stream.transactional": "トランザクション",
            "stream.broadcast": "一斉配信",
            "stream.all": "すべてのメール",
            "stream.broadcast_scope": "一斉配信（配信停止済み）",
            "bounce_class.label": "バウンスの種類",
            "bounce_class.invalid_recipient": "宛先不明",
            "bounce_class.bad_domain": "ドメイン不明",
            "bounce_class.mailbox_full": "メールボックス容量超過",
            "bounce_class.message_too_large": "メッセージサイズ超過",
            "bounce_class.spam_block": "スパムとして拒否",
            "bounce_class.policy": "ポリシーによる拒否",
            "bounce_class.authentication": "認証失敗（SPF/DKIM/DMARC）",
            "bounce_class.rate_limited": "送信レート制限",
            "bounce_class.tls": "TLS",
            "bounce_class.dns": "DNS",
            "bounce_class.other": "その他",
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

# the one-click unsubscribe page (cmcd/api/unsubscribe.py, templates/unsubscribe.html): no console page, no
# sign-in, but the same two languages, here so that every template's texts are known wherever it is rendered
add(
    {
        "en": {
            "unsubscribe.title": "Unsubscribe",
            "unsubscribe.ask": "Stop newsletters and other broadcast mail from {tenant} to {address}?",
            "unsubscribe.keeps": "Mail you need, such as receipts and password resets, still arrives.",
            "unsubscribe.button": "Unsubscribe",
            "unsubscribe.done": "{address} is unsubscribed: {tenant} sends it no more broadcast mail.",
            "unsubscribe.already": "{address} is already unsubscribed from broadcast mail from {tenant}.",
            "unsubscribe.not_found": "This unsubscribe link is not valid. Use the link in the message exactly "
            "as it came, or contact the sender.",
            "unsubscribe.bad_body": "This request is not a one-click unsubscribe; nothing was changed. "
            "Open the link in your browser and press the button.",
            "unsubscribe.unavailable": "Your request could not be recorded just now; nothing was changed. "
            "Please try again in a few minutes.",
        },
        "ja": {
            "unsubscribe.title": "配信停止",
            "unsubscribe.ask": "{tenant} から {address} へのお知らせなどの一斉配信メールを停止しますか？",
            "unsubscribe.keeps": "領収書やパスワード再設定など、必要なメールは引き続き届きます。",
            "unsubscribe.button": "配信を停止する",
            "unsubscribe.done": "{address} への {tenant} からの一斉配信メールを停止しました。",
            "unsubscribe.already": "{address} への {tenant} からの一斉配信メールは既に停止されています。",
            "unsubscribe.not_found": "この配信停止リンクは無効です。メールに記載されたリンクをそのまま開くか、"
            "送信元にお問い合わせください。",
            "unsubscribe.bad_body": "ワンクリック配信停止の要求ではないため、何も変更していません。"
            "ブラウザでリンクを開き、ボタンを押してください。",
            "unsubscribe.unavailable": "現在、要求を記録できませんでした。何も変更していません。"
            "数分後にもう一度お試しください。",
        },
    }
)
