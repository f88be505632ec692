"""A tenant admin's console session: POST /v1/sessions (login, password and a one-time code or a
recovery code give a session token) and DELETE /v1/sessions (sign-out).

The password check, the failed-login throttle and the login log are submit's Authenticator's
(the same as SMTP AUTH's); this module adds the second factor and its own pause per user after
bad one-time codes, counted in the store (cmcd/store/throttle_store.py) like the throttle, so it
holds for the host whichever worker process each attempt reaches. Never imports cmcd.api.server:
the server passes itself as an ApiContext.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import sqlite3

from aiohttp import web

from cmcd import totp
from cmcd.api.context import ApiContext, client_ip
from cmcd.api.problems import Problem, iso
from cmcd.errors import StoreError
from cmcd.store import LoginRecord
from cmcd.store.api_store import SESSION_PREFIX
from cmcd.submit.auth import Authenticator, Claim

log = logging.getLogger("cmcd.api")

SESSION_BODY_MAX = 4096
#: POST /v1/sessions is unauthenticated and its body tiny: it must be in within this (or
#: api.header_timeout if shorter) of its headers, whatever its rate
SESSION_BODY_S = 5.0
OTP_FAIL_LIMIT, OTP_FAIL_WINDOW_S = 10, 900.0  # bad one-time codes per user before a pause
#: the secret a one-time code is checked against when the login has no enrolment (never matches a
#: real one: the answer is the same and the work too)
_NO_SECRET = secrets.token_bytes(totp.SECRET_BYTES)


def _login_failed() -> Problem:
    """The one answer to every failed login on POST /v1/sessions."""
    return Problem(401, "login-failed", "login failed: a tenant admin's login, password and a valid one-time code "
                   "(or recovery code) are needed")  # fmt: skip


def _otp_key(user_id: int) -> str:
    """The key a user's bad one-time codes count against in the store (user 0 is no one: a failed
    login that is no bad code counts there, so it writes what a bad code writes)."""
    return f"otp {user_id}"


async def claim_second_factor(api: ApiContext, user_id: int, now: float) -> tuple[tuple[int, ...], str]:
    """Count a bad one-time code of USER_ID ahead of checking it (0: the login gets no second
    factor; counted for no one), unless the user has had OTP_FAIL_LIMIT within OTP_FAIL_WINDOW_S,
    from any address and any worker. One store transaction and one row whatever the outcome,
    so its cost tells nothing. The rows claimed (give them back with failure_release when the
    code was right), and why the user is paused ("" when not). The console's sign-in uses it too."""
    limits = [(_otp_key(user_id), OTP_FAIL_LIMIT if user_id else 0)]
    try:
        got = await api.astore.call(api.store.failure_claim, limits, OTP_FAIL_WINDOW_S, now, instead=_otp_key(0))
    except (sqlite3.Error, StoreError) as exc:  # cannot count: no code is checked
        log.warning("event=otp_count_failed user_id=%d error=%r", user_id, str(exc))
        return (), "paused: bad one-time codes cannot be counted (the store cannot be written)"
    return got.rows, "" if got.held is None else "paused: too many bad one-time codes"


class Sessions:
    """The two session endpoints of one server."""

    def __init__(self, api: ApiContext) -> None:
        self.api = api

    async def login(self, request: web.Request) -> web.Response:
        """A tenant admin's login: password + TOTP code (or a recovery code) -> a session token.

        Every failed login gets one answer (_login_failed: the same status and body), whatever was
        wrong (unknown login, wrong password, missing, wrong or reused code, not an admin, no TOTP,
        disabled, paused for bad codes), after the same work: one scrypt computation (a dummy hash
        for an unknown login), the same store reads, one store write counting a bad code (for no
        one when there is no second factor to check) and one code check (a dummy secret without an
        enrolment). What was wrong goes to the login log only.
        """
        api = self.api
        auth = api.service.auth
        ip = client_ip(request)
        if await auth.auth_throttled(ip):
            raise Problem(429, "throttled", "too many failed logins from your address; try again later")
        body, _ = await api.read_json(request, SESSION_BODY_MAX, min(SESSION_BODY_S, api.config.api.header_timeout))
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("login"), str)
            or not isinstance(body.get("password"), str)
        ):
            raise Problem(422, "invalid", 'expected {"login": ..., "password": ..., "otp": "123456"} '
                          '(or "recovery_code" instead of "otp")')  # fmt: skip
        unknown = set(body) - {"login", "password", "otp", "recovery_code"}
        if unknown:
            raise Problem(422, "invalid", f"unknown field {sorted(unknown)[0]!r}", extra={"field": sorted(unknown)[0]})
        login, password = body["login"], body["password"]
        if await auth.auth_throttled(ip, login):  # this login from this address used up its failures
            raise Problem(429, "throttled", "too many failed logins from your address; try again later")
        otp, recovery = body.get("otp"), body.get("recovery_code")
        if (
            not isinstance(otp, str | None)
            or not isinstance(recovery, str | None)
            or (otp is None) == (recovery is None)
        ):
            raise Problem(422, "invalid", 'give exactly one of "otp" (the 6-digit code) or "recovery_code"')
        claim = await auth.claim(ip, login)  # the failure counted before the password is checked
        if isinstance(claim, str):
            raise Problem(429, "throttled", "too many failed logins from your address; try again later")
        try:
            return await self._login(auth, ip, login, password, otp, recovery, claim)
        finally:
            auth.fail(claim)  # unless _login released it: a login cut short counts as a failure

    async def _login(
        self,
        auth: Authenticator,
        ip: str,
        login: str,
        password: str,
        otp: str | None,
        recovery: str | None,
        claim: Claim,
    ) -> web.Response:
        api = self.api
        user, password_ok = await auth.check_password(login, password)
        state = await api.astore.call(api.store.otp_state, user.id if user is not None else 0)
        enrolled = state is not None and state[1]
        secret, recovery_digests, last_step = _NO_SECRET, list[str](), 0
        if state is not None and enrolled:
            secret, _, recovery_digests, last_step = state
        now = api.clock()
        step = totp.verify(secret, otp, now, last_step) if otp is not None else None
        recovery_digest = totp.hash_recovery(recovery) if recovery is not None else ""
        recovery_ok = sum(hmac.compare_digest(h, recovery_digest) for h in recovery_digests) > 0
        second = user is not None and password_ok and user.enabled and user.role == "admin" and enrolled
        otp_claim, paused = await claim_second_factor(api, user.id if user is not None and second else 0, now)
        if user is None or not password_ok:
            detail = "unknown login" if user is None else "bad password"
        elif not user.enabled:
            detail = "disabled"
        elif user.role != "admin" or not enrolled:
            detail = "not a tenant admin with TOTP enrolled"
        elif paused:  # per user, whatever the address: the password is known to whoever gets here
            detail = paused
        elif otp is not None:
            ok = step is not None and await api.astore.call(api.store.otp_use_step, user.id, step)
            detail = "" if ok else "bad or reused one-time code"
        else:
            ok = recovery_ok and await api.astore.call(api.store.otp_use_recovery, user.id, recovery_digest)
            detail = "recovery code used" if ok else "bad recovery code"
        if user is None or detail not in ("", "recovery code used"):
            auth.fail(claim)  # counted for the address (and a bad code for the user: otp_claim's rows)
            api.service.stats.authenticated(False, throttled=False)
            result = "throttled" if detail.startswith("paused") else "fail"
            tenant_id = user.tenant_id if user is not None else None
            auth.log_login(LoginRecord(now, login, ip, "API-SESSION", result, tenant_id, detail))
            raise _login_failed()
        await auth.release(claim)
        try:
            await api.astore.call(api.store.failure_release, otp_claim)
        except (sqlite3.Error, StoreError) as exc:  # it counts as a bad code until it ages out
            log.warning("event=otp_release_failed user_id=%d error=%r", user.id, str(exc))
        api.service.stats.authenticated(True, throttled=False)
        token = SESSION_PREFIX + secrets.token_urlsafe(32)
        expires = api.clock() + api.config.api.session_ttl
        await api.astore.call(api.store.session_add, token, user.id, user.tenant_id, expires)
        auth.log_login(LoginRecord(api.clock(), login, ip, "API-SESSION", "ok", user.tenant_id, detail))
        return web.json_response({"token": token, "expires": iso(expires)}, status=201)

    async def logout(self, request: web.Request) -> web.Response:
        """Sign-out: the session token presented ends now (the console's sign-out)."""
        api = self.api
        caller = await api.caller(request, None)
        if not caller.credential.startswith("session:"):
            raise Problem(400, "not-a-session", "sign out with a session token; an API key is revoked with "
                          "DELETE /v1/apikeys/{key_id}")  # fmt: skip
        token = request.headers["Authorization"].partition(" ")[2].strip()
        await api.astore.call(api.store.session_end, token)
        await api.log_op(caller, "api.sessions.delete", caller.credential, None)
        return web.Response(status=204)
