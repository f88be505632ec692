"""Logins, for every way in: SMTP AUTH (a user's password, or an API key as the password), IP
credentials, the password check behind the API's session login, the failed-login throttle that
every door counts against, the cache of recent logins and the login log (written in batches).

Answers are a Sender or a typed refusal (cmcd/submit/refusals.py). Never decides anything about
a message (cmcd/submit/service.py does), never changes a credential, never speaks a protocol.

The throttle counts failures in the store (cmcd/store/throttle_store.py), so the host's worker
processes hold smtp.auth_fail_limit and auth_fail_limit_per_address together, exactly, whichever
worker the kernel hands a connection: a password check claims its failure before scrypt runs (in
the store's transaction that found the limits not reached) and gives it back when the password
was right. While the store cannot be written, each process counts alone (logged), against its
share of each limit (the limit divided by server.workers, at least 1), so the host never allows
more than the limit even then.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import ipaddress
import logging
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

from cmcd import crypto, policy
from cmcd.config import Config
from cmcd.errors import StoreError
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


#: what the index of a limit of Authenticator._limits names, in the login log and the warning
_LIMIT_NAMES = ("address", "login")
#: a login whose check could make the limit with the checks already under way waits for them
#: (each a scrypt, milliseconds) at most this long, asking the store every CLAIM_POLL_S
CLAIM_WAIT_S = 5.0
CLAIM_POLL_S = 0.02


def throttle_key(client_ip: str) -> str:
    """What auth throttling counts against: policy.client_group, as the connection caps (the
    address, or its /64 for IPv6)."""
    return policy.client_group(client_ip)


def _address_key(client_ip: str) -> str:
    """The throttle's key for every login from one address."""
    return f"address {throttle_key(client_ip)}"


def _login_key(client_ip: str, login: str) -> str:
    """The throttle's key for one login from one address (logins compare case-insensitively)."""
    return f"login {throttle_key(client_ip)} {login.lower()}"


@dataclass
class Claim:
    """The failure a login check holds while it runs (Authenticator.claim): rows in the store, or,
    while the store cannot be written, this process's own count (LOCAL). Settled once: given back
    when the login succeeds (release), kept as its failure otherwise (fail)."""

    keys: tuple[str, ...]
    rows: tuple[int, ...] = ()
    local: bool = False
    #: the limit this failure reaches if the check fails ("address", "login"), for the warning
    reaches: str | None = None
    settled: bool = False


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
        self._verify_slots = asyncio.Semaphore(VERIFY_SLOTS)
        self._verifying: dict[tuple[str, bytes], asyncio.Task[bool]] = {}
        #: failures the store could not take, and checks running without a claim in it: this
        #: process's own count, added to the store's (empty while the store can be written)
        self._local_failures = policy.SlidingWindow(config().smtp.auth_fail_window)
        self._local_pending: dict[str, int] = {}
        self._confirming: set[asyncio.Task[None]] = set()  # failures being written to the store
        self._store_failing = False  # the last write of a failure failed (logged once, until one works)
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
        needed), read from the store every time, so a revoked key fails at once. A bad key is
        counted after the lookup (the lookup is one read: there is nothing to claim ahead of)."""
        await self.directory.current()
        now = self.clock()
        which = await self.auth_throttle(client_ip, name)
        if which is not None:
            return self._throttled(now, name, client_ip, mechanism, which)
        caller = await self.astore.call(self.astore.store.apikey_caller, token)
        if caller is not None and caller.role in SEND_ROLES:
            return Sender(caller.user_id, caller.tenant_id, caller.tenant, caller.login, mechanism)
        reaches = await self.note_auth_failure(client_ip, name)
        tenant_id = None if caller is None else caller.tenant_id
        detail = "unknown or revoked key, or user disabled" if caller is None else f"a {caller.role} key may not send"
        return self._auth_failed(name, client_ip, mechanism, now, tenant_id, detail, reaches)

    def _auth_failed(
        self,
        login: str,
        client_ip: str,
        mechanism: str,
        now: float,
        tenant_id: int | None,
        detail: str,
        reaches: str | None,
    ) -> Refusal:
        """Log a failed AUTH (already counted; REACHES: the limit it reached); the one reply every failure gets."""
        self._log_login(LoginRecord(now, login, client_ip, mechanism, "fail", tenant_id, detail))
        if reaches is not None:
            log.warning("event=auth_throttled client_ip=%s limit=%s", client_ip, reaches)
        return refuse.AUTH_INVALID

    def _throttled(self, now: float, login: str, client_ip: str, mechanism: str, which: str) -> Refusal:
        """Log a login the throttle held back (WHICH limit); its reply."""
        smtp = self.config.smtp
        limit = smtp.auth_fail_limit_per_address if which == "address" else smtp.auth_fail_limit
        what = "address limit" if which == "address" else "address+login limit"
        detail = f"{what}: {limit} failures in {smtp.auth_fail_window:g} s"
        self._log_login(LoginRecord(now, login, client_ip, mechanism, "throttled", None, detail))
        return refuse.AUTH_THROTTLED

    async def _authenticate_once(self, login: str, password: str, client_ip: str, mechanism: str) -> Sender | Refusal:
        await self.directory.current()
        now = self.clock()
        digest = hmac.new(self._cache_key, password.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()
        cached = self._auth_cache.get(login)
        if cached is not None and cached[2] > now and hmac.compare_digest(cached[0], digest):
            # no check runs, nothing to claim; but a throttled address is held back even so
            which = await self.auth_throttle(client_ip, login)
            if which is not None:
                return self._throttled(now, login, client_ip, mechanism, which)
            return Sender(cached[1].user_id, cached[1].tenant_id, cached[1].tenant, login, mechanism)
        claim = await self.claim(client_ip, login)
        if isinstance(claim, str):
            return self._throttled(now, login, client_ip, mechanism, claim)
        try:
            generation = self._generation
            found = await self.astore.call(self.astore.store.user_for_login, login)
            stored_hash = found[1] if found is not None else crypto.dummy_hash()
            ok = await self._verify(login, digest, password, stored_hash)
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
                await self.release(claim)
                sender = Sender(user.id, user.tenant_id, user.tenant, login, mechanism)
                if generation == self._generation:
                    self._auth_cache[login] = (digest, sender, now + self.config.smtp.auth_cache_ttl)
                return sender
            self.fail(claim)
            return self._auth_failed(
                login, client_ip, mechanism, now, user.tenant_id if user else None, detail, claim.reaches
            )
        finally:
            self.fail(claim)  # a check cut short (an error, the client gone) counts as a failure

    async def check_password(self, login: str, password: str) -> tuple[User | None, bool]:
        """For a login a second factor follows (POST /v1/sessions): the user LOGIN names (None when
        unknown) and whether PASSWORD is theirs. Always one scrypt computation, against a dummy
        hash for an unknown login, and never the cache, so every answer costs the same. The caller
        claims the failure first (claim) and settles it, counts and logs the outcome."""
        await self.directory.current()
        digest = hmac.new(self._cache_key, password.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()
        found = await self.astore.call(self.astore.store.user_for_login, login)
        stored_hash = found[1] if found is not None else crypto.dummy_hash()
        ok = await self._verify(login, digest, password, stored_hash)
        return (found[0], ok) if found is not None else (None, False)

    async def _verify(self, login: str, digest: bytes, password: str, stored_hash: str) -> bool:
        """scrypt off the loop, at most VERIFY_SLOTS at once (32 MiB each); concurrent checks of
        the same login and password share one computation (each caller claimed its own failure)."""
        key = (login, digest)
        task = self._verifying.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._verify_once(password, stored_hash))
            self._verifying[key] = task
            task.add_done_callback(lambda _t: self._verifying.pop(key, None))
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

    # -- the throttle ----------------------------------------------------------------------

    def _limits(self, client_ip: str, login: str | None) -> list[tuple[str, int]]:
        """The keys a login counts against, with their limits, in _LIMIT_NAMES order."""
        smtp = self.config.smtp
        limits = [(_address_key(client_ip), smtp.auth_fail_limit_per_address)]
        if login is not None:
            limits.append((_login_key(client_ip, login), smtp.auth_fail_limit))
        return limits

    def _shares(self, limits: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """LIMITS as one process holds them alone (the store cannot be written): its share."""
        workers = max(1, self.config.server.workers)
        return [(k, max(1, limit // workers) if limit > 0 else limit) for k, limit in limits]

    @staticmethod
    def _held(limits: list[tuple[str, int]], counts: list[int]) -> str | None:
        """The name of the first of LIMITS that COUNTS reach (a limit of 0 is none), or None."""
        for i, ((_, limit), n) in enumerate(zip(limits, counts, strict=True)):
            if 0 < limit <= n:
                return _LIMIT_NAMES[i]
        return None

    def _local(self, keys: list[str], now: float) -> list[int]:
        """This process's own count of each of KEYS: failures the store did not take, and checks
        running without a claim in it (all 0 while the store can be written)."""
        self._local_failures.window_s = self.config.smtp.auth_fail_window
        return [self._local_failures.count(k, now) + self._local_pending.get(k, 0) for k in keys]

    def _store_failed(self, exc: Exception) -> None:
        if not self._store_failing:
            self._store_failing = True
            log.warning(
                "event=auth_throttle_store_failed error=%r counting=process share=1/%d",
                str(exc),
                max(1, self.config.server.workers),
            )

    def _store_works(self) -> None:
        if self._store_failing:
            self._store_failing = False
            log.info("event=auth_throttle_store_ok counting=store")

    async def auth_throttle(self, client_ip: str, login: str | None = None) -> str | None:
        """Which limit holds logins back: "login" once LOGIN has used up smtp.auth_fail_limit
        failures from this address (an IPv6 /64), "address" once the address has used up the much
        higher smtp.auth_fail_limit_per_address over all logins; else None. Counts every worker's
        failures and claims (one read of the store). So one tenant's bad client behind a shared
        NAT locks out its own login, not the others'."""
        if self.config.smtp.auth_fail_limit <= 0:  # 0: no throttling at all
            return None
        now = self.clock()
        limits = self._limits(client_ip, login)
        keys = [k for k, _ in limits]
        local = self._local(keys, now)
        window = self.config.smtp.auth_fail_window
        try:
            stored = await self.astore.call(self.astore.store.failure_counts, keys, window, now)
        except (sqlite3.Error, StoreError) as exc:
            self._store_failed(exc)
            return self._held(self._shares(limits), local)
        return self._held(limits, [a + b for a, b in zip(stored, local, strict=True)])

    async def auth_throttled(self, client_ip: str, login: str | None = None) -> bool:
        return await self.auth_throttle(client_ip, login) is not None

    async def claim(self, client_ip: str, login: str | None) -> Claim | str:
        """Before checking a login from CLIENT_IP: the limit that holds it back ("address",
        "login"), or a Claim: the failure counted now, in the store, in the transaction that found
        no limit reached, so checks running at once in every worker count each other and none
        runs past a limit. Settle it: release() when the login succeeds, fail() otherwise."""
        if self.config.smtp.auth_fail_limit <= 0:
            return Claim((), settled=True)
        now = self.clock()
        limits = self._limits(client_ip, login)
        keys = [k for k, _ in limits]
        local = self._local(keys, now)
        which = self._held(limits, local)
        if which is not None:
            return which
        window = self.config.smtp.auth_fail_window
        left = [(k, limit - n if limit > 0 else limit) for (k, limit), n in zip(limits, local, strict=True)]
        try:
            waited = 0.0
            while True:  # checks under way that could reach a limit: wait for them to settle
                got = await self.astore.call(self.astore.store.failure_claim, left, window, now, pending=True)
                if got.busy is None:
                    break
                if waited >= CLAIM_WAIT_S:  # they did not settle in time: held as if they had failed
                    return _LIMIT_NAMES[got.busy]
                await asyncio.sleep(CLAIM_POLL_S)  # polling the store: the other checks are in other processes
                waited += CLAIM_POLL_S
        except (sqlite3.Error, StoreError) as exc:
            self._store_failed(exc)
            shares = self._shares(limits)
            which = self._held(shares, local)
            if which is not None:
                return which
            for k in keys:
                self._local_pending[k] = self._local_pending.get(k, 0) + 1
            return Claim(tuple(keys), local=True, reaches=self._held(shares, [n + 1 for n in local]))
        self._store_works()
        if got.held is not None:
            return _LIMIT_NAMES[got.held]
        counts = [a + b for a, b in zip(got.counts, local, strict=True)]
        return Claim(tuple(keys), got.rows, reaches=self._held(limits, counts))

    def fail(self, claim: Claim) -> None:
        """The check CLAIM was made for failed (or was cut short): its failure stays counted."""
        if claim.settled:
            return
        claim.settled = True
        if claim.local:
            now = self.clock()
            self._local_failures.window_s = self.config.smtp.auth_fail_window
            for k in claim.keys:
                self._unpend(k)
                self._local_failures.add(k, now)
        elif claim.rows:  # the claim was a check under way: it is a failure now
            task = asyncio.get_running_loop().create_task(self._confirm(claim.rows))
            self._confirming.add(task)
            task.add_done_callback(self._confirming.discard)

    async def _confirm(self, rows: tuple[int, ...]) -> None:
        try:
            await self.astore.call(self.astore.store.failure_confirm, rows)
        except (sqlite3.Error, StoreError) as exc:  # pending rows still hold back checks until they age out
            log.warning("event=auth_throttle_confirm_failed error=%r", str(exc))

    async def release(self, claim: Claim) -> None:
        """The check CLAIM was made for succeeded: its failure is given back."""
        if claim.settled:
            return
        claim.settled = True
        if claim.local:
            for k in claim.keys:
                self._unpend(k)
            return
        try:
            await self.astore.call(self.astore.store.failure_release, claim.rows)
        except (sqlite3.Error, StoreError) as exc:  # the rows count as a failure until they age out
            log.warning("event=auth_throttle_release_failed error=%r", str(exc))

    def _unpend(self, key: str) -> None:
        left = self._local_pending.pop(key, 1) - 1
        if left:
            self._local_pending[key] = left

    async def count_failure(self, client_ip: str, login: str | None = None) -> str | None:
        """A failed login found after the fact (a bad API bearer token): counted against
        CLIENT_IP's throttle and LOGIN's from it unless a limit is reached already. The limit
        that held it back, or None when it was counted."""
        claim = await self.claim(client_ip, login)
        if isinstance(claim, str):
            return claim
        self.fail(claim)
        return None

    async def note_auth_failure(self, client_ip: str, login: str | None = None) -> str | None:
        """Count a failed login against CLIENT_IP's throttle and, when one was named, against that
        LOGIN from CLIENT_IP, whatever the counts (the check was made: it failed). The limit it
        reaches, or None."""
        if self.config.smtp.auth_fail_limit <= 0:
            return None
        now = self.clock()
        limits = self._limits(client_ip, login)
        keys = [k for k, _ in limits]
        window = self.config.smtp.auth_fail_window
        try:
            stored = await self.astore.call(self.astore.store.failure_add, keys, window, now)
        except (sqlite3.Error, StoreError) as exc:
            self._store_failed(exc)
            self._local_failures.window_s = window
            for k in keys:
                self._local_failures.add(k, now)
            return self._held(self._shares(limits), self._local(keys, now))
        self._store_works()
        return self._held(limits, [a + b for a, b in zip(stored, self._local(keys, now), strict=True)])

    # -- the login log ---------------------------------------------------------------------

    def log_login(self, record: LoginRecord) -> None:
        """Buffer a login-log row (written in batches, off the loop); for other ways in, like the API."""
        self._log_login(record)

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
