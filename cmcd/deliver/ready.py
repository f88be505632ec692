"""Per-site ready queues: the jobs waiting for one destination site and the limits on how they
leave it. Pure policy: every time is passed in (`now`, monotonic seconds); nothing here opens a
socket, reads a clock, logs or touches the spool.

The window is Postfix's destination concurrency (SCHEDULER_README): it starts at
initial_concurrency, rises by one per delivered transaction up to the site's connection limit,
falls by one per failed session, and when it reaches zero with no other connection of the site
still open the site is dead for dead_site_backoff: its jobs are deferred without connecting, and
the first job after the backoff opens one probing connection. New connections are limited to
delivery.connect_rate_limit a second (the last guard against a reconnect loop), messages to the
site's own rate (delivery.domains.*.rate), both with policy.Bucket.

A provider's site (cmcd/shaping.py, MX rollup) holds the jobs of many domains whose next hops (MX
host sets) may differ: each job's hop is known by its domain, a connection is opened for the hop
of the job at the head of the queue and takes only jobs of its own hop (take). Its limits are the
provider's, changed for a while by automation (set_limits).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Self

from cmcd.deliver.routing import Route
from cmcd.policy import Bucket, Outcome
from cmcd.queue.work import Job
from cmcd.shaping import Limits

#: jobs a connection looks through for one of its own next hop before it gives up its place
TAKE_SCAN = 16


@dataclass
class ReadyQueue:
    """One destination site: its queue of jobs, its window and its rate buckets."""

    key: str
    route: Route
    limit: int  # connections at most
    window: float  # connections allowed now (at least one while the site is alive)
    message_rate: tuple[float, float]  # (messages, per seconds); (0, 0) = unlimited
    messages: Bucket
    connects: Bucket
    queue: deque[Job] = field(default_factory=deque)
    #: queue id -> its job waiting in the queue, so the message's recipients at other domains that
    #: go to this same site join it (one transaction per message and next hop, as Postfix does)
    open_jobs: dict[str, Job] = field(default_factory=dict)
    active: int = 0  # connections open or being opened
    starting: int = 0  # connections not yet ready to take a job
    dead_until: float = 0.0  # 0.0: alive
    last_failure: Outcome | None = None
    delivered: int = 0  # transactions with at least one recipient delivered
    messages_per_connection: int = 100
    recipients_per_connection: int = 0  # 0: no limit
    recipients_per_transaction: int = 50
    provider: str = ""  # a provider's rolled-up site: its name
    configured: Limits = field(default_factory=Limits)  # the limits before automation changed any
    #: next hop -> its route, and each domain's next hop (one of each for a site that is no provider's)
    routes: dict[str, Route] = field(default_factory=dict)
    hop_of: dict[str, str] = field(default_factory=dict)

    @classmethod
    def new(
        cls,
        key: str,
        route: Route,
        *,
        limit: int,
        initial_concurrency: int,
        message_rate: tuple[float, float],
        connect_rate_per_s: float,
        now: float,
    ) -> Self:
        """A site seen for the first time: a window of initial_concurrency (at most LIMIT), both buckets full."""
        count, per = message_rate
        return cls(
            key, route, limit, float(min(limit, initial_concurrency)), message_rate,
            messages=Bucket.full(count / per if count > 0 else 0.0, now, burst=count),
            connects=Bucket.full(connect_rate_per_s, now),
        )  # fmt: skip

    # -- next hops and limits --------------------------------------------------------------------

    def add_route(self, domain: str, route: Route) -> None:
        """DOMAIN's mail goes to ROUTE's next hop (new, or its addresses changed: new connections use them)."""
        hop = route.next_hop
        if self.hop_of.get(domain) != hop:
            self.hop_of[domain] = hop
        if self.routes.get(hop) != route:
            self.routes[hop] = route
            self.route = route

    def route_of(self, job: Job) -> Route:
        return self.routes.get(self.hop_of.get(job.domain, ""), self.route)

    def set_limits(self, limits: Limits, now: float) -> None:
        """The site's limits from now (automation lowered them, or its change ended): a lower
        connection limit shrinks the window at once, a higher one is climbed to by slow start."""
        self.limit = limits.connection_limit
        self.window = min(self.window, float(self.limit))
        self.messages_per_connection = limits.messages_per_connection
        self.recipients_per_connection = limits.recipients_per_connection
        self.recipients_per_transaction = limits.recipients_per_transaction
        if limits.rate != self.message_rate:
            count, per = self.message_rate = limits.rate
            self.messages = Bucket.full(count / per if count > 0 else 0.0, now, burst=count)

    # -- the jobs ------------------------------------------------------------------------------

    def admit(self, now: float) -> bool:
        """Whether a job may join the queue: False while the site is dead (the job is deferred
        with last_failure). A site whose backoff has passed is alive again with a window of one."""
        if self.dead_until:
            if now < self.dead_until:
                return False
            self.revive()
        return True

    def push(self, job: Job, *, join: bool, max_recipients: int) -> bool:
        """Queue JOB; with JOIN its recipients go into the same message's job already waiting
        when the transaction stays within MAX_RECIPIENTS. True when JOB was queued as a job of its own."""
        if join:
            queued = self.open_jobs.get(job.queue_id)
            if (
                queued is not None
                and len(queued.recipients) + len(job.recipients) <= max_recipients
                and (len(self.routes) <= 1 or self.hop_of.get(queued.domain) == self.hop_of.get(job.domain))
            ):
                queued.recipients.extend(job.recipients)
                return False
            self.open_jobs[job.queue_id] = job
        self.queue.append(job)
        return True

    def pop(self) -> Job:
        job = self.queue.popleft()
        self._taken(job)
        return job

    def take(self, hop: str) -> Job | None:
        """The first job for next hop HOP among the first TAKE_SCAN queued (at a site of one next hop:
        the first job); None when there is none, so a connection to another hop makes way."""
        if len(self.routes) <= 1:
            return self.pop() if self.queue else None
        for i, job in enumerate(itertools.islice(self.queue, TAKE_SCAN)):
            if self.hop_of.get(job.domain) == hop:
                del self.queue[i]
                self._taken(job)
                return job
        return None

    def remove_where(self, held: Callable[[Job], bool]) -> list[Job]:
        """Take every queued job HELD says so out of the queue (a suspension), in order."""
        out = [j for j in self.queue if held(j)]
        if out:
            self.queue = deque(j for j in self.queue if not held(j))
            for job in out:
                self._taken(job)
        return out

    def _taken(self, job: Job) -> None:
        if self.open_jobs.get(job.queue_id) is job:
            del self.open_jobs[job.queue_id]

    # -- connections ---------------------------------------------------------------------------

    def room(self) -> int:
        """How many more connections the window allows (never below one while the site is alive)."""
        return min(self.limit, max(1, int(self.window))) - self.active

    def wants_connection(self) -> bool:
        """A job waits that no connection being opened will take, and the window has room."""
        return len(self.queue) > self.starting and self.room() > 0

    def connect_wait(self, now: float, rate_per_s: float) -> float:
        """Seconds until the site may open another connection (0.0: now, and the token is taken)."""
        return self.connects.take(rate_per_s, now)

    def opening(self) -> None:
        """A connection is being opened: it counts against the window from now."""
        self.active += 1
        self.starting += 1

    def opened(self, ready: bool) -> None:
        """The connection is through its greeting and EHLO (READY) or failed; a ready one brings a
        window raised above a lowered limit back to it."""
        self.starting -= 1
        if ready:
            self.window = min(float(self.limit), self.window)

    def closed(self) -> None:
        self.active -= 1

    def message_wait(self, now: float) -> float:
        """Seconds until the next message may go (0.0: now, and the token is taken)."""
        count, per = self.message_rate
        if count <= 0:
            return 0.0
        return self.messages.take(count / per, now, burst=count)

    # -- feedback ------------------------------------------------------------------------------

    def succeeded(self) -> None:
        """A transaction delivered at least one recipient: the window rises by one, up to the limit."""
        self.delivered += 1
        if self.window < self.limit:
            self.window += 1

    def failed(self, failure: Outcome, now: float, backoff_s: float) -> float | None:
        """A failed session: the window falls by one. At zero, when no other connection is open,
        the site is declared dead until now + BACKOFF_S, which is returned (None: still alive);
        the caller defers every queued job. A backoff of 0 declares it and revives it at once."""
        self.last_failure = failure
        self.window -= 1
        if self.window > 0 or self.active > 1:
            return None
        until = now + backoff_s
        if backoff_s > 0:
            self.dead_until = until
        else:
            self.dead_until, self.window = 0.0, 1.0
        return until

    def dead(self, now: float) -> bool:
        return self.dead_until > now

    def revive(self) -> None:
        """Alive again (the backoff passed, or an operator's retry): one probing connection first."""
        if self.dead_until:
            self.dead_until = 0.0
            self.window = 1.0
