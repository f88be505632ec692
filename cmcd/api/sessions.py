"""A tenant admin's console session: POST /v1/sessions (login, password and a one-time code or a
recovery code give a session token) and DELETE /v1/sessions (sign-out).

The password check, the failed-login throttle and the login log are submit's Authenticator's
(the same as SMTP AUTH's); this module adds the second factor and its own pause per user after
bad one-time codes. Never imports cmcd.api.server: the server passes itself as an ApiContext.
"""

from __future__ import annotations

import hmac
import secrets

from aiohttp import web

from cmcd import policy, totp
from cmcd.api.context import ApiContext, client_ip
from cmcd.api.problems import Problem, iso
from cmcd.store import LoginRecord
from cmcd.store.api_store import SESSION_PREFIX

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


class Sessions:
    """The two session endpoints of one server, and its count of bad one-time codes per user."""

    def __init__(self, api: ApiContext) -> None:
        self.api = api
        self._otp_failures = policy.SlidingWindow(OTP_FAIL_WINDOW_S)  # user id -> failed second factors

    async def login(self, request: web.Request) -> web.Response:
        """A tenant admin's login: password + TOTP code (or a recovery code) -> a session token.

        Every failed login gets one answer (_login_failed: the same status and body), whatever was
        wrong (unknown login, wrong password, missing, wrong or reused code, not an admin, no TOTP,
        disabled, paused for bad codes), after the same work: one scrypt computation (a dummy hash
        for an unknown login), the same store reads and one code check (a dummy secret without an
        enrolment). What was wrong goes to the login log only.
        """
        api = self.api
        auth = api.service.auth
        ip = client_ip(request)
        if auth.auth_throttled(ip):
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
        if auth.auth_throttled(ip, login):  # this login from this address used up its failures
            raise Problem(429, "throttled", "too many failed logins from your address; try again later")
        otp, recovery = body.get("otp"), body.get("recovery_code")
        if (
            not isinstance(otp, str | None)
            or not isinstance(recovery, str | None)
            or (otp is None) == (recovery is None)
        ):
            raise Problem(422, "invalid", 'give exactly one of "otp" (the 6-digit code) or "recovery_code"')
        user, password_ok = await auth.check_password(login, password, ip)
        state = await api.astore.call(api.store.otp_state, user.id if user is not None else 0)
        enrolled = state is not None and state[1]
        secret, recovery_digests, last_step = _NO_SECRET, list[str](), 0
        if state is not None and enrolled:
            secret, _, recovery_digests, last_step = state
        now = api.clock()
        step = totp.verify(secret, otp, now, last_step) if otp is not None else None
        recovery_digest = totp.hash_recovery(recovery) if recovery is not None else ""
        recovery_ok = sum(hmac.compare_digest(h, recovery_digest) for h in recovery_digests) > 0
        paused = user is not None and self._otp_failures.count(user.id, now) >= OTP_FAIL_LIMIT
        if user is None or not password_ok:
            detail = "unknown login" if user is None else "bad password"
        elif not user.enabled:
            detail = "disabled"
        elif user.role != "admin" or not enrolled:
            detail = "not a tenant admin with TOTP enrolled"
        elif paused:  # per user, whatever the address: the password is known to whoever gets here
            detail = "paused: too many bad one-time codes"
        elif otp is not None:
            ok = step is not None and await api.astore.call(api.store.otp_use_step, user.id, step)
            detail = "" if ok else "bad or reused one-time code"
        else:
            ok = recovery_ok and await api.astore.call(api.store.otp_use_recovery, user.id, recovery_digest)
            detail = "recovery code used" if ok else "bad recovery code"
        if user is None or detail not in ("", "recovery code used"):
            auth.note_auth_failure(ip, login)
            api.service.stats.authenticated(False, throttled=False)
            if user is not None and password_ok and not paused:
                self._otp_failures.add(user.id, now)
            result = "throttled" if detail.startswith("paused") else "fail"
            tenant_id = user.tenant_id if user is not None else None
            auth.log_login(LoginRecord(now, login, ip, "API-SESSION", result, tenant_id, detail))
            raise _login_failed()
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
