"""The rules for a message coming in, for every way in: who may send as what, limits, header fixes, hand-off.

Decisions come back as typed refusals (cmcd/submit/refusals.py: a reason, an SMTP code, an
enhanced status code and a text) or None for "go on", and a message taken as Accepted(queue_id);
the protocol layers (smtp/, api/) render them and never read their text. Never speaks a protocol itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import format_datetime
from zoneinfo import ZoneInfo

from cmcd import crypto, policy
from cmcd.config import Config, SendingLimits
from cmcd.doors import DataBudget
from cmcd.errors import SpoolError
from cmcd.queue import quota
from cmcd.queue.audit import AuditLog
from cmcd.queue.ids import QueueIdGenerator
from cmcd.queue.requests import ApiRequest
from cmcd.queue.spool import DayClock, Spool
from cmcd.records import Recipient, Sender, SpoolMessage, User
from cmcd.stats import IntakeStats
from cmcd.store import AsyncStore, LoginRecord
from cmcd.store.api_store import split_api_key
from cmcd.submit import headers
from cmcd.submit import refusals as refuse
from cmcd.submit.refusals import Accepted, counted, counted_async
from cmcd.submit.signing import DkimSigner
from cmcd.tenancy.directory import Directory, Snapshot
from cmcd.tenancy.refusals import Reason, Refusal
from cmcd.tenancy.rules import SEND_ROLES, address_refusal
from cmcd.tenancy.suppressions import Suppressions

log = logging.getLogger("cmcd.submit")

_HELO_BAD_CHARS = re.compile(r"[\x00-\x20\x7f]")

#: The DKIM hook: given the final message bytes and the From: domain, return signed bytes.
Signer = Callable[[bytes, str], bytes]

VERIFY_SLOTS = 2  # concurrent scrypt verifications (bounds memory at 64 MiB and leaves a core free)
#: the SMTP AUTH user name that says "the password is an API key" (the key's id works too)
APIKEY_LOGIN = "apikey"
#: the login-log name of a failed login that used a purged tenant's login name (the name is erased)
PURGED_LOGIN = "(login of a purged tenant)"


@dataclass(frozen=True)
class SessionInfo:
    """What the Received: header says about the session; never holds a password."""

    client_ip: str
    helo: str
    tls_version: str | None
    tls_cipher: str | None
    protocol: str = ""  # set by ways in other than SMTP ("HTTPS")


def _login_key(address_key: str, login: str) -> str:
    """The throttle's key for one login from one address (logins compare case-insensitively)."""
    return f"{address_key} {login.lower()}"


def throttle_key(client_ip: str) -> str:
    """What auth throttling counts against: policy.client_group, as the connection caps (the
    address, or its /64 for IPv6)."""
    return policy.client_group(client_ip)


class SubmitService:
    def __init__(
        self,
        config: Config,
        astore: AsyncStore,
        spool: Spool,
        clock: Callable[[], float] = time.time,
        *,
        audit: AuditLog | None = None,
        directory: Directory | None = None,
    ):
        self.config = config
        self.astore = astore
        self.spool = spool
        self.clock = clock
        #: login (and operation) rows: to the store, or to the spool's outbox when it cannot take them
        self.audit = audit if audit is not None else AuditLog(spool, astore)
        self.ids = QueueIdGenerator()
        self.tz = ZoneInfo(config.server.timezone)
        self._days = DayClock(self.tz)
        self._tenant_limits: dict[str, SendingLimits] = {}
        self._stamp_s = -1
        self._stamp = ""
        self.dkim = DkimSigner(config.dkim, clock)
        self.signer: Signer | None = self.dkim
        #: tenants, domains, IP credentials, keys, settings, suppressions: kept current by tenancy
        self._own_directory = directory is None
        self.directory = directory if directory is not None else Directory(astore, poll_s=0)
        self.directory.on_reload(self._directory_reloaded)
        self._cache_key = os.urandom(32)
        self._auth_cache: dict[str, tuple[bytes, Sender, float]] = {}
        #: tenants being purged (tenant.delete --purge): nothing of theirs is taken from close_tenant() on
        self._closing: set[int] = set()
        #: keyed digests of purged tenants' login names: a later failed login logs none of them
        self._purged_logins: set[bytes] = set()
        self._auth_pending: dict[str, int] = {}
        self._verify_slots = asyncio.Semaphore(VERIFY_SLOTS)
        self._verifying: dict[tuple[str, bytes], asyncio.Task[bool]] = {}
        self._auth_failures = policy.SlidingWindow(config.smtp.auth_fail_window)
        self._rates = policy.TokenBucket()
        self._daily: dict[tuple[int, str], int] = {}
        self._pending_logins: list[LoginRecord] = []
        self._flush_task: asyncio.Task[None] | None = None
        self.accepted = 0
        self.loops_refused = 0  # messages refused at intake for too many Received: fields (554 5.4.6)
        self.stats = IntakeStats()  # read by /metrics
        #: message bytes in memory from SMTP DATA and API bodies together (smtp.max_data_in_flight)
        self.data_budget = DataBudget(config.smtp.max_data_in_flight)

    # -- set-up and caches -----------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(crypto.dummy_hash)  # computed once, off the loop, before any AUTH
        if self._own_directory:
            await self.directory.start()
        else:
            self._directory_reloaded(self.directory.snapshot)
        day = self._days.day(self.clock())
        counts = await quota.daily_counts(self.spool, self.astore, day)  # the store's, and any not shipped yet
        self._daily = {(tenant_id, day): n for tenant_id, n in counts.items()}

    def _directory_reloaded(self, snap: Snapshot) -> None:
        """A new directory cut: the signer's keys from it, and no cached login outlives it."""
        self.dkim.load(list(snap.dkim_keys))
        self._auth_cache.clear()

    @property
    def suppressions(self) -> Suppressions:
        return self.directory.suppressions

    @property
    def dsn_off(self) -> frozenset[int]:
        """Tenants that asked for no bounces."""
        return self.directory.snapshot.dsn_off

    @property
    def _generation(self) -> int:
        return self.directory.generation

    # -- tenant purge ----------------------------------------------------------------------

    def close_tenant(self, tenant_id: int, logins: tuple[str, ...]) -> None:
        """The first step of a tenant purge: from this call on, nothing of TENANT_ID is accepted
        (AUTH, MAIL, RCPT, end of data, API sends refused with refusals.TENANT_CLOSING).

        Synchronous on purpose: every hand-off to the spool checks the flag with no await between
        the check and the spool's FIFO queue, so once this returns, every commit of the tenant
        still to land is already queued ahead of whatever the caller queues next (the purge).
        Failed logins with one of LOGINS are logged from now on without the name."""
        self._closing.add(tenant_id)
        self._purged_logins.update(self._login_digest(login) for login in logins)
        self._auth_cache = {k: v for k, v in self._auth_cache.items() if v[1].tenant_id != tenant_id}

    def reopen_tenant(self, tenant_id: int) -> None:
        """The purge is over and the caches were re-read without the tenant: its number may be
        given to a new tenant (SQLite reuses the highest id), which must not inherit the block."""
        self._closing.discard(tenant_id)

    def tenant_closing(self, sender: Sender) -> bool:
        return sender.tenant_id in self._closing

    def _login_digest(self, login: str) -> bytes:
        return hmac.new(self._cache_key, b"login\0" + login.encode("utf-8", "surrogateescape"), "sha256").digest()

    @property
    def reloading(self) -> bool:
        """True while the directory is being read in (then await current())."""
        return self.directory.reloading

    async def current(self) -> None:
        """Wait for a directory refresh under way, so no decision uses what it replaces."""
        await self.directory.current()

    async def close(self) -> None:
        if self._own_directory:
            await self.directory.close()
        await self._flush_logs()

    # -- authentication --------------------------------------------------------------------

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
        if isinstance(result, Sender) and result.tenant_id in self._closing:
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
        await self.current()
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
        await self.current()
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
        await self.current()
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

    # -- envelope --------------------------------------------------------------------------

    def owns_domain(self, sender: Sender, domain: str) -> bool:
        return domain.lower().rstrip(".") in self.directory.snapshot.tenant_domains.get(sender.tenant_id, frozenset())

    @counted
    def check_mail(self, sender: Sender, address: str, smtputf8: bool, size: int = 0) -> Refusal | None:
        refusal = self.check_sender(sender, address, smtputf8, size)
        if refusal is not None:
            return refusal
        now = self.clock()
        limits = self._limits(sender.tenant)
        if policy.over_daily_quota(
            self._daily.get((sender.tenant_id, self._days.day(now)), 0), limits.messages_per_day
        ):
            return refuse.daily_quota(limits.messages_per_day)
        if not self._rates.take(sender.tenant_id, limits.messages_per_second, now):
            return refuse.rate_limit(limits.messages_per_second)
        return None

    def check_sender(self, sender: Sender, address: str, smtputf8: bool, size: int = 0) -> Refusal | None:
        """MAIL's checks without the quota and rate (an API request is counted as a whole: check_batch)."""
        if sender.tenant_id in self._closing:
            return refuse.TENANT_CLOSING
        if not address:
            return refuse.NULL_SENDER
        min_free = self.config.spool.min_free
        if min_free and self.spool.free_bytes() < min_free + size:
            return refuse.SPOOL_LOW
        refusal = address_refusal(address, smtputf8=smtputf8)
        if refusal is not None:
            return refusal
        if not self.owns_domain(sender, address.rpartition("@")[2]):
            return refuse.SENDER_DOMAIN
        return None

    @counted
    def check_rcpt(self, sender: Sender, address: str, accepted_so_far: int, smtputf8: bool) -> Refusal | None:
        if sender.tenant_id in self._closing:
            return refuse.TENANT_CLOSING
        if accepted_so_far >= self.config.smtp.max_recipients:
            return refuse.too_many_recipients(self.config.smtp.max_recipients)
        refusal = address_refusal(address, smtputf8=smtputf8)
        if refusal is None and address.endswith("]"):
            # an address literal names a host, not a mail domain: no transactional mail needs one,
            # and delivering to whatever IP a tenant writes would let it aim cmcd at any host
            return refuse.ADDRESS_LITERAL
        if refusal is None and sender.tenant_id in self.directory.snapshot.refuse_suppressed:
            if self.suppressions.contains(sender.tenant_id, address):
                return refuse.SUPPRESSED
        return refusal

    # -- end of data -----------------------------------------------------------------------

    @counted_async
    async def finish(
        self, sender: Sender, mail_from: str, rcpts: list[str], body: bytes, info: SessionInfo
    ) -> Accepted | Refusal:
        """Check the header, fix it, sign, spool: Accepted once the message is on stable storage."""
        prepared = await self.prepare(sender, mail_from, rcpts, body, info)
        if isinstance(prepared, Refusal):
            return prepared
        now = prepared.received_ts
        day = self._days.day(now)
        key = (sender.tenant_id, day)
        quota = self._limits(sender.tenant).messages_per_day
        if policy.over_daily_quota(self._daily.get(key, 0), quota):  # concurrent sessions passed MAIL together
            return refuse.daily_quota(quota)
        if self._gone(sender):  # no await from here to the spool's queue (close_tenant)
            return refuse.TENANT_CLOSING
        self._reserve(key, 1)  # given back if the commit fails
        try:
            await self.spool.commit(prepared, day)
        except SpoolError:
            self._daily[key] = self._daily.get(key, 1) - 1
            return refuse.SPOOL_FAILED
        self.accepted += 1
        self.stats.accept(sender.tenant)
        return Accepted(prepared.queue_id)

    async def prepare(
        self,
        sender: Sender,
        mail_from: str,
        rcpts: list[str],
        body: bytes,
        info: SessionInfo,
        tags: tuple[str, ...] = (),
    ) -> SpoolMessage | Refusal:
        """The message as it will be spooled (sender domain and From: checked, Received:,
        Message-ID and Date added, DKIM-signed off the loop), or the refusal."""
        if mail_from and not self.owns_domain(sender, mail_from.rpartition("@")[2]):
            return refuse.SENDER_DOMAIN
        hdr = headers.parse(body)
        if hdr.received >= self.config.smtp.max_hops:  # with ours it would pass the limit: a mail loop
            self.loops_refused += 1
            log.warning("event=mail_loop check=hops tenant=%s hops=%d", sender.tenant, hdr.received)
            return refuse.mail_loop(hdr.received)
        domains = headers.from_domains(hdr)
        if not domains:
            return refuse.NO_FROM
        for d in domains:
            if not d or not self.owns_domain(sender, d):
                return refuse.FROM_DOMAIN
        now = self.clock()
        qid = self.ids.next(now)
        body = headers.insert(body, hdr, self._received(qid, sender, info, now), self._missing(hdr, qid, now))
        if self.signer is not None and (self.signer is not self.dkim or self.dkim.keys_for(domains[0])):
            loop = asyncio.get_running_loop()  # RSA is ~1 ms of CPU: never on the event loop
            body = await loop.run_in_executor(None, self.signer, body, domains[0])
        return SpoolMessage(
            queue_id=qid,
            tenant_id=sender.tenant_id,
            user_id=sender.user_id,
            sender=mail_from,
            recipients=tuple(Recipient(r, r.rpartition("@")[2].lower()) for r in rcpts),
            body=body,
            received_ts=now,
            message_id=hdr.message_id or f"<{qid}@{self.config.server.hostname}>",
            tags=tags,
        )

    def _gone(self, sender: Sender) -> bool:
        """The sender's tenant is being purged, or was (no longer in the caches) while its message
        was being prepared."""
        return sender.tenant_id in self._closing or sender.tenant_id not in self.directory.snapshot.tenant_domains

    def _reserve(self, key: tuple[int, str], n: int) -> None:
        if key not in self._daily:  # a new day (or tenant): forget the counts of past days
            self._daily = {k: c for k, c in self._daily.items() if k[1] == key[1]}
        self._daily[key] = self._daily.get(key, 0) + n

    def check_batch(self, sender: Sender, n: int) -> Refusal | None:
        """Before an API request queues N messages: the daily quota must leave room for all N, and
        the per-second rate admits the request if a token is there and charges all N (the bucket
        may go negative, so the average rate holds). The refusal, if refused."""
        now = self.clock()
        limits = self._limits(sender.tenant)
        day = self._days.day(now)
        if limits.messages_per_day and self._daily.get((sender.tenant_id, day), 0) + n > limits.messages_per_day:
            return refuse.daily_quota(limits.messages_per_day, would_exceed=True)
        if not self._rates.charge(sender.tenant_id, limits.messages_per_second, now, n):
            return refuse.rate_limit(limits.messages_per_second)
        return None

    async def commit_all(
        self, sender: Sender, messages: list[SpoolMessage], request: ApiRequest | None
    ) -> Refusal | None:
        """Spool MESSAGES prepared for one API request in one transaction (with the request's
        Idempotency-Key): None once all are on disk, else the refusal (none was queued)."""
        day = self._days.day(self.clock())
        key = (sender.tenant_id, day)
        quota = self._limits(sender.tenant).messages_per_day
        if quota and self._daily.get(key, 0) + len(messages) > quota:
            return refuse.daily_quota(quota, would_exceed=True)
        if self._gone(sender):  # no await from here to the spool's queue (close_tenant)
            return refuse.TENANT_CLOSING
        self._reserve(key, len(messages))
        forget_before = self.clock() - self.config.api.idempotency_ttl
        try:
            await self.spool.commit_all(messages, day, request, forget_before)
        except SpoolError:  # give the reservation back (the day may have turned meanwhile)
            self._daily[key] = self._daily.get(key, len(messages)) - len(messages)
            return refuse.SPOOL_FAILED
        self.accepted += len(messages)
        for _ in messages:
            self.stats.accept(sender.tenant)
        return None

    def _received(self, qid: str, sender: Sender, info: SessionInfo, now: float) -> bytes:
        protocol = "ESMTPSA" if info.tls_version else "ESMTPA"
        if info.protocol:
            protocol = info.protocol
        elif sender.mechanism == "IP":
            protocol = "ESMTPS" if info.tls_version else "ESMTP"
        tls = f"\r\n\t(using {info.tls_version} with cipher {info.tls_cipher})" if info.tls_version else ""
        helo = _HELO_BAD_CHARS.sub("", info.helo)[:255] or "unknown"
        stamp = self._date(now)
        return (
            f"Received: from {helo} ([{info.client_ip}]){tls}\r\n"
            f"\t(authenticated as {sender.login} via {sender.mechanism})\r\n"
            f"\tby {self.config.server.hostname} (cmcd) with {protocol} id {qid};\r\n"
            f"\t{stamp}\r\n"
        ).encode("utf-8", "replace")

    def _missing(self, hdr: headers.HeaderInfo, qid: str, now: float) -> bytes:
        out = b""
        if not hdr.has_message_id:
            out += f"Message-ID: <{qid}@{self.config.server.hostname}>\r\n".encode()
        if not hdr.has_date:
            out += f"Date: {self._date(now)}\r\n".encode()
        return out

    def _limits(self, tenant: str) -> SendingLimits:
        limits = self._tenant_limits.get(tenant)
        if limits is None:
            limits = self._tenant_limits[tenant] = self.config.tenant_limits(tenant)
        return limits

    def _date(self, now: float) -> str:
        """RFC 5322 date of NOW in the server's zone, formatted once per second."""
        second = int(now)
        if second != self._stamp_s:
            self._stamp_s = second
            self._stamp = format_datetime(datetime.datetime.fromtimestamp(second, self.tz))
        return self._stamp

    # -- records ---------------------------------------------------------------------------

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
