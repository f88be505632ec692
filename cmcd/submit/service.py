"""The rules for a message coming in, for every way in: who may send as what, limits, header fixes, hand-off.

Decisions come back as typed refusals (cmcd/submit/refusals.py: a reason, an SMTP code, an
enhanced status code and a text) or None for "go on", and a message taken as Accepted(queue_id);
the protocol layers (smtp/, api/) render them and never read their text. Never speaks a protocol itself.
Logins (who is sending) are cmcd/submit/auth.py's: the service holds an Authenticator as .auth.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import format_datetime
from zoneinfo import ZoneInfo

from cmcd import policy
from cmcd.config import Config, SendingLimits
from cmcd.doors import DataBudget
from cmcd.errors import SpoolError
from cmcd.queue import quota
from cmcd.queue.audit import AuditLog
from cmcd.queue.ids import QueueIdGenerator
from cmcd.queue.requests import ApiRequest
from cmcd.queue.spool import DayClock, Spool
from cmcd.records import Recipient, Sender, SpoolMessage
from cmcd.stats import IntakeStats
from cmcd.store import AsyncStore
from cmcd.submit import headers
from cmcd.submit import refusals as refuse
from cmcd.submit.auth import Authenticator
from cmcd.submit.refusals import Accepted, counted, counted_async
from cmcd.submit.signing import DkimSigner
from cmcd.tenancy.directory import Directory, Snapshot
from cmcd.tenancy.refusals import Refusal
from cmcd.tenancy.rules import address_refusal
from cmcd.tenancy.suppressions import Suppressions

log = logging.getLogger("cmcd.submit")

_HELO_BAD_CHARS = re.compile(r"[\x00-\x20\x7f]")

#: The DKIM hook: given the final message bytes and the From: domain, return signed bytes.
Signer = Callable[[bytes, str], bytes]


@dataclass(frozen=True)
class SessionInfo:
    """What the Received: header says about the session; never holds a password."""

    client_ip: str
    helo: str
    tls_version: str | None
    tls_cipher: str | None
    protocol: str = ""  # set by ways in other than SMTP ("HTTPS")


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
        #: tenants being purged (tenant.delete --purge): nothing of theirs is taken from close_tenant() on
        self._closing: set[int] = set()
        self._rates = policy.TokenBucket()
        self._daily: dict[tuple[int, str], int] = {}
        self.accepted = 0
        self.loops_refused = 0  # messages refused at intake for too many Received: fields (554 5.4.6)
        self.stats = IntakeStats()  # read by /metrics
        #: logins: SMTP AUTH, IP credentials, the password check and throttle the API uses, the login log
        self.auth = Authenticator(
            lambda: self.config, astore, self.directory, self.audit, self.stats, clock, self._closing.__contains__
        )
        #: message bytes in memory from SMTP DATA and API bodies together (smtp.max_data_in_flight)
        self.data_budget = DataBudget(config.smtp.max_data_in_flight)

    # -- set-up and caches -----------------------------------------------------------------

    async def start(self) -> None:
        await self.auth.start()
        if self._own_directory:
            await self.directory.start()
        else:
            self._directory_reloaded(self.directory.snapshot)
        day = self._days.day(self.clock())
        counts = await quota.daily_counts(self.spool, self.astore, day)  # the store's, and any not shipped yet
        self._daily = {(tenant_id, day): n for tenant_id, n in counts.items()}

    def _directory_reloaded(self, snap: Snapshot) -> None:
        """A new directory cut: no cached login outlives it, and the signer's keys come from it."""
        self.auth.forget_cached()  # first: nothing below may leave an old password usable
        self.dkim.load(list(snap.dkim_keys))

    @property
    def suppressions(self) -> Suppressions:
        return self.directory.suppressions

    @property
    def dsn_off(self) -> frozenset[int]:
        """Tenants that asked for no bounces."""
        return self.directory.snapshot.dsn_off

    # -- tenant purge ----------------------------------------------------------------------

    def close_tenant(self, tenant_id: int, logins: tuple[str, ...]) -> None:
        """The first step of a tenant purge: from this call on, nothing of TENANT_ID is accepted
        (AUTH, MAIL, RCPT, end of data, API sends refused with refusals.TENANT_CLOSING).

        Synchronous on purpose: every hand-off to the spool checks the flag with no await between
        the check and the spool's FIFO queue, so once this returns, every commit of the tenant
        still to land is already queued ahead of whatever the caller queues next (the purge).
        Failed logins with one of LOGINS are logged from now on without the name."""
        self._closing.add(tenant_id)
        self.auth.forget_tenant(tenant_id, logins)

    def reopen_tenant(self, tenant_id: int) -> None:
        """The purge is over and the caches were re-read without the tenant: its number may be
        given to a new tenant (SQLite reuses the highest id), which must not inherit the block."""
        self._closing.discard(tenant_id)

    def tenant_closing(self, sender: Sender) -> bool:
        return sender.tenant_id in self._closing

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
        await self.auth.close()

    # -- logins (the SMTP door's two calls; the rest is .auth's) ---------------------------

    async def authenticate(
        self, login: str, password: str, client_ip: str, mechanism: str, *, log_ok: bool = True
    ) -> Sender | Refusal:
        """SMTP AUTH: Authenticator.authenticate."""
        return await self.auth.authenticate(login, password, client_ip, mechanism, log_ok=log_ok)

    def ip_sender(self, client_ip: str) -> Sender | None:
        """The sender an IP credential names for CLIENT_IP: Authenticator.ip_sender."""
        return self.auth.ip_sender(client_ip)

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
