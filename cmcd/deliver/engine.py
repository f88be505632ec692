"""The delivery engine: connections and sessions for the per-site ready queues, and each recipient's
outcome; never writes the spool itself (deliver/results.py does).

Jobs (one message, one domain) arrive from the scheduler. Each is routed to the site its
domain's mail goes to; each site has its own ready queue (deliver/ready.py: the pure policy of
its connection limit and window, starting at initial_concurrency, +1 per delivered transaction,
-1 per failed session, at zero dead for dead_site_backoff with its mail deferred without
connecting; and its optional message rate). The engine does the I/O the ready queue asks for.
Nothing a site does waits on another site: a black-holed destination ties up only its own
connections.

A failed session is any end before a transaction completed: a refused or garbled greeting,
EHLO or STARTTLS, a close or a 421 right after EHLO, a timeout. Each one defers the job it
was opened for with the destination's own words and shrinks the window, so a destination
that greets and hangs up is tried a few times and then backed off, never reconnected to in a
loop. As a last guard no code path can bypass, new connections to one site are limited to
delivery.connect_rate_limit a second. In-process timers (dead sites, rates) use the monotonic
clock; retry and lifetime times are stored, so they are wall-clock times (etc/cmcd.toml).

Provider shaping (cmcd/shaping.py): a provider's site has the provider's limits, and every reply
that is no delivery is shown to the automation rules once (never once per recipient). A rule that
fires lowers the site's limits, or holds the site's (or one tenant's) mail, for its duration; a
timer ends it and the site has its configured limits again. Held mail is deferred to the end of
the hold without counting an attempt and without the max_lifetime check, so a hold never turns a
tempfail into an expiry or a bounce. Each change and each end is logged, written to the operation
log (off the event loop, through the audit log) and counted for /metrics; shaping_status() shows
this process's state (each worker has its own).

Every claimed recipient yields exactly one Result, handed to the results writer
(deliver/results.py), which writes them to the spool in batches and keeps the window between
a remote's 250 and its commit short.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cmcd import bounces, policy
from cmcd.config import Config, parse_rate
from cmcd.deliver.client import SmtpClient, SmtpError, client_tls_context
from cmcd.deliver.ready import ReadyQueue
from cmcd.deliver.results import ResultsWriter
from cmcd.deliver.routing import Route, Router
from cmcd.deliver.session import failure_outcome, open_session
from cmcd.intl import refused_without_smtputf8
from cmcd.policy import Outcome
from cmcd.queue.audit import AuditLog
from cmcd.queue.spool import Spool
from cmcd.queue.work import Due, Job, Result
from cmcd.records import RecipientState
from cmcd.shaping import Automation, Change, Limits, Shaping
from cmcd.stats import Histogram
from cmcd.submit.headers import count_received
from cmcd.tenancy.suppressions import Suppressions

log = logging.getLogger("cmcd.deliver")


@dataclass
class Site(ReadyQueue):
    """A ready queue and what the engine does for it: connections waiting idle for a job, a
    throttled pump's timer."""

    idle: deque[asyncio.Future[bool]] = field(default_factory=deque)
    pump_timer: asyncio.TimerHandle | None = None  # a throttled pump, due when a token is there
    throttle_logged: float = -math.inf


class DeliveryEngine:
    def __init__(
        self,
        config: Config,
        spool: Spool,
        router: Router,
        suppressions: Suppressions,
        *,
        release: Callable[[int], None],
        wake: Callable[[], None],
        dsn_off: Callable[[], frozenset[int]] = frozenset,
        clock: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
        rules: bounces.Rules | None = None,
        shaping: Shaping | None = None,
        audit: AuditLog | None = None,
        block_actions: Callable[[int], dict[str, str] | None] = lambda tenant_id: None,
    ):
        self.config = config
        self.d = config.delivery
        #: how replies are classed (cmcd/bounces.py; the shipped rules unless given), and what each class does
        self.rules = rules if rules is not None else bounces.load_rules()
        self.blocks = config.bounces.policy()
        self.block_actions = block_actions  # a tenant's own action per class (the directory's), over the host's
        #: bounces of a class whose action is alert, by (tenant id, class): never suppressed, counted
        self.bounce_alerts: dict[tuple[int, str], int] = {}
        self.spool = spool
        self.router = router
        self.suppressions = suppressions
        self.release = release  # tells the scheduler how many claimed recipients are done
        self.clock = clock  # wall clock: stored retry times and message ages
        self.mono = mono  # in-process timers: dead sites, connection rates
        self.results = ResultsWriter(
            spool, hostname=lambda: self.config.server.hostname, release=release, wake=wake, dsn_off=dsn_off,
            clock=clock, mono=mono,
        )  # fmt: skip
        self.tls_context = client_tls_context()
        self.sites: dict[str, Site] = {}
        self.connections = 0
        self._starved: deque[Site] = deque()
        self._resolving: dict[str, list[Job]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self.possible_duplicates = 0  # recipients deferred after their message was fully sent
        self.connect_throttled = 0  # times a site's new connections waited for connect_rate_limit
        #: failed sessions by the stage they ended in: connect, hello (greeting/EHLO/STARTTLS),
        #: ready (closed or 421 after EHLO, before a transaction), transaction
        self.session_failures: dict[str, int] = {"connect": 0, "hello": 0, "ready": 0, "transaction": 0}
        self.loops: dict[str, int] = {"own_address": 0, "hops": 0}  # messages bounced as loops, by check
        #: providers and automation rules (this worker's share); the router rolls domains up by them
        self.shaping = shaping if shaping is not None else Shaping()
        self.router.set_shaping(self.shaping)
        self.automation = Automation(self.shaping.rules)
        self.audit = audit  # operation-log rows for shaping changes (None: only logged)
        #: automation changes by (provider, rule, action), "restore" for their ends
        self.shaping_actions: dict[tuple[str, str, str], int] = {}
        self.held = 0  # recipients deferred by a suspension (never an attempt)
        self._shaping_timer: asyncio.TimerHandle | None = None

    @property
    def counts(self) -> dict[str, int]:
        """Outcomes so far by state (the results writer counts them)."""
        return self.results.counts

    @property
    def delivery_seconds(self) -> Histogram:
        """Received to final state, read by /metrics."""
        return self.results.delivery_seconds

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        self.results.start()

    async def close(self) -> None:
        """Stop delivering: open transactions are cut, their recipients stay inflight and are
        queued again at the next start (at-least-once); every outcome already known is written."""
        self._closing = True
        if self._shaping_timer is not None:
            self._shaping_timer.cancel()
        self.results.closing()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.results.close()

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def reconfigure(self, config: Config) -> None:
        """A reloaded configuration: new routes, limits, schedule and timeouts for what comes next.
        Idle sites are forgotten (re-made with the new limits); busy ones get the new default limit."""
        self.config = config
        self.d = config.delivery
        self.blocks = config.bounces.policy()
        self.router.reconfigure(config)
        self._refit_sites()

    def set_shaping(self, shaping: Shaping) -> None:
        """Reloaded providers and rules (read off the event loop, this worker's share): routes are
        matched again; changes in force run their course."""
        self.shaping = shaping
        self.router.set_shaping(shaping)
        self.automation.set_rules(shaping.rules)
        self._refit_sites()

    def _refit_sites(self) -> None:
        """Idle sites are forgotten (re-made with the limits now configured); busy ones get them now."""
        now = self.mono()
        for key, site in list(self.sites.items()):
            if not (site.active or site.queue):
                del self.sites[key]
                continue
            provider = self.shaping.provider(site.provider) if site.provider else None
            if provider is not None:
                site.configured = self._provider_limits(provider.limits)
            elif not site.provider:
                site.configured = dataclasses.replace(
                    site.configured, connection_limit=self.d.connection_limit,
                    messages_per_connection=self.d.messages_per_connection,
                    recipients_per_transaction=self.d.recipients_per_transaction,
                )  # fmt: skip
            site.set_limits(self.automation.limits(key, site.configured), now)

    def set_rules(self, rules: bounces.Rules) -> None:
        """Reloaded bounce rules (read off the event loop): they class every reply from now on."""
        self.rules = rules

    def revive(self, domain: str) -> None:
        """An operator's retry: the domain's site (if known and dead) may connect again at once."""
        cached = self.router.cached(domain)
        site = self.sites.get(cached.site) if isinstance(cached, Route) else None
        if site is not None:
            site.revive()
        self.router.forget(domain)

    def dead_sites(self) -> int:
        now = self.mono()
        return sum(1 for s in self.sites.values() if s.dead(now))

    def commit_window_ms(self) -> dict[str, float]:
        """Remote reply to outcome committed, over the last results: p50, p99, max (milliseconds)."""
        return self.results.commit_window_ms()

    def erased(self) -> None:
        """A body was deleted outside the engine (an operator's delete): checkpoint soon."""
        self.results.erased()

    # -- jobs in -------------------------------------------------------------------------------

    def submit(self, jobs: list[Job]) -> None:
        for job in jobs:
            self._route(job)

    def _route(self, job: Job) -> None:
        if self._closing:
            return
        if job.sender:  # a bounce goes to the tenant's own sender address, never suppressed
            suppressed = [d for d in job.recipients if self.suppressions.contains(job.tenant_id, d.address, job.stream)]
            if suppressed:
                for due in suppressed:
                    self.results.add(
                        Result(
                            job, due, RecipientState.SUPPRESSED, "5.7.1 recipient is on the tenant's suppression list"
                        )
                    )
                job.recipients = [d for d in job.recipients if d not in suppressed]
                if not job.recipients:
                    return
        cached = self.router.cached(job.domain)
        if isinstance(cached, Route):  # the common case: no task, no await
            self._enqueue(self._site(cached, job.domain), job)
            return
        waiting = self._resolving.get(job.domain)
        if waiting is not None:
            waiting.append(job)
            return
        self._resolving[job.domain] = [job]
        self._spawn(self._resolve(job.domain))

    async def _resolve(self, domain: str) -> None:
        try:
            route = await self.router.resolve(domain)
        finally:
            jobs = self._resolving.pop(domain, [])
        for job in jobs:
            if isinstance(route, Outcome):
                if route.enhanced == "5.4.6":
                    self.loops["own_address"] += 1
                self._finish(job, route, None)
            else:
                self._enqueue(self._site(route, domain), job)

    def _site(self, route: Route, domain: str) -> Site:
        site = self.sites.get(route.site)
        if site is None:
            configured = self._configured(route, domain)
            limits = self.automation.limits(route.site, configured)
            now = self.mono()
            site = self.sites[route.site] = Site.new(
                route.site, route, limit=limits.connection_limit, initial_concurrency=self.d.initial_concurrency,
                message_rate=limits.rate, connect_rate_per_s=self.d.connect_rate_limit, now=now,
            )  # fmt: skip
            site.provider, site.configured = route.provider, configured
            site.set_limits(limits, now)
        site.add_route(domain, route)  # new, or the MX addresses changed (TTL expired): new connections use them
        return site

    def _configured(self, route: Route, domain: str) -> Limits:
        """A new site's limits before automation: its provider's, else the [delivery] settings and
        the domain's own [delivery.domains] entry (the first domain's: domains sharing MX hosts share them)."""
        provider = self.shaping.provider(route.provider) if route.provider else None
        if provider is not None:
            return self._provider_limits(provider.limits)
        pol = self.d.policy(domain)
        return Limits(
            pol.connection_limit or self.d.connection_limit, self.d.messages_per_connection, 0,
            self.d.recipients_per_transaction, parse_rate(pol.rate) if pol.rate else (0.0, 0.0),
        )  # fmt: skip

    def _provider_limits(self, limits: Limits) -> Limits:
        """A provider's limits, the [delivery] setting for each it leaves unset."""
        d = self.d
        return dataclasses.replace(
            limits,
            connection_limit=limits.connection_limit or d.connection_limit,
            messages_per_connection=limits.messages_per_connection or d.messages_per_connection,
            recipients_per_transaction=limits.recipients_per_transaction or d.recipients_per_transaction,
        )

    def _enqueue(self, site: Site, job: Job) -> None:
        now = self.mono()
        if self.automation.active:
            hold = self.automation.suspension(site.key, job.tenant_id, now)
            if hold is not None:
                self._hold(job, hold, now)
                return
        if not site.admit(now):
            self._finish(job, site.last_failure or policy.network_fault("destination is not responding"), None)
            return  # (a provider's site is never dead: _connect_failed)
        # domains with a policy of their own keep their own transactions
        join = not self.d.domains.get(job.domain)
        most = site.recipients_per_transaction
        parts = [job]
        if site.provider and len(job.recipients) > most:  # a provider's published recipients per transaction
            parts = [
                dataclasses.replace(job, recipients=job.recipients[i : i + most])
                for i in range(0, len(job.recipients), most)
            ]
        for part in parts:
            if not site.push(part, join=join, max_recipients=most):
                continue  # joined the message's job already waiting
            self._wake_or_pump(site)

    def _wake_or_pump(self, site: Site) -> None:
        """A job was queued: a connection waiting idle takes it, else the site may open one."""
        while site.idle:
            waiter = site.idle.popleft()
            if not waiter.done():
                waiter.set_result(True)
                return
        self._pump(site)

    def _pump(self, site: Site) -> None:
        while site.wants_connection() and not self._closing:
            if self.connections >= self.d.max_connections:
                if site not in self._starved:
                    self._starved.append(site)
                return
            if site.pump_timer is not None:
                return  # throttled: the timer pumps again
            wait = site.connect_wait(self.mono(), self.d.connect_rate_limit)
            if wait > 0:
                self._throttle(site, wait)
                return
            site.opening()
            self.connections += 1
            self._spawn(self._connection(site))

    def _throttle(self, site: Site, wait: float) -> None:
        self.connect_throttled += 1
        now = self.mono()
        if now - site.throttle_logged >= 60.0:
            site.throttle_logged = now
            log.warning(
                "event=connect_throttled site=%s limit_per_s=%g reason=%r",
                site.key, self.d.connect_rate_limit, site.last_failure.text if site.last_failure else "",
            )  # fmt: skip
        site.pump_timer = asyncio.get_running_loop().call_later(wait, self._repump, site)

    def _repump(self, site: Site) -> None:
        site.pump_timer = None
        self._pump(site)

    # -- connections ----------------------------------------------------------------------------

    async def _connection(self, site: Site) -> None:
        client: SmtpClient | None = None
        route = site.route_of(site.queue[0]) if site.queue else site.route  # the next hop of the job it is for
        hop = route.next_hop
        try:
            try:
                client = await self._open(site, route)
            finally:
                site.opened(client is not None)
            if client is None:
                return
            sent = recipients = 0
            # automation may lower the limits meanwhile: a connection over them ends after its transaction
            while sent < site.messages_per_connection and not client.closed and site.active <= max(1, site.limit):
                job = await self._next_job(site, client, hop)
                if job is None:
                    break
                most = site.recipients_per_connection
                if most and recipients and recipients + len(job.recipients) > most:
                    site.queue.appendleft(job)  # the next connection takes it
                    break
                await self._rate_wait(site)
                if self.automation.active:  # a suspension may have begun while it waited
                    hold = self.automation.suspension(site.key, job.tenant_id, self.mono())
                    if hold is not None:
                        self._hold(job, hold, self.mono())
                        continue
                await self._send(site, client, job)
                sent += 1
                recipients += len(job.recipients)
            if sent == 0 and client.closed and not self._closing:
                # greeted, EHLO done, then a 421, garbage or a close before any transaction: a failed
                # session like a refused greeting, never a reason to connect again at once
                self._session_failed(site, client, hop)
        except Exception:  # a bug must not leave the site without connections or a job unaccounted for
            log.exception("event=connection_error site=%s", site.key)
            if client is not None:
                client.abort()
        finally:
            if client is not None:
                try:
                    await client.quit()
                except asyncio.CancelledError:
                    client.abort()
                    raise
            site.closed()
            self.connections -= 1
            if not self._closing:
                self._pump(site)
                while self._starved and self.connections < self.d.max_connections:
                    self._pump(self._starved.popleft())

    async def _open(self, site: Site, route: Route) -> SmtpClient | None:
        """A session with one of ROUTE's hosts, ready for MAIL; None after every address failed
        (the site's window shrinks, and at zero the site is dead)."""
        tls_mode = self.d.domain_tls(site.queue[0].domain) if site.queue else self.d.tls
        opened = await open_session(
            route, tls_mode, self.d, self.config.server.hostname, self.tls_context, self.session_failures
        )
        if isinstance(opened, SmtpClient):
            return opened
        self._observe(site, None, opened)
        self._connect_failed(site, opened, hop=route.next_hop)
        return None

    def _connect_failed(self, site: Site, failure: Outcome, *, job_done: bool = False, hop: str = "") -> None:
        """A failed session: the window shrinks (at zero the site is dead). Unless the session's own
        job was already finished (JOB_DONE), the job it was opened for (one for HOP) is deferred now."""
        # a provider's site holds many tenants' next hops: one hop failing must not back off the others,
        # nor give their mail its host's words, so it is never declared dead (its window shrinks to one,
        # and each job meets its own hop's failure)
        backoff = 0.0 if site.provider else self.d.dead_site_backoff
        dead_until = site.failed(failure, self.mono(), backoff)
        if site.provider:
            dead_until = None
        if site.queue and not job_done:  # the job this connection was for is deferred now, not after every retry
            job = site.take(hop) if hop else site.pop()
            if job is not None:
                self._finish(job, failure, None)
        log.info("event=connect_failed site=%s window=%g reason=%r", site.key, site.window, failure.text)
        if dead_until is not None:
            log.warning("event=site_dead site=%s until=%.0f reason=%r", site.key, dead_until, failure.text)
            while site.queue:
                self._finish(site.pop(), failure, None)

    def _session_failed(self, site: Site, client: SmtpClient, hop: str) -> None:
        self.session_failures["ready"] += 1
        where = f"{client.host}[{client.address}]"
        failure = failure_outcome(where, client.failure(), "after EHLO, before MAIL")
        self._observe(site, None, failure)
        self._connect_failed(site, failure, hop=hop)

    async def _next_job(self, site: Site, client: SmtpClient, hop: str) -> Job | None:
        while True:
            if client.closed:  # dropped while idle: leave the job for a new connection
                return None
            if site.queue:
                return site.take(hop)  # None: what waits is for another next hop, which a new connection serves
            if self.d.connection_idle <= 0 or self._closing:
                return None
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[bool] = loop.create_future()
            timer = loop.call_later(self.d.connection_idle, _wake, waiter, False)
            site.idle.append(waiter)
            try:
                if not await waiter:
                    return None  # idle too long
            finally:
                timer.cancel()
                if waiter in site.idle:
                    site.idle.remove(waiter)

    async def _rate_wait(self, site: Site) -> None:
        while (wait := site.message_wait(self.mono())) > 0:
            await asyncio.sleep(wait)

    async def _send(self, site: Site, client: SmtpClient, job: Job) -> None:
        body = job.body
        where = (client.host, client.address, client.tls_version)
        try:
            if body is None:
                body = await self.spool.read_body(job.queue_id)
                if body is None:  # deleted by an operator while it waited
                    self.release(len(job.recipients))
                    return
            hops = count_received(body)
            if hops > self.config.smtp.max_hops:  # a loop through another system: never send it on
                self.loops["hops"] += 1
                log.warning("event=mail_loop check=hops queue_id=%s hops=%d", job.queue_id, hops)
                self._finish(job, policy.permanent_failure("5.4.6", f"too many hops ({hops} Received: fields)"), None)
                return
            if "SMTPUTF8" not in client.extensions:  # RFC 6531 §3.2: bounced with 5.6.7 (cmcd/intl.py says why)
                refused = refused_without_smtputf8(job.sender, [d.address for d in job.recipients], body)
                if refused is None or refused:
                    why = policy.permanent_failure(
                        "5.6.7", f"SMTPUTF8 is required, but host {client.host} does not offer it"
                    )
                    keep = []
                    for i, d in enumerate(job.recipients):
                        if refused is None or i in refused:
                            self._result_for(job, d, why, where)
                        else:
                            keep.append(d)
                    job.recipients = keep
                    if not keep:
                        return
            mail, rcpt_replies, data = await client.transaction(job.sender, [d.address for d in job.recipients], body)
        except SmtpError as exc:
            client.abort()
            if exc.after_data:
                self.possible_duplicates += len(job.recipients)
                log.warning("event=possible_duplicate queue_id=%s host=%s", job.queue_id, client.host)
            if exc.stale and job.moved < 2:
                job.moved += 1
                site.queue.appendleft(job)  # nothing was sent: another connection takes it
                return
            self.session_failures["transaction"] += 1
            failure = failure_outcome(f"{client.host}[{client.address}]", exc, "during the transaction")
            self._observe(site, job.tenant_id, failure)
            self._finish(job, failure, where)
            self._connect_failed(site, failure, job_done=True)
            return
        except Exception as exc:
            client.abort()
            log.exception("event=send_error queue_id=%s", job.queue_id)
            self._finish(job, policy.network_fault(f"internal error: {exc!r}", "4.3.0"), where)
            return
        if mail is not None:
            outcome = policy.classify(mail.code, mail.text)
            self._observe(site, job.tenant_id, outcome)
            self._finish(job, outcome, where)
            if client.closed:  # a 421 (or a close) instead of an answer to MAIL: the session failed
                self.session_failures["transaction"] += 1
                self._connect_failed(site, outcome, job_done=True)
            return
        delivered = False
        after_data = policy.classify(data.code, data.text) if data is not None else None
        if after_data is not None:
            self._observe(site, job.tenant_id, after_data)
        observed: set[tuple[int, str]] = set()  # the rules count a reply once, not once per recipient
        for due, reply in zip(job.recipients, rcpt_replies):
            if reply.code in (250, 251) and after_data is not None:
                outcome = after_data
                delivered = delivered or outcome.verdict == policy.DELIVERED
            else:
                outcome = policy.classify(reply.code, reply.text)
                if (reply.code, reply.text) not in observed:
                    observed.add((reply.code, reply.text))
                    self._observe(site, job.tenant_id, outcome)
            self._result_for(job, due, outcome, where)
        if delivered:
            site.succeeded()
        elif client.closed and job.recipients:  # a 421 or a close mid-transaction, nothing delivered
            self.session_failures["transaction"] += 1
            self._connect_failed(site, outcome, job_done=True)

    # -- shaping automation ----------------------------------------------------------------------

    def _observe(self, site: Site, tenant_id: int | None, outcome: Outcome) -> None:
        """One remote reply that may be no delivery, shown to the automation rules (a 2xx, or a
        failure cmcd decided itself (code 0), never is)."""
        if outcome.code < 400 or not self.automation.rules:
            return
        now = self.mono()
        started = self.automation.observe(
            site.key, site.provider, tenant_id, outcome.code, outcome.enhanced, outcome.text, now
        )
        for change in started:
            self._started(site, change, now)
        if started:
            self._arm_shaping_timer()

    def _started(self, site: Site, change: Change, now: float) -> None:
        key = (change.provider or "-", change.rule, change.action)
        self.shaping_actions[key] = self.shaping_actions.get(key, 0) + 1
        held = 0
        if change.action == "limit":
            site.set_limits(self.automation.limits(site.key, site.configured), now)
        else:
            tenant = change.tenant_id
            for job in site.remove_where(lambda j: change.action == "suspend" or j.tenant_id == tenant):
                held += len(job.recipients)
                self._hold(job, change, now)
        detail = _describe(change, self.clock() + change.until - now)
        log.warning(
            "event=shaping_change site=%s provider=%s rule=%s action=%s tenant_id=%s reply=%r duration_s=%g "
            "connection_limit=%d held=%d %s",
            site.key, change.provider or "-", change.rule, change.action, change.tenant_id, change.reply,
            change.until - change.since, site.limit, held, detail,
        )  # fmt: skip
        self._record(f"shaping.{change.action}", change, detail)

    def _ended(self, change: Change, now: float) -> None:
        key = (change.provider or "-", change.rule, "restore")
        self.shaping_actions[key] = self.shaping_actions.get(key, 0) + 1
        site = self.sites.get(change.site)
        if site is not None and change.action == "limit":
            site.set_limits(self.automation.limits(site.key, site.configured), now)
            self._pump(site)
        limit = site.limit if site is not None else 0
        log.info(
            "event=shaping_restored site=%s provider=%s rule=%s action=%s tenant_id=%s connection_limit=%d",
            change.site, change.provider or "-", change.rule, change.action, change.tenant_id, limit,
        )  # fmt: skip
        self._record("shaping.restore", change, f"rule={change.rule} ended={change.action} connection_limit={limit}")

    def _hold(self, job: Job, change: Change, now: float) -> None:
        """JOB's recipients deferred to the end of CHANGE (a suspension), spread over a little of
        it so they do not all come back at once: no attempt counted, no expiry, no bounce."""
        span = change.until - change.since
        until = self.clock() + max(0.0, change.until - now)
        text = (
            f"4.7.0 delivery to {change.site} is held until {_iso(until)} by shaping rule {change.rule} "
            f"({change.action}); no attempt was made"
        )
        for due in job.recipients:
            later = until + random.random() * min(30.0, 0.1 * span)
            self.results.add(Result(job, due, RecipientState.DEFERRED, text, later, counts_attempt=False))
        self.held += len(job.recipients)

    def _record(self, action: str, change: Change, detail: str) -> None:
        """The operation-log row of a shaping change, written off the event loop (never lost: AuditLog)."""
        if self.audit is None or self._closing:
            return
        self._spawn(
            self.audit.op(
                ts=self.clock(),
                actor_uid=None,
                actor="cmcd",
                action=action,
                target=change.site,
                result="ok",
                tenant_id=change.tenant_id,
                detail=detail,
            )  # fmt: skip
        )

    def _arm_shaping_timer(self) -> None:
        """One timer, for the first change in force to end."""
        if self._shaping_timer is not None:
            self._shaping_timer.cancel()
            self._shaping_timer = None
        end = self.automation.next_end()
        if end is None or self._closing:
            return
        self._shaping_timer = asyncio.get_running_loop().call_later(max(0.0, end - self.mono()), self._shaping_tick)

    def _shaping_tick(self) -> None:
        self._shaping_timer = None
        now = self.mono()
        for change in self.automation.expire(now):
            self._ended(change, now)
        self._arm_shaping_timer()

    def site_of(self, domain: str) -> str:
        """The site DOMAIN's mail goes to, as far as the route cache knows ("" when it does not)."""
        cached = self.router.cached(domain)
        return cached.site if isinstance(cached, Route) else ""

    def shaping_status(self, tenant_id: int | None = None) -> dict[str, Any]:
        """This process's providers, its shaped sites (a provider's, or one an automation change is
        in force at) and the changes in force; with TENANT_ID only that tenant's suspensions."""
        now, wall = self.mono(), self.clock()
        changes = [
            c for c in self.automation.active.values()
            if c.action != "suspend_tenant" or tenant_id is None or c.tenant_id == tenant_id
        ]  # fmt: skip
        shaped = {c.site for c in self.automation.active.values()}
        return {
            "files": list(self.shaping.files),
            "providers": [
                {"name": p.name, "suffixes": list(p.suffixes)} | _limits(self._provider_limits(p.limits))
                for p in self.shaping.providers
            ],
            "sites": [
                {"site": s.key, "provider": s.provider}
                | _limits(
                    dataclasses.replace(
                        s.configured,
                        connection_limit=s.limit,
                        messages_per_connection=s.messages_per_connection,
                        recipients_per_connection=s.recipients_per_connection,
                        recipients_per_transaction=s.recipients_per_transaction,
                        rate=s.message_rate,
                    )
                )
                | {
                    "configured_connection_limit": s.configured.connection_limit,
                    "connections": s.active,
                    "window": s.window,
                    "queued": len(s.queue),
                    "domains": len(s.hop_of),
                    "dead": s.dead(now),
                }
                for s in sorted(self.sites.values(), key=lambda s: s.key)
                if s.provider or s.key in shaped
            ],
            "changes": [
                {
                    "site": c.site,
                    "provider": c.provider,
                    "rule": c.rule,
                    "action": c.action,
                    "tenant_id": c.tenant_id,
                    "reply": c.reply,
                    "until": _iso(wall + c.until - now),
                    "ends_in_s": round(max(0.0, c.until - now), 1),
                    "connection_limit": c.connection_limit,
                    "messages_per_connection": c.messages_per_connection,
                    "rate": _rate(c.rate) if c.rate else "",
                }
                for c in sorted(changes, key=lambda c: (c.until, c.site, c.rule))
            ],
            "held_recipients": self.held,
        }

    # -- outcomes ------------------------------------------------------------------------------

    def _finish(self, job: Job, outcome: Outcome, where: tuple[str, str, str] | None) -> None:
        for due in job.recipients:
            self._result_for(job, due, outcome, where)

    def _result_for(self, job: Job, due: Due, outcome: Outcome, where: tuple[str, str, str] | None) -> None:
        now = self.clock()
        mx, ip, tls = where or ("", "", "")
        if outcome.verdict == policy.DELIVERED:
            self.results.add(Result(job, due, RecipientState.DELIVERED, outcome.text, mx=mx, ip=ip, tls=tls))
            return
        cls = bounces.classify(self.rules, outcome.code, outcome.enhanced, outcome.text)
        if outcome.verdict == policy.BOUNCED:
            action = self.blocks.action(cls, self.block_actions(job.tenant_id))
            suppress = action == "suppress" and bool(job.sender)  # a bounce of a bounce suppresses nothing
            if suppress:
                self.suppressions.add(job.tenant_id, due.address)
            elif action == "alert" and job.sender:
                key = (job.tenant_id, cls)
                self.bounce_alerts[key] = self.bounce_alerts.get(key, 0) + 1
            self.results.add(
                Result(job, due, RecipientState.BOUNCED, outcome.text, mx=mx, ip=ip, tls=tls, suppress=suppress,
                       bounce_class=cls)
            )  # fmt: skip
        elif policy.expired(job.received, now, self.d.max_lifetime):
            self.results.add(
                Result(job, due, RecipientState.EXPIRED, outcome.text, mx=mx, ip=ip, tls=tls, bounce_class=cls)
            )
        else:
            delay = policy.retry_delay(due.attempts + 1, self.d.retry_schedule, self.d.retry_jitter, random.random())
            self.results.add(
                Result(job, due, RecipientState.DEFERRED, outcome.text, now + delay, mx=mx, ip=ip, tls=tls,
                       bounce_class=cls)
            )  # fmt: skip


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _rate(rate: tuple[float, float]) -> str:
    count, per = rate
    return f"{count:g}/{per:g}s" if count > 0 else ""


def _limits(limits: Limits) -> dict[str, Any]:
    return {
        "connection_limit": limits.connection_limit, "messages_per_connection": limits.messages_per_connection,
        "recipients_per_connection": limits.recipients_per_connection,
        "recipients_per_transaction": limits.recipients_per_transaction, "rate": _rate(limits.rate),
    }  # fmt: skip


def _describe(change: Change, until: float) -> str:
    """What a change does, for the log line and the operation log (no reply text: it may name an address)."""
    parts = [f"rule={change.rule}", f"reply={change.reply or '-'}", f"until={_iso(until)}"]
    if change.connection_limit is not None:
        parts.append(f"set_connection_limit={change.connection_limit}")
    if change.messages_per_connection is not None:
        parts.append(f"set_messages_per_connection={change.messages_per_connection}")
    if change.rate is not None:
        parts.append(f"set_rate={_rate(change.rate)}")
    return " ".join(parts)


def _wake(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)
