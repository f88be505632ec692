"""Logins, for every way in: SMTP AUTH (a user's password, or an API key as the password), IP
credentials, the password check behind the API's session login, the failed-login throttle that
every door counts against, the cache of recent logins and the login log (written in batches).

Answers are a Sender or a typed refusal (cmcd/submit/refusals.py). Never decides anything about
a message (cmcd/submit/service.py does), never changes a credential, never speaks a protocol.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import ipaddress
import logging
import os
from collections.abc import Callable

from cmcd import crypto, policy
from cmcd.config import Config
from cmcd.queue.audit import AuditLog
from cmcd.records import Sender, User
from cmcd.stats import IntakeStats
from cmcd.store import AsyncStore, LoginRecord
from cmcd.store.api_store import split_api_key
from cmcd.submit import refusals as refuse
from cmcd.tenancy.directory import Directory
from cmcd.tenancy.refusals import Reason, Refusal
from cmcd.tenancy.rules import SEND_ROLES

log = logging.getLogger("cmcd.submit")

VERIFY_SLOTS = 2  # concurrent scrypt verifications (bounds memory at 64 MiB and leaves a core free)
#: the SMTP AUTH user name that says "the password is an API key" (the key's id works too)
APIKEY_LOGIN = "apikey"
#: the login-log name of a failed login that used a purged tenant's login name (the name is erased)
PURGED_LOGIN = "(login of a purged tenant)"


def _login_key(address_key: str, login: str) -> str:
    """The throttle's key for one login from one address (logins compare case-insensitively)."""
    return f"{address_key} {login.lower()}"


def throttle_key(client_ip: str) -> str:
    """What auth throttling counts against: policy.client_group, as the connection caps (the
    address, or its /64 for IPv6)."""
    return policy.client_group(client_ip)


class Authenticator:
    """Who is logging in, for SubmitService (which holds one as .auth) and the API's login paths."""

    def __init__(
        self,
        config: Callable[[], Config],
        astore: AsyncStore,
        directory: Directory,
        audit: AuditLog,
        stats: IntakeStats,
        clock: Callable[[], float],
        closing: Callable[[int], bool],
    ) -> None:
        self._config = config  # the service's current configuration (SIGHUP replaces it)
        self.astore = astore
        self.directory = directory
        self.audit = audit
        self.stats = stats
        self.clock = clock
        #: whether a tenant is being purged (SubmitService.close_tenant): its logins are refused
        self._closing = closing
        self._cache_key = os.urandom(32)
        self._auth_cache: dict[str, tuple[bytes, Sender, float]] = {}
        #: keyed digests of purged tenants' login names: a later failed login logs none of them
        self._purged_logins: set[bytes] = set()
        self._auth_pending: dict[str, int] = {}
        self._verify_slots = asyncio.Semaphore(VERIFY_SLOTS)
        self._verifying: dict[tuple[str, bytes], asyncio.Task[bool]] = {}
        self._auth_failures = policy.SlidingWindow(config().smtp.auth_fail_window)
        self._pending_logins: list[LoginRecord] = []
        self._flush_task: asyncio.Task[None] | None = None

    @property
    def config(self) -> Config:
        return self._config()

    @property
    def _generation(self) -> int:
        return self.directory.generation

    async def start(self) -> None:
        await asyncio.to_thread(crypto.dummy_hash)  # computed once, off the loop, before any AUTH

    async def close(self) -> None:
        await self._flush_logs()

    def forget_cached(self) -> None:
        """A new directory cut: no cached login outlives it."""
        self._auth_cache.clear()

    def forget_tenant(self, tenant_id: int, logins: tuple[str, ...]) -> None:
        """A tenant is being purged: none of its cached logins works, and failed logins with one
        of LOGINS are logged from now on without the name."""
        self._purged_logins.update(self._login_digest(login) for login in logins)
        self._auth_cache = {k: v for k, v in self._auth_cache.items() if v[1].tenant_id != tenant_id}

    def _login_digest(self, login: str) -> bytes:
        return hmac.new(self._cache_key, b"login\0" + login.encode("utf-8", "surrogateescape"), "sha256").digest()

    # -- logins ----------------------------------------------------------------------------

    def auth_throttle(self, client_ip: str, login: str | None = None) -> str | None:
        """Which limit holds logins back, counting checks still running: "login" once LOGIN has used
        up smtp.auth_fail_limit failures from this address (an IPv6 /64), "address" once the address
        has used up the much higher smtp.auth_fail_limit_per_address over all logins; else None.
        So one tenant's bad client behind a shared NAT locks out its own login, not the others'."""
        if self.config.smtp.auth_fail_limit <= 0:  # 0: no throttling at all
            return None
        now = self.clock()
        per_address = self.config.smtp.auth_fail_limit_per_address
        key = throttle_key(client_ip)
        if per_address > 0 and self._auth_failures.count(key, now) + self._auth_pending.get(key, 0) >= per_address:
            return "address"
        limit = self.config.smtp.auth_fail_limit
        if login is not None:
            lkey = _login_key(key, login)
            if self._auth_failures.count(lkey, now) + self._auth_pending.get(lkey, 0) >= limit:
                return "login"
        return None

    def auth_throttled(self, client_ip: str, login: str | None = None) -> bool:
        return self.auth_throttle(client_ip, login) is not None

    def _throttled_row(self, now: float, login: str, client_ip: str, mechanism: str, which: str) -> LoginRecord:
        smtp = self.config.smtp
        limit = smtp.auth_fail_limit_per_address if which == "address" else smtp.auth_fail_limit
        what = "address limit" if which == "address" else "address+login limit"
        detail = f"{what}: {limit} failures in {smtp.auth_fail_window:g} s"
        return LoginRecord(now, login, client_ip, mechanism, "throttled", None, detail)

    async def authenticate(
        self, login: str, password: str, client_ip: str, mechanism: str, *, log_ok: bool = True
    ) -> Sender | Refusal:
        """SMTP AUTH: a Sender on success, or the refusal (535, or 421 once the IP is throttled).
        LOG_OK false leaves the success row to the caller.

        SMTP credentials only. An application's: an API key of a sending role (sender or admin)
        as the password, with the user name "apikey" or the key's id; the login log names it
        "apikey:<id>", never the secret. A user's password works only for a sending user without
        TOTP: a TOTP-enrolled user signs in as a person (the console), and what a person types
        to sign in is never what an application stores to send.

        If an administrative change lands while the password is being checked (user disabled,
        password changed), the check is made again against the new state.
        """
        key_id = split_api_key(password)
        as_key = key_id is not None and login in (APIKEY_LOGIN, key_id)
        name = f"{APIKEY_LOGIN}:{key_id}" if as_key else login
        while True:
            generation = self._generation
            if as_key:
                result = await self._authenticate_key(name, password, client_ip, mechanism)
            else:
                result = await self._authenticate_once(login, password, client_ip, mechanism)
            if generation == self._generation:
                break
        if isinstance(result, Sender) and self._closing(result.tenant_id):
            now = self.clock()
            self._log_login(LoginRecord(now, name, client_ip, mechanism, "fail", result.tenant_id, "tenant deleted"))
            result = refuse.AUTH_CLOSING
        throttled = isinstance(result, Refusal) and result.reason is Reason.AUTH_THROTTLED
        self.stats.authenticated(isinstance(result, Sender), throttled=throttled)
        if isinstance(result, Sender) and log_ok:
            self._log_login(LoginRecord(self.clock(), name, client_ip, mechanism, "ok", result.tenant_id))
        return result

    async def _authenticate_key(self, name: str, token: str, client_ip: str, mechanism: str) -> Sender | Refusal:
        """An API key as the AUTH password: a digest lookup (the key is 256 random bits, no scrypt
        needed), read from the store every time, so a revoked key fails at once."""
        await self.directory.current()
        now = self.clock()
        which = self.auth_throttle(client_ip, name)
        if which is not None:
            self._log_login(self._throttled_row(now, name, client_ip, mechanism, which))
            return refuse.AUTH_THROTTLED
        caller = await self.astore.call(self.astore.store.apikey_caller, token)
        if caller is not None and caller.role in SEND_ROLES:
            return Sender(caller.user_id, caller.tenant_id, caller.tenant, caller.login, mechanism)
        if caller is None:
            return self._auth_failed(name, client_ip, mechanism, now, None, "unknown or revoked key, or user disabled")
        return self._auth_failed(name, client_ip, mechanism, now, caller.tenant_id, f"a {caller.role} key may not send")

    def _auth_failed(
        self, login: str, client_ip: str, mechanism: str, now: float, tenant_id: int | None, detail: str
    ) -> Refusal:
        """Count and log a failed AUTH; the one reply every failure gets."""
        self.note_auth_failure(client_ip, login)
        self._log_login(LoginRecord(now, login, client_ip, mechanism, "fail", tenant_id, detail))
        which = self.auth_throttle(client_ip, login)
        if which is not None:
            log.warning("event=auth_throttled client_ip=%s limit=%s", client_ip, which)
        return refuse.AUTH_INVALID

    async def _authenticate_once(self, login: str, password: str, client_ip: str, mechanism: str) -> Sender | Refusal:
        await self.directory.current()
        now = self.clock()
        which = self.auth_throttle(client_ip, login)
        if which is not None:
            self._log_login(self._throttled_row(now, login, client_ip, mechanism, which))
            return refuse.AUTH_THROTTLED
        digest = hmac.new(self._cache_key, password.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()
        cached = self._auth_cache.get(login)
        if cached is not None and cached[2] > now and hmac.compare_digest(cached[0], digest):
            return Sender(cached[1].user_id, cached[1].tenant_id, cached[1].tenant, login, mechanism)
        generation = self._generation
        key = throttle_key(client_ip)
        found = await self.astore.call(self.astore.store.user_for_login, login)
        stored_hash = found[1] if found is not None else crypto.dummy_hash()
        ok = await self._verify(login, digest, password, stored_hash, key)
        user = found[0] if found is not None else None
        if user is None or not ok:
            detail = "unknown login" if user is None else "bad password"
        elif not user.enabled:
            detail = "disabled"
        elif user.role not in SEND_ROLES:
            detail = f"a {user.role} may not send"
        elif await self.astore.call(self.astore.store.otp_enrolled, user.id):
            # the password of a person who signs in with TOTP is no SMTP credential
            detail = "TOTP enrolled: the password alone is refused; use an API key as the SMTP password"
        else:
            sender = Sender(user.id, user.tenant_id, user.tenant, login, mechanism)
            if generation == self._generation:
                self._auth_cache[login] = (digest, sender, now + self.config.smtp.auth_cache_ttl)
            return sender
        return self._auth_failed(login, client_ip, mechanism, now, user.tenant_id if user else None, detail)

    async def check_password(self, login: str, password: str, client_ip: str) -> tuple[User | None, bool]:
        """For a login a second factor follows (POST /v1/sessions): the user LOGIN names (None when
        unknown) and whether PASSWORD is theirs. Always one scrypt computation, against a dummy
        hash for an unknown login, and never the cache, so every answer costs the same; it
        counts against the address's throttle while it runs. The caller counts and logs the outcome."""
        await self.directory.current()
        digest = hmac.new(self._cache_key, password.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()
        found = await self.astore.call(self.astore.store.user_for_login, login)
        stored_hash = found[1] if found is not None else crypto.dummy_hash()
        ok = await self._verify(login, digest, password, stored_hash, throttle_key(client_ip))
        return (found[0], ok) if found is not None else (None, False)

    async def _verify(self, login: str, digest: bytes, password: str, stored_hash: str, ip_key: str) -> bool:
        """scrypt off the loop, at most VERIFY_SLOTS at once (32 MiB each); concurrent checks of
        the same login and password share one computation. While a check runs it counts
        against its address's failure limit, so a burst of guesses cannot overshoot it."""
        key = (login, digest)
        task = self._verifying.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._verify_once(password, stored_hash))
            self._verifying[key] = task
            pending = (ip_key, _login_key(ip_key, login))
            for k in pending:
                self._auth_pending[k] = self._auth_pending.get(k, 0) + 1

            def done(_t: asyncio.Task[bool]) -> None:
                self._verifying.pop(key, None)
                for k in pending:
                    left = self._auth_pending.pop(k, 1) - 1
                    if left:
                        self._auth_pending[k] = left

            task.add_done_callback(done)
        return await asyncio.shield(task)

    async def _verify_once(self, password: str, stored_hash: str) -> bool:
        async with self._verify_slots:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, crypto.verify_password, password, stored_hash)

    def ip_sender(self, client_ip: str) -> Sender | None:
        """The sender an IP credential names for CLIENT_IP (most specific network wins)."""
        try:
            ip = ipaddress.ip_address(client_ip)
        except ValueError:
            return None
        best: tuple[int, Sender] | None = None
        for net, sender in self.directory.snapshot.ipcreds:
            if ip.version == net.version and ip in net and (best is None or net.prefixlen > best[0]):
                best = (net.prefixlen, sender)
        if best is not None:
            self._log_login(LoginRecord(self.clock(), best[1].login, client_ip, "IP", "ok", best[1].tenant_id))
        return None if best is None else best[1]

    # -- the login log and the throttle ----------------------------------------------------

    def log_login(self, record: LoginRecord) -> None:
        """Buffer a login-log row (written in batches, off the loop); for other ways in, like the API."""
        self._log_login(record)

    def note_auth_failure(self, client_ip: str, login: str | None = None) -> None:
        """Count a failed login against CLIENT_IP's throttle and, when one was named, against that
        LOGIN from CLIENT_IP (a bad API token names none: it counts against the address only)."""
        now = self.clock()
        key = throttle_key(client_ip)
        self._auth_failures.add(key, now)
        if login is not None:
            self._auth_failures.add(_login_key(key, login), now)

    def _log_login(self, record: LoginRecord) -> None:
        if record.tenant_id is None and self._purged_logins and self._login_digest(record.login) in self._purged_logins:
            record = dataclasses.replace(record, login=PURGED_LOGIN)
        self._pending_logins.append(record)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_logs())

    async def _flush_logs(self) -> None:
        """Write buffered login-log rows, many in one store transaction (or, when the store cannot
        take them, one spool transaction into the outbox: never dropped)."""
        while self._pending_logins:
            logins, self._pending_logins = self._pending_logins, []
            await self.audit.logins(logins)
