"""The rules for a message coming in, for every way in: who may send as what, limits, header fixes, hand-off.

Decisions come back as typed refusals (cmcd/submit/refusals.py: a reason, an SMTP code, an
enhanced status code and a text) or None for "go on", and a message taken as Accepted(queue_id);
the protocol layers (smtp/, api/) render them and never read their text. Never speaks a protocol itself.
Logins (who is sending) are cmcd/submit/auth.py's: the service holds an Authenticator as .auth.
The daily quota is taken from leases on the store's reservations (cmcd/submit/leases.py, which
states what the quota means across worker processes and after a crash): MAIL and an API
request's check only look at what this process knows; end of data (and an API request's commit)
takes the message from the tenant's lease, reserving the next block from the store when it is short.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import format_datetime
from zoneinfo import ZoneInfo

from cmcd import intl, policy, unsubscribe
from cmcd.config import Config, SendingLimits
from cmcd.doors import DataBudget
from cmcd.errors import SpoolError
from cmcd.queue import quota
from cmcd.queue.audit import AuditLog
from cmcd.queue.ids import QueueIdGenerator
from cmcd.queue.requests import ApiRequest
from cmcd.queue.spool import DayClock, Spool
from cmcd.records import STREAMS, Recipient, Sender, SpoolMessage, Stream
from cmcd.stats import IntakeStats
from cmcd.store import AsyncStore
from cmcd.submit import headers
from cmcd.submit import refusals as refuse
from cmcd.submit.auth import Authenticator
from cmcd.submit.leases import Leases, LeaseUnavailable
from cmcd.submit.refusals import Accepted, counted, counted_async
from cmcd.submit.signing import DkimSigner
from cmcd.tenancy.directory import Directory, Snapshot
from cmcd.tenancy.refusals import Refusal
from cmcd.tenancy.rules import address_refusal
from cmcd.tenancy.suppressions import Suppressions

log = logging.getLogger("cmcd.submit")

_STREAM_FIELD = frozenset({"x-cmcd-stream"})
_UNSUBSCRIBE_FIELDS = frozenset({"list-unsubscribe", "list-unsubscribe-post"})

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
    #: the transaction's MAIL asked for SMTPUTF8 (RFC 6531): Received: says UTF8SMTP...; for the API,
    #: the message has UTF-8 in its header (an address with a non-ASCII local part): "HTTPS (UTF8)"
    smtputf8: bool = False


def _alabel_or_empty(domain: str) -> str:
    """A From: domain as A-labels; "" (refused as not the tenant's) when it has no A-label form."""
    try:
        return intl.to_alabel(domain)
    except ValueError:
        return ""


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
        #: how many workers share the host's rates (set by a worker; 1 in a single process)
        self.rate_shares = 1
        #: the spool shard this process owns (its queue ids name it; so do its Idempotency-Key claims)
        self.shard = 0
        self.tz = ZoneInfo(config.server.timezone)
        self._days = DayClock(self.tz)
        self._tenant_limits: dict[str, SendingLimits] = {}
        self._stamp_s = -1
        self._stamp = ""
        self.dkim = DkimSigner(config.dkim, clock)
        self.signer: Signer | None = self.dkim
        self._tokens = unsubscribe.Tokens(astore.store.keys)
        #: tenants, domains, IP credentials, keys, settings, suppressions: kept current by tenancy
        self._own_directory = directory is None
        self.directory = directory if directory is not None else Directory(astore, poll_s=0)
        self.directory.on_reload(self._directory_reloaded)
        #: tenants being purged (tenant.delete --purge): nothing of theirs is taken from close_tenant() on
        self._closing: set[int] = set()
        self._rates = policy.TokenBucket()
        #: the daily quota: this process's leases on the store's reservations (0 = unlimited never asks)
        self.leases = Leases(astore, lambda: self.config.server.workers)
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
        # a tenant's first reservation of the day starts from the store's count: nothing of this spool
        # may be left out of it (a spool of a cmcd before leases counted without reserving)
        await quota.ship(self.spool, self.astore)

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
        self.leases.forget(tenant_id)

    def reopen_tenant(self, tenant_id: int) -> None:
        """The purge is over and the caches were re-read without the tenant: its number may be
        given to a new tenant (SQLite reuses the highest id), which must not inherit the block
        (nor a quota lease)."""
        self._closing.discard(tenant_id)
        self.leases.forget(tenant_id)

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
        await self.leases.close()  # what the leases hold goes back to the store's reservations
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
        """DOMAIN (a U-label name compares as its A-labels) is one of the sender's tenant's domains."""
        if not domain.isascii():
            try:
                domain = intl.to_alabel(domain)
            except ValueError:
                return False
        return domain.lower().rstrip(".") in self.directory.snapshot.tenant_domains.get(sender.tenant_id, frozenset())

    @counted
    def check_mail(self, sender: Sender, address: str, smtputf8: bool, size: int = 0) -> Refusal | None:
        refusal = self.check_sender(sender, address, smtputf8, size)
        if refusal is not None:
            return refusal
        now = self.clock()
        limits = self._limits(sender.tenant)
        quota = limits.messages_per_day
        if quota and self.leases.room(sender.tenant_id, self._days.day(now), quota, now) < 1:
            return refuse.daily_quota(quota)
        if not self._rates.take(sender.tenant_id, limits.messages_per_second, now):
            return refuse.rate_limit(self._host_rate(limits.messages_per_second))
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
        if not smtputf8 and not address.isascii():
            return refuse.NEEDS_SMTPUTF8_MAIL
        refusal = address_refusal(address)
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
        if not smtputf8 and not address.isascii():
            return refuse.NEEDS_SMTPUTF8_RCPT
        refusal = address_refusal(address)
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
        if len(prepared) > 1:  # a broadcast, one message per recipient: one transaction for them all
            # MAIL charged the tenant's rate one message; the other copies are charged now (the bucket
            # may go negative, as an API request's does, so the average rate holds)
            limits = self._limits(sender.tenant)
            self._rates.debit(sender.tenant_id, limits.messages_per_second, self.clock(), len(prepared) - 1)
            refusal = await self.commit_all(sender, prepared, None)
            return refusal if refusal is not None else Accepted(prepared[0].queue_id, len(prepared))
        message = prepared[0]
        now = message.received_ts
        day = self._days.day(now)
        quota = self._limits(sender.tenant).messages_per_day
        refusal = await self._take_quota(sender, day, quota, 1, now)  # given back if not committed
        if refusal is not None:
            return refusal
        try:  # no await from _take_quota's check of close_tenant to the spool's queue
            await self.spool.commit(message, day)
        except SpoolError:
            self._give_back(sender, day, quota, 1)
            return refuse.SPOOL_FAILED
        self.accepted += 1
        self.stats.accept(sender.tenant)
        return Accepted(message.queue_id)

    async def prepare(
        self,
        sender: Sender,
        mail_from: str,
        rcpts: list[str],
        body: bytes,
        info: SessionInfo,
        tags: tuple[str, ...] = (),
        stream: str | None = None,
    ) -> list[SpoolMessage] | Refusal:
        """The message as it will be spooled (sender domain and From: checked, Received:,
        Message-ID and Date added, DKIM-signed off the loop), or the refusal. Its stream is what
        its X-Cmcd-Stream: field says (the field is taken out), else STREAM (the API's field), else
        the user's default. A broadcast gets one-click unsubscribe fields before it is signed, and
        they name one recipient: a broadcast to N recipients is N messages, one each."""
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
        domains = [_alabel_or_empty(d) for d in domains]  # DKIM d= and the tenant's domains are A-labels
        for d in domains:
            if not d or not self.owns_domain(sender, d):
                return refuse.FROM_DOMAIN
        if hdr.stream is not None:
            if hdr.stream not in STREAMS:
                return refuse.bad_stream(hdr.stream)
            stream = hdr.stream
        elif stream is None:
            broadcast = sender.user_id in self.directory.snapshot.broadcast_users
            stream = Stream.BROADCAST if broadcast else Stream.TRANSACTIONAL
        base = self.config.unsubscribe_base() if stream == Stream.BROADCAST else ""
        drop = (_STREAM_FIELD if hdr.stream is not None else frozenset()) | (
            _UNSUBSCRIBE_FIELDS if base and hdr.unsubscribe_fields else frozenset()
        )
        if drop:  # ours replace the tenant's (its mailto: is kept in ours); the stream field never leaves
            body = headers.remove(body, hdr, drop)
            hdr = dataclasses.replace(headers.parse(body), list_unsubscribe=hdr.list_unsubscribe)
        if not base:
            return [await self._prepared(sender, mail_from, rcpts, body, hdr, domains[0], info, tags, stream, b"")]
        # the copies past the first are bytes the session's DATA budget does not hold: held here while
        # they are built, and bounded as an API bulk request is
        extra = (len(rcpts) - 1) * len(body)
        if len(rcpts) * len(body) > self.config.api.max_bulk_bytes:
            return refuse.broadcast_too_big(len(rcpts), len(body), int(self.config.api.max_bulk_bytes))
        if extra and not self.data_budget.room_for(extra):
            return refuse.DATA_BUSY
        mailtos = unsubscribe.mailto_uris(hdr.list_unsubscribe)
        self.data_budget.hold(extra)
        try:
            return [
                await self._prepared(
                    sender, mail_from, [r], body, hdr, domains[0], info, tags, stream,
                    self._unsubscribe_fields(base, sender.tenant_id, r, mailtos),
                )
                for r in rcpts
            ]  # fmt: skip
        finally:
            self.data_budget.release(extra)

    def _unsubscribe_fields(self, base: str, tenant_id: int, rcpt: str, mailtos: list[str]) -> bytes:
        token = self._tokens.make(unsubscribe.Subscription(tenant_id, Stream.BROADCAST, rcpt))
        return unsubscribe.header_fields(unsubscribe.url(base, token), mailtos)

    async def _prepared(
        self,
        sender: Sender,
        mail_from: str,
        rcpts: list[str],
        body: bytes,
        hdr: headers.HeaderInfo,
        domain: str,
        info: SessionInfo,
        tags: tuple[str, ...],
        stream: str,
        fields: bytes,
    ) -> SpoolMessage:
        """One message as spooled: our fields added to BODY (Received: first; FIELDS after the
        tenant's), then signed for DOMAIN off the loop."""
        now = self.clock()
        qid = self.ids.next(now)
        body = headers.insert(body, hdr, self._received(qid, sender, info, now), self._missing(hdr, qid, now) + fields)
        if self.signer is not None and (self.signer is not self.dkim or self.dkim.keys_for(domain)):
            loop = asyncio.get_running_loop()  # RSA is ~1 ms of CPU: never on the event loop
            body = await loop.run_in_executor(None, self.signer, body, domain)
        return SpoolMessage(
            queue_id=qid,
            tenant_id=sender.tenant_id,
            user_id=sender.user_id,
            sender=mail_from,
            recipients=tuple(Recipient(r, intl.domain_key(r)) for r in rcpts),
            body=body,
            received_ts=now,
            message_id=hdr.message_id or f"<{qid}@{self.config.server.hostname}>",
            tags=tags,
            stream=stream,
        )

    def _gone(self, sender: Sender) -> bool:
        """The sender's tenant is being purged, or was (no longer in the caches) while its message
        was being prepared."""
        return sender.tenant_id in self._closing or sender.tenant_id not in self.directory.snapshot.tenant_domains

    async def _take_quota(
        self, sender: Sender, day: str, quota: int, n: int, now: float, *, batch: bool = False
    ) -> Refusal | None:
        """Take N messages of the tenant's daily QUOTA on DAY from its lease (0: unlimited, nothing
        to take), then check the tenant is not being purged; None if the caller may commit at once
        (with no await before the spool's queue: close_tenant), else the refusal, nothing taken."""
        if quota:
            try:
                taken = await self.leases.take(sender.tenant_id, day, quota, n, now)
            except LeaseUnavailable:
                return refuse.TENANT_CLOSING if self._gone(sender) else refuse.QUOTA_UNCHECKED
            if not taken:
                return refuse.TENANT_CLOSING if self._gone(sender) else refuse.daily_quota(quota, would_exceed=batch)
        if self._gone(sender):
            self._give_back(sender, day, quota, n)
            return refuse.TENANT_CLOSING
        return None

    def _give_back(self, sender: Sender, day: str, quota: int, n: int) -> None:
        """N messages taken by _take_quota were not committed: back to the lease."""
        if quota:
            self.leases.give_back(sender.tenant_id, day, n)

    def check_batch(self, sender: Sender, n: int) -> Refusal | None:
        """Before an API request queues N messages: the daily quota must leave room for all N (as
        far as this process knows: commit_all takes them), and the per-second rate admits the
        request if a token is there and charges all N (the bucket may go negative, so the average
        rate holds). The refusal, if refused."""
        now = self.clock()
        limits = self._limits(sender.tenant)
        day = self._days.day(now)
        quota = limits.messages_per_day
        if quota and self.leases.room(sender.tenant_id, day, quota, now) < n:
            return refuse.daily_quota(quota, would_exceed=True)
        if not self._rates.charge(sender.tenant_id, limits.messages_per_second, now, n):
            return refuse.rate_limit(self._host_rate(limits.messages_per_second))
        return None

    async def commit_all(
        self, sender: Sender, messages: list[SpoolMessage], request: ApiRequest | None
    ) -> Refusal | None:
        """Spool MESSAGES prepared for one API request in one transaction (with the request's
        Idempotency-Key): None once all are on disk, else the refusal (none was queued)."""
        now = self.clock()
        day = self._days.day(now)
        quota = self._limits(sender.tenant).messages_per_day
        # given back if not committed
        refusal = await self._take_quota(sender, day, quota, len(messages), now, batch=True)
        if refusal is not None:
            return refusal
        forget_before = self.clock() - self.config.api.idempotency_ttl
        try:  # no await from _take_quota's check of close_tenant to the spool's queue
            await self.spool.commit_all(messages, day, request, forget_before)
        except SpoolError:
            self._give_back(sender, day, quota, len(messages))
            return refuse.SPOOL_FAILED
        self.accepted += len(messages)
        for _ in messages:
            self.stats.accept(sender.tenant)
        return None

    def _received(self, qid: str, sender: Sender, info: SessionInfo, now: float) -> bytes:
        """Our Received: field; its WITH says how the message came in (RFC 3848), UTF8SMTP... when the
        transaction asked for SMTPUTF8 (RFC 6531 §4.3), "HTTPS (UTF8)" for the API's equivalent
        (delivery reads it: cmcd.intl.utf8_header)."""
        protocol = "ESMTPSA" if info.tls_version else "ESMTPA"
        if info.protocol:
            protocol = info.protocol
        elif sender.mechanism == "IP":
            protocol = "ESMTPS" if info.tls_version else "ESMTP"
        if info.smtputf8 and protocol.startswith("ESMTP"):
            protocol = "UTF8SMTP" + protocol[5:]
        elif info.smtputf8:  # no registered UTF-8 form of HTTPS: a comment says it (cmcd.intl)
            protocol = f"{protocol} {intl.API_UTF8_MARK}"
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

    def _host_rate(self, share: float) -> float:
        """The host's rate a refusal names: a worker enforces its share of it (cmcd/shares.py)."""
        return share * self.rate_shares

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
