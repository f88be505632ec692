"""The console's "Users and rights" page (admins only): the tenant's users with their role, state,
one-time-password state and stream; adding a user; per user a role, the stream of its mail, disable
or enable, a new password, one-time passwords required or removed, delete; and the tenant's console settings (one-time
passwords for every console user, the time zone of its pages).

Every change is one tenancy command (cmcd.tenancy.accounts and credentials) named with page.op,
so the operation log records the console user; a refused command re-renders the page with the
refusal's words and changes nothing. The console itself refuses only what concerns the admin
signed in: they never disable, demote or delete themselves, and change their own password on
"My account" (which asks for the current one). A user is addressed by login in the URL, always
within the session's tenant: any other login is a 404, whoever has it. A taken login is "not
available", never whose. A generated password is shown once, on the response to its POST.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from cmcd.api.console import i18n
from cmcd.api.console.web import SESSION_COOKIE, Console, ConsoleError, Page, choices
from cmcd.api.users import said_to_tenant
from cmcd.errors import NotFound
from cmcd.records import STREAMS, User
from cmcd.tenancy.refusals import Reason, Refused

#: the roles a user may have, in the order the role menus list them
ROLES = ("sender", "viewer", "admin")


def register(c: Console) -> None:
    c.get("/users", users_page, need="manage")
    c.post("/users", add_user, need="manage")
    c.post("/users/settings", save_settings, need="manage")
    c.get("/users/{login}", user_page, need="manage")
    c.post("/users/{login}/role", set_role, need="manage")
    c.post("/users/{login}/stream", set_stream, need="manage")
    c.post("/users/{login}/disable", disable, need="manage")
    c.post("/users/{login}/enable", enable, need="manage")
    c.post("/users/{login}/password", reset_password, need="manage")
    c.post("/users/{login}/otp-require", require_otp, need="manage")
    c.post("/users/{login}/otp-remove", remove_otp, need="manage")
    c.post("/users/{login}/delete", delete, need="manage")


def otp_state(role: str, enrolled: bool, required: bool, tenant_requires: bool) -> str:
    """How a user signs in to the console, as a key of the "users.otp_" texts: "enrolled",
    "enrolled_required", "pending" (required, not set up yet: enrolment at the next sign-in),
    "off", or "sender" (a sender never signs in)."""
    if enrolled:
        return "enrolled_required" if required or tenant_requires else "enrolled"
    if role == "sender":
        return "sender"
    return "pending" if required or tenant_requires else "off"


def status_of(refused: Refused) -> int:
    """The HTTP status a page refused by a tenancy command is shown with."""
    return {Reason.INVALID: 400, Reason.NOT_FOUND: 404}.get(refused.refusal.reason, 409)


@dataclass(frozen=True)
class Member:
    """One user of the tenant as the pages show it."""

    user: User
    enrolled: bool  # TOTP enrolment confirmed
    required: bool  # one-time passwords required of this user by an admin
    otp: str  # otp_state()

    @property
    def path(self) -> str:
        return "/users/" + urllib.parse.quote(self.user.login, safe="@+.-_")


def _role_choices(page: Page) -> list[dict[str, str]]:
    return choices((r, page.t(f"role.{r}")) for r in ROLES)


# -- the list, adding a user, the tenant settings -------------------------------------------------


async def users_page(page: Page) -> web.StreamResponse:
    return await _list(page)


async def _list(
    page: Page,
    status: int = 200,
    *,
    add_error: str = "",
    add: dict[str, str] | None = None,
    settings_error: str = "",
    settings: dict[str, Any] | None = None,
) -> web.StreamResponse:
    api = page.api
    caller = page.caller
    users = await api.astore.call(api.store.users, caller.tenant)
    otp = await api.astore.call(api.store.users_otp, caller.tenant_id)
    tenant_otp, timezone = await api.astore.call(api.store.console_settings, caller.tenant_id)
    members = []
    for u in users:
        enrolled, required = otp.get(u.id, (False, False))
        members.append(Member(u, enrolled, required, otp_state(u.role, enrolled, required, tenant_otp)))
    return page.render(
        "users.html",
        status=status,
        members=members,
        roles=_role_choices(page),
        add_error=add_error,
        add=add or {"login": "", "role": "sender"},
        settings_error=settings_error,
        settings=settings or {"console_otp": tenant_otp, "timezone": timezone},
        server_tz=api.config.server.timezone,
    )


async def add_user(page: Page) -> web.StreamResponse:
    api = page.api
    caller = page.caller
    login = page.form.get("login", "").strip()
    role = page.form.get("role", "sender")
    password = page.form.get("password", "") or None
    op = page.op("console.users.add", f"{caller.tenant}/{login}", f"role={role}", refused_text=said_to_tenant)
    try:
        user, generated = await api.tenancy.accounts.user_add(op, caller.tenant, login, role, password)
    except Refused as exc:
        # logins are unique across tenants: say only that this one is taken, not by whom
        taken = exc.refusal.reason is Reason.CONFLICT
        text = page.t("users.login_taken") if taken else exc.refusal.text
        return await _list(page, status_of(exc), add_error=text, add={"login": login, "role": role})
    if generated is None:
        return page.redirect("/users", done="users_added")
    return page.render(
        "users_secret.html",
        title=page.t("users.added_title", login=user.login),
        intro=page.t("users.added_intro", login=user.login),
        secret=generated,
        back="/users",
    )


async def save_settings(page: Page) -> web.StreamResponse:
    api = page.api
    caller = page.caller
    console_otp = page.form.get("console_otp", "") == "on"
    timezone = page.form.get("timezone", "").strip()
    detail = f"console_otp={'on' if console_otp else 'off'} timezone={timezone or '(server)'}"
    try:
        await api.tenancy.accounts.tenant_set(
            page.op("console.tenant.set", caller.tenant, detail), caller.tenant, console_otp=console_otp,
            timezone=timezone,
        )  # fmt: skip
    except Refused as exc:
        settings = {"console_otp": console_otp, "timezone": timezone}
        return await _list(page, status_of(exc), settings_error=exc.refusal.text, settings=settings)
    return page.redirect("/users", done="users_settings_saved")


# -- one user --------------------------------------------------------------------------------------


async def _member(page: Page) -> Member:
    """The user the URL names, in the session's tenant; else 404 (another tenant's login too)."""
    api = page.api
    caller = page.caller
    login = page.request.match_info["login"]
    try:
        user = await api.astore.call(api.store.user, caller.tenant, login)
    except NotFound:
        raise ConsoleError(404, page.t("error.not_found")) from None
    enrolled, required = (await api.astore.call(api.store.users_otp, caller.tenant_id)).get(user.id, (False, False))
    tenant_otp, _ = await api.astore.call(api.store.console_settings, caller.tenant_id)
    return Member(user, enrolled, required, otp_state(user.role, enrolled, required, tenant_otp))


async def user_page(page: Page) -> web.StreamResponse:
    return await _one(page, await _member(page))


async def _one(page: Page, member: Member, status: int = 200, error: str = "") -> web.StreamResponse:
    return page.render(
        "user.html",
        status=status,
        m=member,
        me=member.user.id == page.caller.user_id,
        roles=_role_choices(page),
        streams=choices((s, page.t(f"stream.{s}")) for s in STREAMS),
        error=error,
    )


async def _change(
    page: Page, member: Member, run: Callable[[], Awaitable[Any]], done: str, *, not_self: str = ""
) -> web.StreamResponse:
    """RUN the tenancy command(s) of a change to MEMBER; back to its page saying DONE, or the page
    again with the refusal. NOT_SELF, when given, is the text that refuses the change for the
    admin signed in."""
    if not_self and member.user.id == page.caller.user_id:
        return await _one(page, member, 409, page.t(not_self))
    try:
        await run()
    except Refused as exc:
        if exc.refusal.reason is Reason.NOT_FOUND:
            member = await _member(page)  # a 404 if the user went meanwhile
        return await _one(page, member, status_of(exc), exc.refusal.text)
    return page.redirect(member.path, done=done)


def _target(page: Page, member: Member) -> str:
    return f"{page.caller.tenant}/{member.user.login}"


async def set_role(page: Page) -> web.StreamResponse:
    member = await _member(page)
    role = page.form.get("role", "")

    async def run() -> None:
        op = page.op("console.users.role", _target(page, member), f"role={role}")
        await page.api.tenancy.accounts.user_set_role(op, page.caller.tenant, member.user.login, role)

    # even "admin" again: a role change ends the user's sessions, this one too
    return await _change(page, member, run, "users_role_changed", not_self="users.not_self_role")


async def set_stream(page: Page) -> web.StreamResponse:
    """The stream of the user's mail when neither the message nor the API request names one."""
    member = await _member(page)
    stream = page.form.get("stream", "")

    async def run() -> None:
        op = page.op("console.users.stream", _target(page, member), f"stream={stream[:20]}")
        await page.api.tenancy.accounts.user_set_stream(op, page.caller.tenant, member.user.login, stream)

    return await _change(page, member, run, "users_stream_changed")


async def disable(page: Page) -> web.StreamResponse:
    return await _set_enabled(page, False)


async def enable(page: Page) -> web.StreamResponse:
    return await _set_enabled(page, True)


async def _set_enabled(page: Page, enabled: bool) -> web.StreamResponse:
    member = await _member(page)
    if enabled and member.user.id == page.caller.user_id:
        return page.redirect(member.path)  # signed in, so enabled: the command would only end this session

    async def run() -> None:
        op = page.op("console.users.enable" if enabled else "console.users.disable", _target(page, member))
        await page.api.tenancy.accounts.user_enable(op, page.caller.tenant, member.user.login, enabled)

    done = "users_enabled" if enabled else "users_disabled"
    return await _change(page, member, run, done, not_self="" if enabled else "users.not_self_disable")


async def reset_password(page: Page) -> web.StreamResponse:
    member = await _member(page)
    if member.user.id == page.caller.user_id:
        return await _one(page, member, 409, page.t("users.not_self_password"))
    password = page.form.get("password", "") or None
    op = page.op("console.users.passwd", _target(page, member), "generated" if password is None else "typed")
    try:
        _, generated = await page.api.tenancy.accounts.user_passwd(op, page.caller.tenant, member.user.login, password)
    except Refused as exc:
        return await _one(page, await _member(page), status_of(exc), exc.refusal.text)
    if generated is None:
        return page.redirect(member.path, done="users_password_set")
    return page.render(
        "users_secret.html",
        title=page.t("users.password_title", login=member.user.login),
        intro=page.t("users.password_intro", login=member.user.login),
        secret=generated,
        back=member.path,
    )


async def require_otp(page: Page) -> web.StreamResponse:
    member = await _member(page)

    async def run() -> None:
        op = page.op("console.users.otp_require", _target(page, member))
        await page.api.tenancy.accounts.user_require_otp(op, page.caller.tenant, member.user.login, True)

    return await _change(page, member, run, "users_otp_required")


async def remove_otp(page: Page) -> web.StreamResponse:
    """The requirement off, and the enrolment gone (which ends the user's sessions): the user
    signs in with the password alone, unless the tenant requires one-time passwords of everyone."""
    member = await _member(page)
    api = page.api
    tenant, login = page.caller.tenant, member.user.login

    async def run() -> None:
        if member.required:
            op = page.op("console.users.otp_unrequire", _target(page, member))
            await api.tenancy.accounts.user_require_otp(op, tenant, login, False)
        if member.enrolled:
            await api.tenancy.credentials.otp_disable(page.op("console.users.otp_remove", _target(page, member)),
                                                      tenant, login)  # fmt: skip

    response = await _change(page, member, run, "users_otp_removed")
    if response.status == 303 and member.enrolled and member.user.id == page.caller.user_id:
        page.cookies[SESSION_COOKIE] = ""  # the enrolment's end ended this session too
        return page.redirect("/login", done="users_own_otp_removed")
    return response


async def delete(page: Page) -> web.StreamResponse:
    member = await _member(page)

    async def run() -> None:
        op = page.op("console.users.delete", _target(page, member))
        await page.api.tenancy.accounts.user_delete(op, page.caller.tenant, member.user.login)

    response = await _change(page, member, run, "users_deleted", not_self="users.not_self_delete")
    return page.redirect("/users", done="users_deleted") if response.status == 303 else response


i18n.add(
    {
        "en": {
            "users.title": "Users and rights",
            "users.caption": "The users of your tenant",
            "users.login": "Login",
            "users.role": "Role",
            "users.enabled": "Enabled",
            "users.disabled": "disabled",
            "users.otp": "One-time passwords",
            "users.created": "Created",
            "users.you": "you",
            "users.otp_enrolled": "set up",
            "users.otp_enrolled_required": "set up (required)",
            "users.otp_pending": "required, not yet set up",
            "users.otp_off": "off",
            "users.otp_sender": "— (senders do not sign in)",
            "users.roles_hint": "An admin manages users, credentials and settings; a viewer reads only; a sender "
            "sends mail and never signs in to the console.",
            "users.add_title": "Add a user",
            "users.password": "Password",
            "users.password_hint": "At least 12 characters. Leave it empty to have a strong one generated "
            "(shown once).",
            "users.login_hint": "Letters, digits and . _ @ + - (up to 128).",
            "users.login_taken": "That login is not available; choose another.",
            "users.added_title": "User {login} added",
            "users.added_intro": "The password of {login}:",
            "users.password_title": "New password of {login}",
            "users.password_intro": "The new password of {login}:",
            "users.continue": "Continue",
            "users.settings_title": "Tenant settings",
            "users.console_otp": "One-time passwords required for every console user",
            "users.console_otp_hint": "A user without them sets them up at their next sign-in.",
            "users.timezone": "Time zone of the console's pages",
            "users.timezone_hint": "An IANA name such as Asia/Tokyo or UTC; empty: the server's ({zone}).",
            "users.back": "All users",
            "users.facts": "This user",
            "users.role_title": "Role",
            "users.role_save": "Change role",
            "users.role_hint": "A new role ends the user's sessions.",
            "users.state_title": "Sign-in",
            "users.disable": "Disable",
            "users.disable_confirm": "Disable {login}? Its sessions end and it can no longer sign in or send.",
            "users.enable": "Enable",
            "users.password_title_form": "New password",
            "users.password_new": "New password",
            "users.password_set": "Set new password",
            "users.password_reset_hint": "Leave it empty to have one generated (shown once). The user's sessions end.",
            "users.own_password": "You change your own password on My account.",
            "users.otp_title": "One-time passwords",
            "users.otp_require": "Require one-time passwords",
            "users.otp_require_hint": "The user sets them up at their next sign-in.",
            "users.otp_remove": "Remove one-time passwords",
            "users.otp_remove_confirm": "Remove {login}'s one-time passwords? Its enrolment is deleted and its "
            "sessions end.",
            "users.otp_tenant_wide": "Your tenant requires one-time passwords of every console user.",
            "users.delete_title": "Delete",
            "users.delete": "Delete user",
            "users.delete_confirm": "Delete {login} with its API keys and IP credentials? This cannot be undone.",
            "users.not_self_role": "You cannot change the role of the user you are signed in as; ask another admin.",
            "users.not_self_disable": "You cannot disable the user you are signed in as; ask another admin.",
            "users.not_self_delete": "You cannot delete the user you are signed in as; ask another admin.",
            "users.not_self_password": "Change your own password on My account: it asks for your current one.",
            "done.users_added": "The user was added.",
            "done.users_role_changed": "The role was changed.",
            "users.stream_title": "Stream of the user's mail",
            "users.stream_save": "Change stream",
            "users.stream_hint": "Broadcast mail carries one-click unsubscribe and is not sent to whoever "
            "unsubscribed; a message's X-Cmcd-Stream field or an API request's stream still chooses for itself.",
            "done.users_stream_changed": "The stream was changed.",
            "done.users_disabled": "The user was disabled.",
            "done.users_enabled": "The user was enabled.",
            "done.users_password_set": "The password was changed.",
            "done.users_otp_required": "One-time passwords are now required of this user.",
            "done.users_otp_removed": "The one-time passwords of this user were removed.",
            "done.users_own_otp_removed": "Your one-time passwords were removed and your sessions ended: sign in again.",
            "done.users_deleted": "The user was deleted.",
            "done.users_settings_saved": "The tenant settings were saved.",
        },
        "ja": {
            "users.title": "ユーザーと権限",
            "users.caption": "このテナントのユーザー",
            "users.login": "ログイン名",
            "users.role": "ロール",
            "users.enabled": "有効",
            "users.disabled": "無効",
            "users.otp": "ワンタイムパスワード",
            "users.created": "作成日時",
            "users.you": "あなた",
            "users.otp_enrolled": "設定済み",
            "users.otp_enrolled_required": "設定済み（必須）",
            "users.otp_pending": "必須・未設定",
            "users.otp_off": "なし",
            "users.otp_sender": "—（送信者はサインインしません）",
            "users.roles_hint": "管理者はユーザー・認証情報・設定を管理し、閲覧者は閲覧のみ、送信者はメールを送信するだけで"
            "コンソールにはサインインしません。",
            "users.add_title": "ユーザーを追加",
            "users.password": "パスワード",
            "users.password_hint": "12 文字以上。空欄にすると強力なパスワードを生成します（一度だけ表示）。",
            "users.login_hint": "英数字と . _ @ + -（128 文字まで）。",
            "users.login_taken": "そのログイン名は使用できません。別の名前を選んでください。",
            "users.added_title": "ユーザー {login} を追加しました",
            "users.added_intro": "{login} のパスワード:",
            "users.password_title": "{login} の新しいパスワード",
            "users.password_intro": "{login} の新しいパスワード:",
            "users.continue": "続ける",
            "users.settings_title": "テナントの設定",
            "users.console_otp": "すべてのコンソールユーザーにワンタイムパスワードを必須にする",
            "users.console_otp_hint": "未設定のユーザーは次回のサインイン時に設定します。",
            "users.timezone": "コンソール画面のタイムゾーン",
            "users.timezone_hint": "Asia/Tokyo や UTC などの IANA 名。空欄ではサーバーの設定（{zone}）。",
            "users.back": "ユーザー一覧",
            "users.facts": "このユーザー",
            "users.role_title": "ロール",
            "users.role_save": "ロールを変更",
            "users.role_hint": "ロールを変更すると、そのユーザーのセッションは終了します。",
            "users.state_title": "サインイン",
            "users.disable": "無効にする",
            "users.disable_confirm": "{login} を無効にしますか？セッションは終了し、サインインも送信もできなくなります。",
            "users.enable": "有効にする",
            "users.password_title_form": "新しいパスワード",
            "users.password_new": "新しいパスワード",
            "users.password_set": "パスワードを設定",
            "users.password_reset_hint": "空欄にすると生成します（一度だけ表示）。そのユーザーのセッションは終了します。",
            "users.own_password": "自分のパスワードは「アカウント」で変更します。",
            "users.otp_title": "ワンタイムパスワード",
            "users.otp_require": "ワンタイムパスワードを必須にする",
            "users.otp_require_hint": "次回のサインイン時に設定します。",
            "users.otp_remove": "ワンタイムパスワードを解除",
            "users.otp_remove_confirm": "{login} のワンタイムパスワードを解除しますか？登録は削除され、セッションは終了します。",
            "users.otp_tenant_wide": "このテナントでは、すべてのコンソールユーザーにワンタイムパスワードが必須です。",
            "users.delete_title": "削除",
            "users.delete": "ユーザーを削除",
            "users.delete_confirm": "{login} を API キーと IP 認証情報ごと削除しますか？元に戻せません。",
            "users.not_self_role": "サインイン中のユーザー自身のロールは変更できません。別の管理者に依頼してください。",
            "users.not_self_disable": "サインイン中のユーザー自身を無効にすることはできません。別の管理者に依頼してください。",
            "users.not_self_delete": "サインイン中のユーザー自身を削除することはできません。別の管理者に依頼してください。",
            "users.not_self_password": "自分のパスワードは「アカウント」で変更してください（現在のパスワードが必要です）。",
            "done.users_added": "ユーザーを追加しました。",
            "done.users_role_changed": "ロールを変更しました。",
            "users.stream_title": "このユーザーのメールのストリーム",
            "users.stream_save": "ストリームを変更",
            "users.stream_hint": "一斉配信のメールにはワンクリック配信停止が付き、配信停止した宛先には送信しません。"
            "メッセージの X-Cmcd-Stream フィールドや API リクエストの stream が指定されていれば、そちらが優先されます。",
            "done.users_stream_changed": "ストリームを変更しました。",
            "done.users_disabled": "ユーザーを無効にしました。",
            "done.users_enabled": "ユーザーを有効にしました。",
            "done.users_password_set": "パスワードを変更しました。",
            "done.users_otp_required": "このユーザーのワンタイムパスワードを必須にしました。",
            "done.users_otp_removed": "このユーザーのワンタイムパスワードを解除しました。",
            "done.users_own_otp_removed": "ワンタイムパスワードを解除し、セッションを終了しました。もう一度サインインしてください。",
            "done.users_deleted": "ユーザーを削除しました。",
            "done.users_settings_saved": "テナントの設定を保存しました。",
        },
    }
)
