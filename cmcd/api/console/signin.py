"""Signing in to the console and out of it: the password, then the one-time code (or a recovery
code) when the user has TOTP, or TOTP enrolment first when the tenant or its admin requires it
and the user has none; sign-out.

The password check, the failed-login throttle and the login log are submit's Authenticator's, as
for SMTP AUTH and the API; bad one-time codes pause the user as the API's session login does
(api/sessions.py's claim_second_factor). A sender never signs in. Each step that gets further
starts a new session with a new random id (a session fixed before sign-in is worth nothing), and
a session waiting for its code lives CODE_STAGE_S. Every failure is one answer on the page
("sign-in failed"); what was wrong goes to the login log only.
"""

from __future__ import annotations

import base64
import logging
import sqlite3
import urllib.parse

import qrcode
import qrcode.image.svg
from aiohttp import web

from cmcd import totp
from cmcd.api.console import i18n
from cmcd.api.console.web import (
    PRE_COOKIE,
    SESSION_COOKIE,
    Console,
    ConsoleError,
    Page,
    console_actor,
    new_token,
    safe_next,
)
from cmcd.api.context import client_ip
from cmcd.api.sessions import claim_second_factor
from cmcd.errors import StoreError
from cmcd.store import LoginRecord
from cmcd.store.console_store import STAGE_CODE, STAGE_ENROL
from cmcd.tenancy.refusals import Refused

log = logging.getLogger("cmcd.api.console")

MECHANISM = "CONSOLE"
#: a sign-in that passed its password has this long for its one-time code, or for enrolment
CODE_STAGE_S = 300.0
ENROL_STAGE_S = 900.0


def issuer(hostname: str) -> str:
    return f"cmcd {hostname}".replace(":", "")


def register(c: Console) -> None:
    c.get("/login", login_form, need=None)
    c.post("/login", login, need=None)
    c.get("/login/code", code_form, need=None)
    c.post("/login/code", code, need=None)
    c.get("/enrol", enrol_form, need=None)
    c.post("/enrol", enrol_start, need=None)
    c.post("/enrol/confirm", enrol_confirm, need=None)
    c.post("/logout", logout, need=None)


# -- the password -------------------------------------------------------------------------------


async def login_form(page: Page, status: int = 200, error: str = "") -> web.StreamResponse:
    if page.session is not None and page.session.stage == "":
        return page.redirect(safe_next(page.request.query.get("next")))
    if not page.request.cookies.get(PRE_COOKIE):
        page.cookies[PRE_COOKIE] = new_token()  # what this form's CSRF token is bound to
    return page.render("login.html", status=status, error=error, next=safe_next(page.request.query.get("next")))


async def login(page: Page) -> web.StreamResponse:
    api = page.api
    auth = api.service.auth
    ip = client_ip(page.request)
    login_name = page.form.get("login", "").strip()[:256]
    password = page.form.get("password", "")
    back = safe_next(page.form.get("next"))
    if not login_name or not password:
        return await login_form(page, 400, page.t("signin.missing"))
    if await auth.auth_throttled(ip) or await auth.auth_throttled(ip, login_name):
        return await login_form(page, 429, page.t("signin.throttled"))
    claim = await auth.claim(ip, login_name)  # the failure counted before the password is checked
    if isinstance(claim, str):
        return await login_form(page, 429, page.t("signin.throttled"))
    try:
        user, password_ok = await auth.check_password(login_name, password)
        now = api.clock()
        detail = (
            "unknown login" if user is None
            else "bad password" if not password_ok
            else "disabled" if not user.enabled
            else "a sender does not sign in to the console" if user.role not in ("admin", "viewer")
            else ""
        )  # fmt: skip
        if user is None or detail:
            api.service.stats.authenticated(False, throttled=False)
            auth.log_login(LoginRecord(now, login_name, ip, MECHANISM, "fail",
                                       user.tenant_id if user is not None else None, detail))  # fmt: skip
            return await login_form(page, 401, page.t("signin.failed"))
        await auth.release(claim)
    finally:
        auth.fail(claim)  # unless released: a sign-in cut short counts as a failure
    enrolled = await api.astore.call(api.store.otp_enrolled, user.id)
    needed = await api.astore.call(api.store.console_otp_needed, user.id)  # an admin's always, as the API's
    stage = STAGE_CODE if enrolled else STAGE_ENROL if needed else ""
    if stage == "":
        auth.log_login(LoginRecord(now, login_name, ip, MECHANISM, "ok", user.tenant_id, "password"))
        api.service.stats.authenticated(True, throttled=False)
    await _new_session(page, user.id, user.tenant_id, stage)
    page.cookies[PRE_COOKIE] = ""
    if stage == STAGE_CODE:
        return page.redirect("/login/code?" + urllib.parse.urlencode({"next": back}))
    if stage == STAGE_ENROL:
        return page.redirect("/enrol")
    return page.redirect(back)


async def _new_session(page: Page, user_id: int, tenant_id: int, stage: str) -> None:
    """A new session for USER_ID at STAGE (a new random id), in place of the one PAGE had. It ends
    by the sign-in's own limit: console_session_ttl from the password check, however many steps
    (a restarted enrolment) it goes through."""
    api = page.api
    now = api.clock()
    signed_in = page.session.signed_in if page.session is not None and page.session.signed_in else now
    lifetime = {STAGE_CODE: CODE_STAGE_S, STAGE_ENROL: ENROL_STAGE_S}.get(stage, api.config.api.console_session_ttl)
    expires = min(now + lifetime, signed_in + api.config.api.console_session_ttl)
    token = new_token()
    await api.astore.call(api.store.console_session_add, token, user_id, tenant_id, expires, stage, signed_in)
    if page.token:
        await api.astore.call(api.store.console_session_end, page.token)
    page.cookies[SESSION_COOKIE] = token
    page.token = token


# -- the one-time code ----------------------------------------------------------------------------


async def code_form(page: Page, status: int = 200, error: str = "") -> web.StreamResponse:
    if page.session is None or page.session.stage != STAGE_CODE:
        return page.redirect("/login")
    return page.render("login_code.html", status=status, error=error, next=safe_next(page.request.query.get("next")))


async def code(page: Page) -> web.StreamResponse:
    session = page.session
    if session is None or session.stage != STAGE_CODE:
        return page.redirect("/login")
    api = page.api
    auth = api.service.auth
    caller = session.caller
    ip = client_ip(page.request)
    now = api.clock()
    otp_value = page.form.get("code", "").strip().replace(" ", "")
    if not otp_value:
        return await code_form(page, 400, page.t("signin.code_missing"))
    otp_claim, paused = await claim_second_factor(api, caller.user_id, now)
    if paused:
        auth.log_login(LoginRecord(now, caller.login, ip, MECHANISM, "throttled", caller.tenant_id, paused))
        await api.astore.call(api.store.console_session_end, page.token)
        page.cookies[SESSION_COOKIE] = ""
        return await login_form(page, 429, page.t("signin.code_paused"))
    state = await api.astore.call(api.store.otp_state, caller.user_id)
    ok, detail = False, "bad or reused one-time code"
    if state is not None and state[1]:
        secret, _, _, last_step = state
        if otp_value.isdigit() and len(otp_value) == totp.DEFAULT_DIGITS:
            step = totp.verify(secret, otp_value, now, last_step)
            ok = step is not None and await api.astore.call(api.store.otp_use_step, caller.user_id, step)
        else:  # a recovery code
            ok = await api.astore.call(api.store.otp_use_recovery, caller.user_id, totp.hash_recovery(otp_value))
            detail = "recovery code used" if ok else "bad recovery code"
    if not ok:
        api.service.stats.authenticated(False, throttled=False)
        auth.log_login(LoginRecord(now, caller.login, ip, MECHANISM, "fail", caller.tenant_id, detail))
        return await code_form(page, 401, page.t("signin.code_failed"))
    try:
        await api.astore.call(api.store.failure_release, otp_claim)
    except (sqlite3.Error, StoreError) as exc:  # it counts as a bad code until it ages out
        log.warning("event=otp_release_failed user_id=%d error=%r", caller.user_id, str(exc))
    api.service.stats.authenticated(True, throttled=False)
    ok_detail = "password and recovery code" if detail == "recovery code used" else "password and one-time code"
    auth.log_login(LoginRecord(now, caller.login, ip, MECHANISM, "ok", caller.tenant_id, ok_detail))
    await _new_session(page, caller.user_id, caller.tenant_id, "")
    return page.redirect(safe_next(page.form.get("next")))


# -- enrolment -------------------------------------------------------------------------------------


async def enrol_form(page: Page) -> web.StreamResponse:
    """The enrolment page: a start button, or the QR code of the enrolment started and the form
    that confirms it with the first code. Also reached from "My account" by a signed-in user."""
    return await _enrol_page(page)


async def _enrol_page(page: Page, status: int = 200, error: str = "") -> web.StreamResponse:
    session = page.session
    if session is None or session.stage == STAGE_CODE:
        return page.redirect("/login")
    api = page.api
    state = await api.astore.call(api.store.otp_state, session.caller.user_id)
    if state is not None and state[1]:
        if session.stage == STAGE_ENROL:  # another browser of this user confirmed meanwhile: sign in with it
            await api.astore.call(api.store.console_session_end, page.token)
            page.cookies[SESSION_COOKIE] = ""
            return page.redirect("/login")
        return page.redirect("/account")  # enrolled already
    values: dict[str, object] = {"started": state is not None, "qr": "", "secret": "", "uri": ""}
    if state is not None:
        caller = session.caller
        uri = totp.provisioning_uri(state[0], f"{caller.tenant}/{caller.login}", issuer(api.config.server.hostname))
        values.update(qr=_qr_data_uri(uri), secret=totp.b32(state[0]), uri=uri)
    return page.render("enrol.html", status=status, required=session.stage == STAGE_ENROL, error=error, **values)


async def enrol_start(page: Page) -> web.StreamResponse:
    session = page.session
    if session is None or session.stage == STAGE_CODE:
        return page.redirect("/login")
    api = page.api
    caller = session.caller
    try:
        await api.tenancy.credentials.otp_enroll(
            page.op("console.otp.enrol", f"{caller.tenant}/{caller.login}"),
            caller.tenant,
            caller.login,
            issuer(api.config.server.hostname),
        )
    except Refused as exc:
        raise ConsoleError(409, exc.refusal.text) from None
    # enrolling ends the user's sessions: this one goes on in a new one, at the enrolment stage
    # when the sign-in was waiting for it (a signed-in user who chose it keeps signing in)
    page.token = ""
    await _new_session(page, caller.user_id, caller.tenant_id, session.stage)
    return page.redirect("/enrol")


async def enrol_confirm(page: Page) -> web.StreamResponse:
    session = page.session
    if session is None or session.stage == STAGE_CODE:
        return page.redirect("/login")
    api = page.api
    caller = session.caller
    code_value = page.form.get("code", "").strip().replace(" ", "")
    try:
        codes = await api.tenancy.credentials.otp_confirm(
            page.op("console.otp.confirm", f"{caller.tenant}/{caller.login}"),
            caller.tenant,
            caller.login,
            code_value,
            api.clock(),
        )
    except Refused:
        return await _enrol_page(page, 400, page.t("signin.code_failed"))
    if session.stage == STAGE_ENROL:
        now = api.clock()
        api.service.auth.log_login(LoginRecord(now, caller.login, client_ip(page.request), MECHANISM, "ok",
                                               caller.tenant_id, "password and TOTP enrolment"))  # fmt: skip
    await _new_session(page, caller.user_id, caller.tenant_id, "")
    return page.render("recovery_codes.html", codes=codes)


def _qr_data_uri(uri: str) -> str:
    """The QR code of URI as an SVG image in a data: URI (no request, no script)."""
    image = qrcode.make(uri, image_factory=qrcode.image.svg.SvgPathImage, box_size=8, border=2)
    return "data:image/svg+xml;base64," + base64.b64encode(image.to_string()).decode()


# -- sign-out ----------------------------------------------------------------------------------------


async def logout(page: Page) -> web.StreamResponse:
    api = page.api
    if page.session is not None:
        await api.astore.call(api.store.console_session_end, page.token)
        caller = page.session.caller
        await api.service.audit.op(ts=api.clock(), actor_uid=None, actor=console_actor(caller),
                                   action="console.signout", target=page.session.sid, result="ok",
                                   tenant_id=caller.tenant_id)  # fmt: skip
    page.cookies[SESSION_COOKIE] = ""
    return page.redirect("/login?done=signed_out")


i18n.add(
    {
        "en": {
            "signin.title": "Sign in",
            "signin.login": "Login",
            "signin.password": "Password",
            "signin.submit": "Sign in",
            "signin.missing": "Enter your login and password.",
            "signin.failed": "Sign-in failed: check your login and password. Senders cannot sign in to the console.",
            "signin.throttled": "Too many failed sign-ins from your address; try again later.",
            "signin.code_title": "One-time code",
            "signin.code_label": "The 6-digit code from your authenticator app, or a recovery code",
            "signin.code_submit": "Continue",
            "signin.code_missing": "Enter the code.",
            "signin.code_failed": "That code is not valid or was used already; try the next one.",
            "signin.code_paused": "Too many bad codes: sign-in is paused for this user; try again later.",
            "signin.back": "Start again",
            "enrol.title": "Set up one-time passwords",
            "enrol.required": "Your tenant requires one-time passwords: set them up before you continue.",
            "enrol.intro": "Scan the QR code with an authenticator app (or type the key), then enter the code it shows.",
            "enrol.start": "Start",
            "enrol.qr_alt": "QR code to scan with an authenticator app",
            "enrol.secret": "Key to type in by hand",
            "enrol.code": "The 6-digit code the app shows",
            "enrol.confirm": "Confirm",
            "recovery.title": "Recovery codes",
            "recovery.intro": "Each code signs you in once if you lose your device. Keep them somewhere safe.",
            "recovery.continue": "Continue to the console",
            "done.signed_out": "You have signed out.",
        },
        "ja": {
            "signin.title": "サインイン",
            "signin.login": "ログイン名",
            "signin.password": "パスワード",
            "signin.submit": "サインイン",
            "signin.missing": "ログイン名とパスワードを入力してください。",
            "signin.failed": "サインインできませんでした。ログイン名とパスワードを確認してください。送信者ロールはコンソールにサインインできません。",
            "signin.throttled": "このアドレスからのサインイン失敗が多すぎます。しばらくしてからやり直してください。",
            "signin.code_title": "ワンタイムパスワード",
            "signin.code_label": "認証アプリに表示される 6 桁のコード、またはリカバリーコード",
            "signin.code_submit": "続ける",
            "signin.code_missing": "コードを入力してください。",
            "signin.code_failed": "コードが正しくないか、使用済みです。次のコードでやり直してください。",
            "signin.code_paused": "誤ったコードが多すぎるため、このユーザーのサインインを一時停止しています。",
            "signin.back": "最初からやり直す",
            "enrol.title": "ワンタイムパスワードの設定",
            "enrol.required": "このテナントではワンタイムパスワードが必須です。続ける前に設定してください。",
            "enrol.intro": "認証アプリで QR コードを読み取り（またはキーを入力し）、表示されたコードを入力してください。",
            "enrol.start": "開始",
            "enrol.qr_alt": "認証アプリで読み取る QR コード",
            "enrol.secret": "手入力用のキー",
            "enrol.code": "アプリに表示される 6 桁のコード",
            "enrol.confirm": "確認",
            "recovery.title": "リカバリーコード",
            "recovery.intro": "端末をなくしたとき、各コードで一度だけサインインできます。安全な場所に保管してください。",
            "recovery.continue": "コンソールへ進む",
            "done.signed_out": "サインアウトしました。",
        },
    }
)
