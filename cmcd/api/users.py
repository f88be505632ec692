"""Tenant admins manage their own users and API keys through the API (role admin only).

Everything is scoped to the caller's tenant by construction: the tenant name comes from the
credential, never from the request. Each change is one tenancy command (its rules, its
transaction, its operation-log row, ok or refused); this module only maps HTTP to it and its
refusals back, some of them in fewer words than the operator's log gets (a taken login is "not
available", never whose it is). A generated password or a new key's token is returned once.
Never imports cmcd.api.server: the server passes itself as an ApiContext.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from cmcd.api.context import ApiContext, api_op
from cmcd.api.problems import Problem, iso, problem
from cmcd.tenancy.refusals import Reason, Refused

_ROLE_PROBLEM = "role: expected sender, viewer or admin"


def _user_row(u: Any, enrolled: bool) -> dict[str, Any]:
    return {"login": u.login, "role": u.role, "enabled": u.enabled, "created": iso(u.created), "totp": enrolled,
            "stream": u.stream}  # fmt: skip


async def list_users(api: ApiContext, request: web.Request) -> web.Response:
    caller = await api.caller(request, "manage")
    users = await api.astore.call(api.store.users, caller.tenant)
    rows = []
    for u in users:
        state = await api.astore.call(api.store.otp_state, u.id)
        rows.append(_user_row(u, state is not None and state[1]))
    return web.json_response({"data": rows})


async def add_user(api: ApiContext, request: web.Request) -> web.Response:
    caller = await api.caller(request, "manage")
    body, _ = await api.read_json(request)
    if not isinstance(body, dict) or set(body) - {"login", "role", "password"}:
        raise Problem(422, "invalid", 'expected {"login": ..., "role": "sender|viewer|admin", "password": optional}')
    login, role, password = body.get("login"), body.get("role", "sender"), body.get("password")
    if not isinstance(login, str):
        raise Problem(422, "invalid", "login: letters, digits and . _ @ + - (up to 128)", extra={"field": "login"})
    if not isinstance(role, str):
        raise Problem(422, "invalid", _ROLE_PROBLEM, extra={"field": "role"})
    if password is not None and not isinstance(password, str):
        raise Problem(422, "invalid", "password: at least 12 characters (or leave it out to have one generated)",
                      extra={"field": "password"})  # fmt: skip
    op = dataclasses.replace(api_op(caller, "api.users.add", login, f"role={role}"), refused_text=said_to_tenant)
    try:
        u, generated = await api.tenancy.accounts.user_add(op, caller.tenant, login, role, password)
    except Refused as exc:
        if exc.refusal.reason is Reason.INVALID:  # the login, role or password rule
            raise problem(exc.refusal) from None
        # logins are unique across tenants: say only that this one is taken, not by whom
        raise Problem(
            409, "conflict", "that login is not available; choose another", extra={"field": "login"}
        ) from None
    return web.json_response(_user_row(u, False) | ({"password": generated} if generated is not None else {}),
                             status=201)  # fmt: skip


def said_to_tenant(refused: Refused) -> str:
    """A refused row's detail, which the tenant reads through /v1/audit: a taken login is "not
    available", never whose it is (logins are unique across tenants)."""
    if refused.refusal.reason is Reason.CONFLICT:
        return "that login is not available"
    return str(refused)


async def delete_user(api: ApiContext, request: web.Request) -> web.Response:
    caller = await api.caller(request, "manage")
    login = request.match_info["login"]
    if login == caller.login:
        raise Problem(409, "conflict", "you cannot delete the user you are logged in as")
    try:
        await api.tenancy.accounts.user_delete(api_op(caller, "api.users.delete", login), caller.tenant, login)
    except Refused as exc:
        if exc.refusal.reason is Reason.NOT_FOUND:
            raise Problem(404, "not-found", "no such user in your tenant") from None
        raise problem(exc.refusal) from None
    return web.Response(status=204)


async def list_keys(api: ApiContext, request: web.Request) -> web.Response:
    caller = await api.caller(request, "manage")
    keys = await api.astore.call(api.store.apikeys, caller.tenant)
    rows = [
        {"key_id": k["key_id"], "login": k["login"], "role": k["role"], "created": iso(k["created"]),
         "revoked": iso(k["revoked"]) if k["revoked"] else None}
        for k in keys
    ]  # fmt: skip
    return web.json_response({"data": rows})


async def add_key(api: ApiContext, request: web.Request) -> web.Response:
    caller = await api.caller(request, "manage")
    body, _ = await api.read_json(request)
    if not isinstance(body, dict) or set(body) - {"login", "role"} or not isinstance(body.get("login"), str):
        raise Problem(422, "invalid", 'expected {"login": ..., "role": optional sender|viewer|admin}')
    login, role = body["login"], body.get("role")
    if role is not None and not isinstance(role, str):
        raise Problem(422, "invalid", _ROLE_PROBLEM, extra={"field": "role"})

    def ok_row(made: tuple[dict[str, Any], str]) -> tuple[str, str]:
        return f"{login} {made[0]['key_id']}", f"role={made[0]['role']}"

    op = api_op(caller, "api.apikeys.add", login, ok_row=ok_row)
    try:
        row, token = await api.tenancy.accounts.apikey_add(op, caller.tenant, login, role)
    except Refused as exc:
        if exc.refusal.reason is Reason.NOT_FOUND:
            raise Problem(404, "not-found", "no such user in your tenant", extra={"field": "login"}) from None
        raise problem(exc.refusal, "role") from None  # a role the user may not hold a key of
    out = {"key_id": row["key_id"], "login": row["login"], "role": row["role"], "created": iso(row["created"])}
    return web.json_response(out | {"token": token}, status=201)


async def revoke_key(api: ApiContext, request: web.Request) -> web.Response:
    caller = await api.caller(request, "manage")
    key_id = request.match_info["key_id"]
    try:
        await api.tenancy.accounts.apikey_revoke(api_op(caller, "api.apikeys.revoke", key_id), caller.tenant, key_id)
    except Refused as exc:
        if exc.refusal.reason is Reason.NOT_FOUND:
            raise Problem(404, "not-found", "no active API key with that id in your tenant") from None
        raise problem(exc.refusal) from None
    return web.Response(status=204)
