"""Admin verbs for the tenant API's credentials: API keys, tenant admins' TOTP enrolment, sessions.

Secrets leave the daemon once: an API key's token in the reply to apikey.add, the TOTP secret
(as a provisioning URI) in the reply to user.otp-enroll, recovery codes in the reply to
user.otp-confirm. The store keeps digests (keys, recovery codes, session tokens) and the encrypted
TOTP secret; a session is listed and revoked by a public id, never by its token.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from cmcd import totp
from cmcd.admin.server import BadRequest, _Args, _Verb

if TYPE_CHECKING:
    from cmcd.admin.server import AdminServer


async def _apikey_add(server: AdminServer, a: _Args) -> Any:
    role = a.optional_text("role")
    row, token = await server._astore.call(server._store.apikey_add, a.text("tenant"), a.text("login"), role)
    return {**row, "token": token}


async def _apikey_list(server: AdminServer, a: _Args) -> Any:
    return await server._astore.call(server._store.apikeys, a.text("tenant"), a.optional_text("login"))


async def _apikey_revoke(server: AdminServer, a: _Args) -> Any:
    tenant, key_id = a.text("tenant"), a.text("key_id")
    await server._astore.call(server._store.apikey_revoke, tenant, key_id)
    return {"tenant": tenant, "key_id": key_id, "revoked": True}


async def _otp_enroll(server: AdminServer, a: _Args) -> Any:
    tenant, login = a.text("tenant"), a.text("login")
    secret = totp.new_secret()
    await server._astore.call(server._store.otp_enroll, tenant, login, secret)
    issuer = f"cmcd {server._config.server.hostname}".replace(":", "")
    return {
        "tenant": tenant,
        "login": login,
        "uri": totp.provisioning_uri(secret, f"{tenant}/{login}", issuer),
        "secret": totp.b32(secret),
    }


async def _otp_confirm(server: AdminServer, a: _Args) -> Any:
    """The first code from the authenticator app confirms enrolment; the recovery codes come back once."""
    tenant, login, code = a.text("tenant"), a.text("login"), a.text("code")
    store = server._store
    user = await server._astore.call(store.user, tenant, login)
    state = await server._astore.call(store.otp_state, user.id)
    if state is None or state[1]:
        raise BadRequest(f"user {login!r} of tenant {tenant!r} has no enrolment waiting for confirmation")
    step = totp.verify(state[0], code, time.time(), state[3])
    if step is None:
        raise BadRequest("that code does not match; check the device's clock and try the next code")
    codes = totp.recovery_codes()
    confirmed = await server._astore.call(
        store.otp_use_step, user.id, step, confirm_with=[totp.hash_recovery(c) for c in codes]
    )
    if not confirmed:
        raise BadRequest("that code was already used; wait for the next one")
    return {"tenant": tenant, "login": login, "confirmed": True, "recovery_codes": codes}


async def _otp_disable(server: AdminServer, a: _Args) -> Any:
    tenant, login = a.text("tenant"), a.text("login")
    await server._astore.call(server._store.otp_disable, tenant, login)
    return {"tenant": tenant, "login": login, "otp": False}


async def _session_list(server: AdminServer, a: _Args) -> Any:
    return await server._astore.call(server._store.sessions, a.text("tenant"), a.text("login"))


async def _session_revoke(server: AdminServer, a: _Args) -> Any:
    """End one session of a user by its id, or all of them with "all": true (one or the other)."""
    tenant, login, sid = a.text("tenant"), a.text("login"), a.optional_text("id")
    every = a.raw.get("all") is True
    if every == (sid is not None):
        raise BadRequest('session.revoke: give either a session "id" or "all": true')
    ended = await server._astore.call(server._store.session_revoke, tenant, login, sid)
    return {"tenant": tenant, "login": login, "revoked": ended}


API_VERBS: dict[str, _Verb] = {
    "apikey.add": _Verb(_apikey_add, ("tenant", "login", "role"), target="{tenant}/{login} role={role}"),
    "apikey.list": _Verb(_apikey_list, ("tenant", "login")),
    "apikey.revoke": _Verb(_apikey_revoke, ("tenant", "key_id"), target="{tenant} {key_id}"),
    "user.otp-enroll": _Verb(_otp_enroll, ("tenant", "login"), target="{tenant}/{login}"),
    "user.otp-confirm": _Verb(_otp_confirm, ("tenant", "login", "code"), target="{tenant}/{login}"),
    "user.otp-disable": _Verb(_otp_disable, ("tenant", "login"), target="{tenant}/{login}"),
    "session.list": _Verb(_session_list, ("tenant", "login")),
    "session.revoke": _Verb(_session_revoke, ("tenant", "login", "id", "all"), target="{tenant}/{login} {id}"),
}
