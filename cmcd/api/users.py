"""Tenant admins manage their own users and API keys through the API (role admin only).

Everything is scoped to the caller's tenant by construction: the tenant name comes from the
credential, never from the request. Passwords are hashed (scrypt) off the event loop; a
generated password or a new key's token is returned once. Every change is in the operation log.
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING, Any

from aiohttp import web

from cmcd import crypto
from cmcd.api.problems import Problem, iso
from cmcd.errors import NotFound, StoreError

if TYPE_CHECKING:
    from cmcd.api.server import ApiServer

ROLES = ("admin", "sender", "viewer")
_LOGIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}\Z")


def _user_row(u: Any, enrolled: bool) -> dict[str, Any]:
    return {"login": u.login, "role": u.role, "enabled": u.enabled, "created": iso(u.created), "totp": enrolled}


async def list_users(api: ApiServer, request: web.Request) -> web.Response:
    caller = await api.caller(request, "manage")
    users = await api.astore.call(api.store.users, caller.tenant)
    rows = []
    for u in users:
        state = await api.astore.call(api.store.otp_state, u.id)
        rows.append(_user_row(u, state is not None and state[1]))
    return web.json_response({"data": rows})


async def add_user(api: ApiServer, request: web.Request) -> web.Response:
    caller = await api.caller(request, "manage")
    body, _ = await api.read_json(request)
    if not isinstance(body, dict) or set(body) - {"login", "role", "password"}:
        raise Problem(422, "invalid", 'expected {"login": ..., "role": "sender|viewer|admin", "password": optional}')
    login, role, password = body.get("login"), body.get("role", "sender"), body.get("password")
    if not isinstance(login, str) or not _LOGIN.match(login):
        raise Problem(422, "invalid", "login: letters, digits and . _ @ + - (up to 128)", extra={"field": "login"})
    if role not in ROLES:
        raise Problem(422, "invalid", "role: expected sender, viewer or admin", extra={"field": "role"})
    if password is not None and (not isinstance(password, str) or len(password) < 12 or "\x00" in password):
        raise Problem(422, "invalid", "password: at least 12 characters (or leave it out to have one generated)",
                      extra={"field": "password"})  # fmt: skip
    generated = password is None
    secret = crypto.generate_password() if password is None else password
    digest = await asyncio.get_running_loop().run_in_executor(None, crypto.hash_password, secret)
    try:
        u = await api.astore.call(api.store.user_add, caller.tenant, login, role, digest)
    except StoreError as exc:
        await api.log_op(caller, "api.users.add", login, str(exc))
        # logins are unique across tenants: say only that this one is taken, not by whom
        raise Problem(
            409, "conflict", "that login is not available; choose another", extra={"field": "login"}
        ) from None
    await api.service.directory.refresh(force=True)
    await api.log_op(caller, "api.users.add", login, None, f"role={role}")
    return web.json_response(_user_row(u, False) | ({"password": secret} if generated else {}), status=201)


async def delete_user(api: ApiServer, request: web.Request) -> web.Response:
    caller = await api.caller(request, "manage")
    login = request.match_info["login"]
    if login == caller.login:
        raise Problem(409, "conflict", "you cannot delete the user you are logged in as")
    try:
        await api.astore.call(api.store.user_delete, caller.tenant, login)
    except NotFound:
        await api.log_op(caller, "api.users.delete", login, "not found")
        raise Problem(404, "not-found", "no such user in your tenant") from None
    await api.service.directory.refresh(force=True)
    await api.log_op(caller, "api.users.delete", login, None)
    return web.Response(status=204)


async def list_keys(api: ApiServer, request: web.Request) -> web.Response:
    caller = await api.caller(request, "manage")
    keys = await api.astore.call(api.store.apikeys, caller.tenant)
    rows = [
        {"key_id": k["key_id"], "login": k["login"], "role": k["role"], "created": iso(k["created"]),
         "revoked": iso(k["revoked"]) if k["revoked"] else None}
        for k in keys
    ]  # fmt: skip
    return web.json_response({"data": rows})


async def add_key(api: ApiServer, request: web.Request) -> web.Response:
    caller = await api.caller(request, "manage")
    body, _ = await api.read_json(request)
    if not isinstance(body, dict) or set(body) - {"login", "role"} or not isinstance(body.get("login"), str):
        raise Problem(422, "invalid", 'expected {"login": ..., "role": optional sender|viewer|admin}')
    role = body.get("role")
    if role is not None and role not in ROLES:
        raise Problem(422, "invalid", "role: expected sender, viewer or admin", extra={"field": "role"})
    try:
        row, token = await api.astore.call(api.store.apikey_add, caller.tenant, body["login"], role)
    except NotFound:
        await api.log_op(caller, "api.apikeys.add", body["login"], "no such user")
        raise Problem(404, "not-found", "no such user in your tenant", extra={"field": "login"}) from None
    except StoreError as exc:
        await api.log_op(caller, "api.apikeys.add", body["login"], str(exc))
        raise Problem(422, "invalid", str(exc), extra={"field": "role"}) from None
    await api.log_op(caller, "api.apikeys.add", f"{body['login']} {row['key_id']}", None, f"role={row['role']}")
    out = {"key_id": row["key_id"], "login": row["login"], "role": row["role"], "created": iso(row["created"])}
    return web.json_response(out | {"token": token}, status=201)


async def revoke_key(api: ApiServer, request: web.Request) -> web.Response:
    caller = await api.caller(request, "manage")
    key_id = request.match_info["key_id"]
    try:
        await api.astore.call(api.store.apikey_revoke, caller.tenant, key_id)
    except NotFound:
        await api.log_op(caller, "api.apikeys.revoke", key_id, "not found")
        raise Problem(404, "not-found", "no active API key with that id in your tenant") from None
    await api.log_op(caller, "api.apikeys.revoke", key_id, None)
    return web.Response(status=204)
