"""Admin verbs for the tenant API's credentials: API keys, tenant admins' TOTP enrolment, sessions.

Each change is one tenancy command (cmcd.tenancy.accounts for keys, cmcd.tenancy.credentials for
TOTP and sessions). Secrets leave the daemon once: an API key's token in the reply to apikey.add,
the TOTP secret (as a provisioning URI) in the reply to user.otp-enroll, recovery codes in the
reply to user.otp-confirm. A session is listed and revoked by a public id, never by its token.
"""

from __future__ import annotations

import time
from typing import Any

from cmcd.admin.verb import Args, BadRequest, Context, Verb, command, read


async def _apikey_add(ctx: Context, a: Args) -> Any:
    role = a.optional_text("role")
    row, token = await ctx.tenancy.accounts.apikey_add(a.op, a.text("tenant"), a.text("login"), role)
    return {**row, "token": token}


async def _apikey_list(ctx: Context, a: Args) -> Any:
    return await ctx.astore.call(ctx.store.apikeys, a.text("tenant"), a.optional_text("login"))


async def _apikey_revoke(ctx: Context, a: Args) -> Any:
    tenant, key_id = a.text("tenant"), a.text("key_id")
    await ctx.tenancy.accounts.apikey_revoke(a.op, tenant, key_id)
    return {"tenant": tenant, "key_id": key_id, "revoked": True}


async def _otp_enroll(ctx: Context, a: Args) -> Any:
    tenant, login = a.text("tenant"), a.text("login")
    issuer = f"cmcd {ctx.config.server.hostname}".replace(":", "")
    uri, secret = await ctx.tenancy.credentials.otp_enroll(a.op, tenant, login, issuer)
    return {"tenant": tenant, "login": login, "uri": uri, "secret": secret}


async def _otp_confirm(ctx: Context, a: Args) -> Any:
    """The first code from the authenticator app confirms enrolment; the recovery codes come back once."""
    tenant, login, code = a.text("tenant"), a.text("login"), a.text("code")
    codes = await ctx.tenancy.credentials.otp_confirm(a.op, tenant, login, code, time.time())
    return {"tenant": tenant, "login": login, "confirmed": True, "recovery_codes": codes}


async def _otp_disable(ctx: Context, a: Args) -> Any:
    tenant, login = a.text("tenant"), a.text("login")
    await ctx.tenancy.credentials.otp_disable(a.op, tenant, login)
    return {"tenant": tenant, "login": login, "otp": False}


async def _session_list(ctx: Context, a: Args) -> Any:
    return await ctx.astore.call(ctx.store.sessions, a.text("tenant"), a.text("login"))


async def _session_revoke(ctx: Context, a: Args) -> Any:
    """End one session of a user by its id, or all of them with "all": true (one or the other)."""
    tenant, login, sid = a.text("tenant"), a.text("login"), a.optional_text("id")
    if a.flag("all") == (sid is not None):
        raise BadRequest('session.revoke: give either a session "id" or "all": true')
    ended = await ctx.tenancy.credentials.session_revoke(a.op, tenant, login, sid)
    return {"tenant": tenant, "login": login, "revoked": ended}


API_VERBS: dict[str, Verb] = {
    "apikey.add": command(_apikey_add, ("tenant", "login", "role"), "{tenant}/{login} role={role}"),
    "apikey.list": read(_apikey_list, "tenant", "login"),
    "apikey.revoke": command(_apikey_revoke, ("tenant", "key_id"), "{tenant} {key_id}"),
    "user.otp-enroll": command(_otp_enroll, ("tenant", "login"), "{tenant}/{login}"),
    "user.otp-confirm": command(_otp_confirm, ("tenant", "login", "code"), "{tenant}/{login}"),
    "user.otp-disable": command(_otp_disable, ("tenant", "login"), "{tenant}/{login}"),
    "session.list": read(_session_list, "tenant", "login"),
    "session.revoke": command(_session_revoke, ("tenant", "login", "id", "all"), "{tenant}/{login} {id}"),
}
