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

Every claimed recipient yields exactly one Result, handed to the results writer
(deliver/results.py), which writes them to the spool in batches and keeps the window between
a remote's 250 and its commit short.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cmcd import bounces, policy
from cmcd.config import Config, parse_rate
from cmcd.deliver.client import SmtpClient, SmtpError, client_tls_context
from cmcd.deliver.ready import ReadyQueue
from cmcd.deliver.results import ResultsWriter
from cmcd.deliver.routing import Route, Router
from cmcd.deliver.session import failure_outcome, open_session
from cmcd.intl import refused_without_smtputf8
from cmcd.policy import Outcome
from cmcd.queue.spool import Spool
from cmcd.queue.work import Due, Job, Result
from cmcd.records import RecipientState
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
    ):
        self.config = config
        self.d = config.delivery
        #: how replies are classed (cmcd/bounces.py; the shipped rules unless given), and what each class does
        self.rules = rules if rules is not None else bounces.load_rules()
        self.blocks = config.bounces.policy()
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
        for key, site in list(self.sites.items()):
            if site.active or site.queue:
                site.limit = self.d.connection_limit
            else:
                del self.sites[key]

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
        if site is None or site.route != route:
            pol = self.d.policy(domain)
            limit = pol.connection_limit or self.d.connection_limit
            rate = parse_rate(pol.rate) if pol.rate else (0.0, 0.0)
            if site is None:
                site = self.sites[route.site] = Site.new(
                    route.site, route, limit=limit, initial_concurrency=self.d.initial_concurrency,
                    message_rate=rate, connect_rate_per_s=self.d.connect_rate_limit, now=self.mono(),
                )  # fmt: skip
            else:
                site.route = route  # the MX addresses changed (TTL expired): new connections use them
        return site

    def _enqueue(self, site: Site, job: Job) -> None:
        if not site.admit(self.mono()):
            self._finish(job, site.last_failure or policy.network_fault("destination is not responding"), None)
            return
        # domains with a policy of their own keep their own transactions
        join = not self.d.domains.get(job.domain)
        if not site.push(job, join=join, max_recipients=self.d.recipients_per_transaction):
            return  # joined the message's job already waiting
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
        try:
            try:
                client = await self._open(site)
            finally:
                site.opened(client is not None)
            if client is None:
                return
            sent = 0
            while sent < self.d.messages_per_connection and not client.closed:
                job = await self._next_job(site, client)
                if job is None:
                    break
                await self._rate_wait(site)
                await self._send(site, client, job)
                sent += 1
            if sent == 0 and client.closed and not self._closing:
                # greeted, EHLO done, then a 421, garbage or a close before any transaction: a failed
                # session like a refused greeting, never a reason to connect again at once
                self._session_failed(site, client)
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

    async def _open(self, site: Site) -> SmtpClient | None:
        """A session with one of the site's hosts, ready for MAIL; None after every address failed
        (the site's window shrinks, and at zero the site is dead)."""
        tls_mode = self.d.domain_tls(site.queue[0].domain) if site.queue else self.d.tls
        opened = await open_session(
            site.route, tls_mode, self.d, self.config.server.hostname, self.tls_context, self.session_failures
        )
        if isinstance(opened, SmtpClient):
            return opened
        self._connect_failed(site, opened)
        return None

    def _connect_failed(self, site: Site, failure: Outcome, *, job_done: bool = False) -> None:
        """A failed session: the window shrinks (at zero the site is dead). Unless the session's own
        job was already finished (JOB_DONE), the job it was opened for is deferred now."""
        dead_until = site.failed(failure, self.mono(), self.d.dead_site_backoff)
        if site.queue and not job_done:  # the job this connection was for is deferred now, not after every retry
            self._finish(site.pop(), failure, None)
        log.info("event=connect_failed site=%s window=%g reason=%r", site.key, site.window, failure.text)
        if dead_until is not None:
            log.warning("event=site_dead site=%s until=%.0f reason=%r", site.key, dead_until, failure.text)
            while site.queue:
                self._finish(site.pop(), failure, None)

    def _session_failed(self, site: Site, client: SmtpClient) -> None:
        self.session_failures["ready"] += 1
        where = f"{client.host}[{client.address}]"
        self._connect_failed(site, failure_outcome(where, client.failure(), "after EHLO, before MAIL"))

    async def _next_job(self, site: Site, client: SmtpClient) -> Job | None:
        while True:
            if client.closed:  # dropped while idle: leave the job for a new connection
                return None
            if site.queue:
                return site.pop()
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
            self._finish(job, outcome, where)
            if client.closed:  # a 421 (or a close) instead of an answer to MAIL: the session failed
                self.session_failures["transaction"] += 1
                self._connect_failed(site, outcome, job_done=True)
            return
        delivered = False
        for due, reply in zip(job.recipients, rcpt_replies):
            if reply.code in (250, 251) and data is not None:
                outcome = policy.classify(data.code, data.text)
                delivered = delivered or outcome.verdict == policy.DELIVERED
            else:
                outcome = policy.classify(reply.code, reply.text)
            self._result_for(job, due, outcome, where)
        if delivered:
            site.succeeded()
        elif client.closed and job.recipients:  # a 421 or a close mid-transaction, nothing delivered
            self.session_failures["transaction"] += 1
            self._connect_failed(site, outcome, job_done=True)

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
            action = self.blocks.action(cls)
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


def _wake(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)
