"""The console's "My account" page (admins and viewers): who is signed in, their one-time-password
state (with the way to set them up, or to turn them off when nobody requires them), their live
sessions (ending the others), and changing their own password.

Every change is one tenancy command on the signed-in user only (the login is the session's, never
the URL's or a form's): a session id from the URL that is not one of theirs is a 404. A new
password needs the current one, checked as a sign-in checks it (submit's Authenticator: one
scrypt, the failed-login throttle, a wrong one in the login log). A password change and turning
one-time passwords off end all of the user's sessions, this one too: the next page is sign-in.
"""

from __future__ import annotations

import re

from aiohttp import web

from cmcd.api.console import i18n
from cmcd.api.console.signin import MECHANISM
from cmcd.api.console.users import otp_state, status_of
from cmcd.api.console.web import SESSION_COOKIE, Console, ConsoleError, Page
from cmcd.api.context import client_ip
from cmcd.errors import NotFound
from cmcd.store import LoginRecord
from cmcd.tenancy.refusals import Reason, Refused

#: a session's public id (cmcd.store.api_store.session_id): 8 bytes in hex
SESSION_ID = re.compile(r"[0-9a-f]{16}")


def register(c: Console) -> None:
    c.get("/account", account_page, need="read")
    c.post("/account/password", change_password, need="read")
    c.post("/account/sessions/{sid}/end", end_session, need="read")
    c.post("/account/otp/disable", disable_otp, need="read")


async def _otp(page: Page) -> tuple[bool, bool, bool]:
    """(the user's TOTP enrolment is confirmed, it is required of them (an admin always), the tenant requires it)."""
    api = page.api
    caller = page.caller
    enrolled = await api.astore.call(api.store.otp_enrolled, caller.user_id)
    required = await api.astore.call(api.store.console_otp_needed, caller.user_id)
    tenant_requires, _ = await api.astore.call(api.store.console_settings, caller.tenant_id)
    return enrolled, required, tenant_requires


async def account_page(page: Page, status: int = 200, error: str = "", error_at: str = "") -> web.StreamResponse:
    api = page.api
    caller = page.caller
    enrolled, required, tenant_requires = await _otp(page)
    try:
        sessions = await api.astore.call(api.store.sessions, caller.tenant, caller.login, api.clock())
    except NotFound:  # deleted meanwhile: the next request signs it out
        sessions = []
    current = page.session.sid if page.session is not None else ""
    rows = [s | {"current": s["id"] == current} for s in sessions]
    return page.render(
        "account.html",
        status=status,
        otp=otp_state(caller.role, enrolled, required, tenant_requires),
        enrolled=enrolled,
        may_disable_otp=enrolled and not required and not tenant_requires,
        sessions=rows,
        error=error,
        error_at=error_at,
    )


def _target(page: Page) -> str:
    return f"{page.caller.tenant}/{page.caller.login}"


def _signed_out(page: Page, done: str) -> web.StreamResponse:
    """The change ended this session too: forget its cookie, and sign in again."""
    page.cookies[SESSION_COOKIE] = ""
    return page.redirect("/login", done=done)


async def change_password(page: Page) -> web.StreamResponse:
    api = page.api
    auth = api.service.auth
    caller = page.caller
    current = page.form.get("current", "")
    new, again = page.form.get("new", ""), page.form.get("again", "")
    if not current or not new:
        return await account_page(page, 400, page.t("account.password_missing"), "password")
    if new != again:
        return await account_page(page, 400, page.t("account.password_mismatch"), "password")
    ip = client_ip(page.request)
    claim = await auth.claim(ip, caller.login)  # a wrong current password counts as a failed sign-in
    if isinstance(claim, str):
        return await account_page(page, 429, page.t("signin.throttled"), "password")
    try:
        user, ok = await auth.check_password(caller.login, current)
        if user is None or user.id != caller.user_id or not ok:
            auth.log_login(LoginRecord(api.clock(), caller.login, ip, MECHANISM, "fail", caller.tenant_id,
                                       "bad current password at a password change"))  # fmt: skip
            return await account_page(page, 403, page.t("account.current_wrong"), "password")
        await auth.release(claim)
    finally:
        auth.fail(claim)  # unless released: a check cut short counts as a failure
    try:
        await api.tenancy.accounts.user_passwd(
            page.op("console.account.passwd", _target(page)), caller.tenant, caller.login, new
        )
    except Refused as exc:
        return await account_page(page, status_of(exc), exc.refusal.text, "password")
    return _signed_out(page, "account_password_changed")


async def end_session(page: Page) -> web.StreamResponse:
    api = page.api
    caller = page.caller
    sid = page.request.match_info["sid"]
    if not SESSION_ID.fullmatch(sid):
        raise ConsoleError(404, page.t("error.not_found"))
    op = page.op("console.account.session_end", _target(page), f"session {sid}")
    try:
        await api.tenancy.credentials.session_revoke(op, caller.tenant, caller.login, sid)
    except Refused as exc:
        if exc.refusal.reason is Reason.NOT_FOUND:  # not one of this user's sessions (or over already)
            raise ConsoleError(404, page.t("error.not_found")) from None
        return await account_page(page, status_of(exc), exc.refusal.text, "sessions")
    if page.session is not None and sid == page.session.sid:
        return _signed_out(page, "signed_out")
    return page.redirect("/account", done="account_session_ended")


async def disable_otp(page: Page) -> web.StreamResponse:
    """Turn one-time passwords off for oneself: only when neither the tenant nor an admin requires
    them (a requirement is an admin's to lift, on Users)."""
    api = page.api
    caller = page.caller
    enrolled, required, tenant_requires = await _otp(page)
    if not enrolled:
        return page.redirect("/account")
    if required or tenant_requires:
        text = page.t("account.otp_required_tenant" if tenant_requires else "account.otp_required_user")
        return await account_page(page, 409, text, "otp")
    try:
        await api.tenancy.credentials.otp_disable(page.op("console.account.otp_disable", _target(page)),
                                                  caller.tenant, caller.login)  # fmt: skip
    except Refused as exc:
        return await account_page(page, status_of(exc), exc.refusal.text, "otp")
    return _signed_out(page, "account_otp_disabled")


i18n.add(
    {
        "en": {
            "account.title": "My account",
            "account.facts": "Who you are",
            "account.login": "Login",
            "account.role": "Role",
            "account.tenant": "Tenant",
            "account.otp": "One-time passwords",
            "account.otp_title": "One-time passwords",
            "account.otp_setup": "Set up one-time passwords",
            "account.otp_setup_hint": "You will scan a QR code with an authenticator app; your other sessions end.",
            "account.otp_disable": "Turn off one-time passwords",
            "account.otp_disable_confirm": "Turn off one-time passwords? You will sign in with your password alone, "
            "and all your sessions end.",
            "account.otp_required_tenant": "Your tenant requires one-time passwords: you cannot turn them off.",
            "account.otp_required_user": "An admin requires one-time passwords of you: you cannot turn them off.",
            "account.sessions_title": "Your sessions",
            "account.sessions_caption": "Sessions that are signed in as you (console and API)",
            "account.session_id": "Session",
            "account.session_created": "Started",
            "account.session_last_used": "Last used",
            "account.session_expires": "Expires",
            "account.session_this": "this one",
            "account.session_end": "End",
            "account.session_end_label": "End session {sid}",
            "account.password_title": "Change your password",
            "account.password_current": "Current password",
            "account.password_new": "New password",
            "account.password_again": "New password again",
            "account.password_hint": "At least 12 characters. All your sessions end: you sign in again with the "
            "new password.",
            "account.password_submit": "Change password",
            "account.password_missing": "Enter your current password and the new one.",
            "account.password_mismatch": "The two new passwords are not the same.",
            "account.current_wrong": "The current password is not right; nothing was changed.",
            "done.account_password_changed": "Your password was changed and your sessions ended: sign in with the "
            "new password.",
            "done.account_session_ended": "The session was ended.",
            "done.account_otp_disabled": "One-time passwords are off and your sessions ended: sign in again.",
        },
        "ja": {
            "account.title": "アカウント",
            "account.facts": "あなたの情報",
            "account.login": "ログイン名",
            "account.role": "ロール",
            "account.tenant": "テナント",
            "account.otp": "ワンタイムパスワード",
            "account.otp_title": "ワンタイムパスワード",
            "account.otp_setup": "ワンタイムパスワードを設定",
            "account.otp_setup_hint": "認証アプリで QR コードを読み取ります。ほかのセッションは終了します。",
            "account.otp_disable": "ワンタイムパスワードをオフにする",
            "account.otp_disable_confirm": "ワンタイムパスワードをオフにしますか？パスワードだけでサインインするようになり、"
            "すべてのセッションが終了します。",
            "account.otp_required_tenant": "このテナントではワンタイムパスワードが必須のため、オフにできません。",
            "account.otp_required_user": "管理者があなたにワンタイムパスワードを必須にしているため、オフにできません。",
            "account.sessions_title": "あなたのセッション",
            "account.sessions_caption": "あなたとしてサインインしているセッション（コンソールと API）",
            "account.session_id": "セッション",
            "account.session_created": "開始",
            "account.session_last_used": "最終利用",
            "account.session_expires": "有効期限",
            "account.session_this": "このセッション",
            "account.session_end": "終了",
            "account.session_end_label": "セッション {sid} を終了",
            "account.password_title": "パスワードの変更",
            "account.password_current": "現在のパスワード",
            "account.password_new": "新しいパスワード",
            "account.password_again": "新しいパスワード（確認）",
            "account.password_hint": "12 文字以上。すべてのセッションが終了し、新しいパスワードでサインインし直します。",
            "account.password_submit": "パスワードを変更",
            "account.password_missing": "現在のパスワードと新しいパスワードを入力してください。",
            "account.password_mismatch": "新しいパスワードが一致しません。",
            "account.current_wrong": "現在のパスワードが正しくありません。何も変更していません。",
            "done.account_password_changed": "パスワードを変更し、セッションを終了しました。新しいパスワードでサインインしてください。",
            "done.account_session_ended": "セッションを終了しました。",
            "done.account_otp_disabled": "ワンタイムパスワードをオフにし、セッションを終了しました。もう一度サインインしてください。",
        },
    }
)
