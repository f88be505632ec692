"""The console's "Sending credentials" page (admins only): the tenant's API keys (made for one of
its users, the token shown once; revoked) and its IP credentials (listed; added and removed here
only when the operator allows it with api.console_ip_credentials, else the operator's to manage).

Every change is the tenancy command the HTTP API and cmcctl use (accounts.apikey_add,
apikey_revoke, ipcred_add, ipcred_delete), named `console.apikeys.*` and `console.ipcreds.*` in the
operation log. The tenant is the session's; a key id or a login that is not the tenant's is "not
found", like one that does not exist. Never reads a token back: the store keeps only its digest.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from cmcd.api.console import i18n
from cmcd.api.console.web import Console, ConsoleError, Page, choices
from cmcd.submit.auth import APIKEY_LOGIN
from cmcd.tenancy.refusals import Reason, Refused

#: roles a key may be made with ("" keeps the user's own)
KEY_ROLES = ("sender", "viewer", "admin")
#: roles whose keys are also an SMTP AUTH password (cmcd.submit.auth sends only with these)
SENDING_ROLES = ("sender", "admin")


def register(c: Console) -> None:
    c.get("/keys", keys_page, need="manage")
    c.post("/keys", key_add, need="manage")
    c.post("/keys/{key_id}/revoke", key_revoke, need="manage")
    c.post("/keys/ip", ipcred_add, need="manage")
    c.post("/keys/ip/delete", ipcred_delete, need="manage")


# -- the page -----------------------------------------------------------------------------------


async def keys_page(page: Page) -> web.StreamResponse:
    return await _render(page)


async def _render(
    page: Page, status: int = 200, key_error: str = "", ip_error: str = "", typed: dict[str, str] | None = None
) -> web.Response:
    """The page: keys (newest first), the form that makes one, IP credentials. KEY_ERROR or
    IP_ERROR is a refusal said above its form; TYPED is what the refused form held."""
    api = page.api
    tenant = page.caller.tenant
    keys = list(reversed(await api.astore.call(api.store.apikeys, tenant)))
    users = await api.astore.call(api.store.users, tenant)
    creds = await api.astore.call(api.store.ipcreds, tenant)
    rows = [
        {"key_id": k["key_id"], "login": k["login"], "role": page.t(f"role.{k['role']}"),
         "created": page.when(k["created"]), "revoked": page.when(k["revoked"]) if k["revoked"] else "",
         "last_used": page.when(k["last_used"]) if k["last_used"] else ""}
        for k in keys
    ]  # fmt: skip
    role_choices = [("", page.t("keys.role_default")), *((r, page.t(f"role.{r}")) for r in KEY_ROLES)]
    return page.render(
        "keys.html",
        status=status,
        keys=rows,
        logins=choices((u.login, f"{u.login} ({page.t('role.' + u.role)})") for u in users),
        roles=choices(role_choices),
        creds=[{"login": c.login, "cidr": c.cidr} for c in creds],
        ip_allowed=api.config.api.console_ip_credentials,
        key_error=key_error,
        ip_error=ip_error,
        typed=typed or {},
    )


# -- API keys -----------------------------------------------------------------------------------


async def key_add(page: Page) -> web.StreamResponse:
    login = page.form.get("login", "").strip()
    role = page.form.get("role", "").strip()
    if not login:
        return await _render(page, 400, key_error=page.t("keys.login_missing"), typed={"login": login, "role": role})

    def ok_row(made: tuple[dict[str, Any], str]) -> tuple[str, str]:
        return f"{login} {made[0]['key_id']}", f"role={made[0]['role']}"

    op = page.op("console.apikeys.add", login, f"role={role or 'default'}", ok_row=ok_row)
    try:
        row, token = await page.api.tenancy.accounts.apikey_add(op, page.caller.tenant, login, role or None)
    except Refused as exc:
        if exc.refusal.reason is Reason.NOT_FOUND:  # not a user of this tenant
            raise ConsoleError(404, page.t("error.not_found")) from None
        return await _render(page, _status(exc), key_error=exc.refusal.text, typed={"login": login, "role": role})
    return page.render(
        "keys_created.html",
        key_id=row["key_id"],
        login=row["login"],
        role=page.t(f"role.{row['role']}"),
        token=token,
        sends=row["role"] in SENDING_ROLES,
        smtp_user=APIKEY_LOGIN,
    )


async def key_revoke(page: Page) -> web.StreamResponse:
    key_id = page.request.match_info["key_id"]
    try:
        await page.api.tenancy.accounts.apikey_revoke(
            page.op("console.apikeys.revoke", key_id), page.caller.tenant, key_id
        )
    except Refused as exc:
        if exc.refusal.reason is Reason.NOT_FOUND:  # another tenant's, unknown, or revoked already
            raise ConsoleError(404, page.t("error.not_found")) from None
        raise ConsoleError(_status(exc), exc.refusal.text) from None
    return page.redirect("/keys", done="keys_revoked")


# -- IP credentials -----------------------------------------------------------------------------


def _ip_allowed(page: Page) -> None:
    if not page.api.config.api.console_ip_credentials:
        raise ConsoleError(403, page.t("keys.ip_operator"))


def _said_to_tenant(refused: Refused) -> str:
    """A refused row's detail, which the tenant reads in its operation log: a network that
    conflicts is "not available", never whose it is (another tenant's networks are not its)."""
    if refused.refusal.reason is Reason.CONFLICT:
        return "that network is not available"
    return str(refused)


async def ipcred_add(page: Page) -> web.StreamResponse:
    _ip_allowed(page)
    login = page.form.get("login", "").strip()
    cidr = page.form.get("cidr", "").strip()
    typed = {"ip_login": login, "cidr": cidr}
    if not login or not cidr:
        return await _render(page, 400, ip_error=page.t("keys.ip_missing"), typed=typed)
    op = dataclasses.replace(page.op("console.ipcreds.add", f"{login} {cidr}"), refused_text=_said_to_tenant)
    try:
        await page.api.tenancy.accounts.ipcred_add(op, page.caller.tenant, login, cidr)
    except Refused as exc:
        if exc.refusal.reason is Reason.NOT_FOUND:
            raise ConsoleError(404, page.t("error.not_found")) from None
        if exc.refusal.reason is Reason.CONFLICT:  # this user's already, or another tenant's network
            return await _render(page, 409, ip_error=page.t("keys.ip_taken"), typed=typed)
        return await _render(page, _status(exc), ip_error=exc.refusal.text, typed=typed)
    return page.redirect("/keys", done="keys_ip_added")


async def ipcred_delete(page: Page) -> web.StreamResponse:
    _ip_allowed(page)
    login = page.form.get("login", "").strip()
    cidr = page.form.get("cidr", "").strip()
    try:
        await page.api.tenancy.accounts.ipcred_delete(
            page.op("console.ipcreds.delete", f"{login} {cidr}"), page.caller.tenant, login, cidr
        )
    except Refused as exc:
        if exc.refusal.reason is Reason.NOT_FOUND:
            raise ConsoleError(404, page.t("error.not_found")) from None
        return await _render(page, _status(exc), ip_error=exc.refusal.text)
    return page.redirect("/keys", done="keys_ip_deleted")


def _status(exc: Refused) -> int:
    return {Reason.CONFLICT: 409, Reason.FORBIDDEN: 403}.get(exc.refusal.reason, 422)


i18n.add(
    {
        "en": {
            "keys.title": "Sending credentials",
            "keys.intro": "Applications send with an API key: the Bearer token of the HTTP API, and the SMTP AUTH "
            "password. A person's sign-in password is never used to send.",
            "keys.api_keys": "API keys",
            "keys.key_id": "Key",
            "keys.login": "User",
            "keys.role": "Role",
            "keys.created": "Created",
            "keys.last_used": "Last used",
            "keys.never": "never",
            "keys.active": "active",
            "keys.revoked_at": "revoked {when}",
            "keys.revoke": "Revoke",
            "keys.revoke_confirm": "Revoke API key {key_id}? Applications using it stop working at once.",
            "keys.add_title": "New API key",
            "keys.role_default": "the user's role",
            "keys.role_hint": "Only an admin user may hold a key of another role.",
            "keys.add": "Create key",
            "keys.login_missing": "Choose the user the key is for.",
            "keys.last_used_hint": "Last use is recorded at most once an hour.",
            "keys.created_title": "API key created",
            "keys.created_intro": "API key {key_id} for {login} ({role}).",
            "keys.token": "Token",
            "keys.smtp_note": "This token is also the SMTP AUTH password: use the user name {user} (or the key "
            "id {key_id}).",
            "keys.no_smtp": "A viewer key reads through the HTTP API only; it cannot send mail.",
            "keys.back": "Back to sending credentials",
            "keys.ip_title": "IP credentials",
            "keys.ip_intro": "Hosts in these networks send as the user without SMTP AUTH.",
            "keys.cidr": "Network (CIDR)",
            "keys.cidr_hint": "An address or a network such as 192.0.2.0/24 (no wider than /16, or /48 for IPv6).",
            "keys.ip_add": "Add IP credential",
            "keys.ip_delete_confirm": "Remove IP credential {cidr} of {login}? Hosts there must then log in.",
            "keys.ip_operator": "IP credentials are managed by the operator: contact them to add or remove one.",
            "keys.ip_missing": "Choose the user and enter the network.",
            "keys.ip_taken": "That network is not available: it is this user's already, or it overlaps a network "
            "the operator gave to someone else.",
            "done.keys_revoked": "The API key is revoked.",
            "done.keys_ip_added": "The IP credential is added.",
            "done.keys_ip_deleted": "The IP credential is removed.",
        },
        "ja": {
            "keys.title": "送信用の認証情報",
            "keys.intro": "アプリケーションは API キーで送信します。API キーは HTTP API の Bearer トークンであり、"
            "SMTP AUTH のパスワードでもあります。人がサインインに使うパスワードは送信には使いません。",
            "keys.api_keys": "API キー",
            "keys.key_id": "キー",
            "keys.login": "ユーザー",
            "keys.role": "ロール",
            "keys.created": "作成日時",
            "keys.last_used": "最終使用",
            "keys.never": "未使用",
            "keys.active": "有効",
            "keys.revoked_at": "{when} に失効",
            "keys.revoke": "失効させる",
            "keys.revoke_confirm": "API キー {key_id} を失効させますか？ 使用中のアプリケーションはすぐに動かなくなります。",
            "keys.add_title": "新しい API キー",
            "keys.role_default": "ユーザーのロール",
            "keys.role_hint": "別のロールのキーを持てるのは管理者ユーザーだけです。",
            "keys.add": "キーを作成",
            "keys.login_missing": "キーを使うユーザーを選んでください。",
            "keys.last_used_hint": "最終使用は 1 時間に 1 回まで記録されます。",
            "keys.created_title": "API キーを作成しました",
            "keys.created_intro": "{login}（{role}）の API キー {key_id}。",
            "keys.token": "トークン",
            "keys.smtp_note": "このトークンは SMTP AUTH のパスワードとしても使えます。ユーザー名は {user}"
            "（またはキー ID {key_id}）です。",
            "keys.no_smtp": "閲覧者のキーは HTTP API での参照専用で、メールは送信できません。",
            "keys.back": "送信用の認証情報へ戻る",
            "keys.ip_title": "IP 認証",
            "keys.ip_intro": "これらのネットワークのホストは SMTP AUTH なしでそのユーザーとして送信します。",
            "keys.cidr": "ネットワーク（CIDR）",
            "keys.cidr_hint": "アドレス、または 192.0.2.0/24 のようなネットワーク（/16 より広くないもの。IPv6 は /48）。",
            "keys.ip_add": "IP 認証を追加",
            "keys.ip_delete_confirm": "{login} の IP 認証 {cidr} を削除しますか？ そのホストはログインが必要になります。",
            "keys.ip_operator": "IP 認証は運用者が管理しています。追加や削除は運用者に依頼してください。",
            "keys.ip_missing": "ユーザーを選び、ネットワークを入力してください。",
            "keys.ip_taken": "そのネットワークは使えません。このユーザーに登録済みか、運用者が他に割り当てたネットワークと重なっています。",
            "done.keys_revoked": "API キーを失効させました。",
            "done.keys_ip_added": "IP 認証を追加しました。",
            "done.keys_ip_deleted": "IP 認証を削除しました。",
        },
    }
)
