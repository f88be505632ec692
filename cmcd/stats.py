"""Plain counters and fixed-bucket histograms the daemon keeps for /metrics; no I/O, no prometheus_client.

Counting must cost next to nothing on the hot paths: an int or dict increment on the event loop
thread (no lock: nothing else writes them) and, for a histogram, a bisect and a short locked
increment (the store thread observes one). cmcd/admin/metrics.py reads them when Prometheus
scrapes. Label values come from fixed sets or from configuration (tenant names), never from what a
client sent.
"""

from __future__ import annotations

import bisect
import enum
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

from cmcd.doors import LISTENERS, Door
from cmcd.records import STREAMS

T = TypeVar("T")

#: queued to final state: seconds to days (max_lifetime defaults to 5 days)
DELIVERY_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400, 259200, 432000)
#: one store call on the store thread
STORE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

AUTH_RESULTS = ("ok", "failed", "throttled")
#: one-click unsubscribe POSTs (cmcd/api/unsubscribe.py): a new one, a repeat, a token that does not
#: open (or whose tenant is gone), a body or media type RFC 8058 does not send, the store unable to take it
UNSUBSCRIBE_RESULTS = ("done", "repeated", "not_found", "bad_request", "failed")

#: every reason a message is refused for, in the order the metric has always listed them: the
#: values of cmcd.tenancy.refusals.Reason from NULL_SENDER to OTHER (a unit test holds them equal;
#: tenancy sits above this module, so the labels are written out here)
REJECT_REASONS = (
    "null_sender",
    "bad_address",
    "sender_domain",
    "daily_quota",
    "rate_limit",
    "too_many_recipients",
    "suppressed",
    "no_from",
    "from_domain",
    "spool_failed",
    "too_big",
    "bad_content",
    "spool_low",
    "mail_loop",
    "bad_stream",
    "tenant_deleted",
    "busy",
    "other",
)


#: the mail-log events cmcd_stream_events counts per stream: acceptance (one a recipient) and each
#: delivery outcome
STREAM_EVENTS = ("accepted", "delivered", "deferred", "bounced", "expired", "suppressed")


class StreamStats:
    """Mail-log events by (stream, event), counted as the event shipper hands them to the store
    (so the figures are the mail log's). Written on the event loop thread only."""

    def __init__(self) -> None:
        self.events = {(stream, event): 0 for stream in STREAMS for event in STREAM_EVENTS}

    def count(self, stream: str, event: str) -> None:
        key = (stream, event)
        if key in self.events:  # an event of no message (deleted, lost) is not a stream's figure
            self.events[key] += 1


class Reasoned(Protocol):
    """A typed refusal (cmcd.tenancy.refusals.Refusal): what IntakeStats counts it by."""

    @property
    def reason(self) -> enum.Enum: ...


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
        self.unsubscribes = dict.fromkeys(UNSUBSCRIBE_RESULTS, 0)  # one-click POSTs by result
        #: per listener: its connection caps, and connections refused and timed out (cmcd/doors.py)
        self.doors = {name: Door(name, 0) for name in LISTENERS}

    def api_request(self, route: str, status: int) -> None:
        key = (route, str(status))
        self.api_requests[key] = self.api_requests.get(key, 0) + 1

    def authenticated(self, ok: bool, *, throttled: bool) -> None:
        self.auth["ok" if ok else "throttled" if throttled else "failed"] += 1

    def accept(self, tenant: str) -> None:
        self.accepted[tenant] = self.accepted.get(tenant, 0) + 1

    def refused(self, refusal: Reasoned) -> None:
        """Count REFUSAL under its reason (a reason that is no message's is counted as "other")."""
        label = refusal.reason.value
        self.rejected[label if label in self.rejected else "other"] += 1
