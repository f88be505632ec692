"""Plain counters and fixed-bucket histograms the daemon keeps for /metrics; no I/O, no prometheus_client.

Counting must cost next to nothing on the hot paths: an int or dict increment on the event loop
thread (no lock: nothing else writes them) and, for a histogram, a bisect and a short locked
increment (the store thread observes one). cmcd/admin/metrics.py reads them when Prometheus
scrapes. Label values come from fixed sets or from configuration (tenant names), never from what a
client sent.
"""

from __future__ import annotations

import bisect
import functools
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Concatenate, ParamSpec, Protocol, TypeVar

from cmcd.doors import LISTENERS, Door

T = TypeVar("T")
P = ParamSpec("P")

#: queued to final state: seconds to days (max_lifetime defaults to 5 days)
DELIVERY_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400, 259200, 432000)
#: one store call on the store thread
STORE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

AUTH_RESULTS = ("ok", "failed", "throttled")

#: (text a refusal holds, its reason), first match wins; with "other" these are every reason there is
_REASONS = (
    ("null sender", "null_sender"),
    ("5.1.3", "bad_address"),
    ("Address literals", "bad_address"),
    ("Sender address rejected", "sender_domain"),
    ("Daily quota", "daily_quota"),
    ("Rate limit", "rate_limit"),
    ("Too many recipients", "too_many_recipients"),
    ("suppression list", "suppressed"),
    ("no From: header", "no_from"),
    ("From: header rejected", "from_domain"),
    ("Could not write the message to the queue", "spool_failed"),
    ("5.3.4", "too_big"),
    ("5.6.0", "bad_content"),
    ("queue's disk is nearly full", "spool_low"),
    ("Too many hops", "mail_loop"),
    ("tenant is being deleted", "tenant_deleted"),
    ("4.3.1", "busy"),
)
REJECT_REASONS = (*dict.fromkeys(reason for _, reason in _REASONS), "other")


def reject_reason(reply: str) -> str:
    """The short, fixed label of a refusal REPLY ("other" for one this table does not know)."""
    for needle, reason in _REASONS:
        if needle in reply:
            return reason
    return "other"


class Histogram:
    """Observations counted into fixed buckets (upper bounds, inclusive, as Prometheus's le) and summed."""

    def __init__(self, bounds: Iterable[float]):
        self.bounds = tuple(float(b) for b in bounds)
        self._counts = [0] * (len(self.bounds) + 1)  # the last one is above every bound (+Inf)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def timed(self, fn: Callable[[], T]) -> T:
        """Run FN and observe how long it took (also when it raises)."""
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.observe(time.perf_counter() - start)

    def snapshot(self) -> tuple[list[tuple[float, int]], float]:
        """([(upper bound, cumulative count), ..., (inf, total)], sum), consistent with each other."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), counts):
            running += n
            out.append((bound, running))
        return out, total


class IntakeStats:
    """What came in: SMTP connections, AUTH results, messages accepted per tenant, refusals by reason.

    Written on the event loop thread only.
    """

    def __init__(self) -> None:
        self.smtp_connections = 0
        self.auth = dict.fromkeys(AUTH_RESULTS, 0)
        self.accepted: dict[str, int] = {}  # tenant name -> messages
        self.rejected = dict.fromkeys(REJECT_REASONS, 0)
        self.api_requests: dict[tuple[str, str], int] = {}  # (route, status code) -> requests
        self.smtp_write_timeouts = 0  # sessions reset because the client stopped reading replies
        self.api_write_timeouts = 0  # API connections reset because the client stopped reading
        #: per listener: its connection caps, and connections refused and timed out (cmcd/doors.py)
        self.doors = {name: Door(name, 0) for name in LISTENERS}

    def api_request(self, route: str, status: int) -> None:
        key = (route, str(status))
        self.api_requests[key] = self.api_requests.get(key, 0) + 1

    def authenticated(self, ok: bool, *, throttled: bool) -> None:
        self.auth["ok" if ok else "throttled" if throttled else "failed"] += 1

    def accept(self, tenant: str) -> None:
        self.accepted[tenant] = self.accepted.get(tenant, 0) + 1

    def refused(self, reply: str | None) -> None:
        """Count REPLY (a refusal; None or a 2xx reply is not one) under its reason."""
        if reply and not reply.startswith("2"):
            self.rejected[reject_reason(reply)] += 1


class _Counted(Protocol):
    stats: IntakeStats


S = TypeVar("S", bound=_Counted)


def counts_refusals(fn: Callable[Concatenate[S, P], str | None]) -> Callable[Concatenate[S, P], str | None]:
    """Decorates a check that returns a refusal or None: each refusal is counted in self.stats."""

    @functools.wraps(fn)
    def check(self: S, /, *args: P.args, **kwargs: P.kwargs) -> str | None:
        reply = fn(self, *args, **kwargs)
        self.stats.refused(reply)
        return reply

    return check


def counts_refusals_async(
    fn: Callable[Concatenate[S, P], Awaitable[str]],
) -> Callable[Concatenate[S, P], Awaitable[str]]:
    """counts_refusals for a coroutine whose reply is 2xx on success."""

    @functools.wraps(fn)
    async def check(self: S, /, *args: P.args, **kwargs: P.kwargs) -> str:
        reply = await fn(self, *args, **kwargs)
        self.stats.refused(reply)
        return reply

    return check
