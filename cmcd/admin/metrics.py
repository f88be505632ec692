"""Prometheus metrics on a loopback HTTP listener; reads what the daemon already counts, counts nothing itself.

GET /metrics is answered on the event loop from plain counters (cmcd/stats.py, the delivery
engine's counts and sites, the scheduler) through a custom collector, so the hot paths never
touch prometheus_client. The queue figures (recipients by state, the oldest message, spool
bytes) come from the spool (Spool.figures, on a reader thread of their own): a large queue
neither blocks the event loop nor delays delivery's body reads. That read is repeated at most
every max(MIN_REFRESH_S, REFRESH_COST x its last duration) seconds (a 0.2 s count of a million
rows: every 10 s); scrapes in between see the figures cached.

Settings: [metrics] listen = "host:port" ("" = off). By default plain HTTP with no
authentication, for loopback (it shows tenant names and destination hosts, never addresses).
Off loopback, do as the Prometheus exporters' web-config does: tls_cert and tls_key serve
HTTPS, and basic_auth_users (login -> scrypt hash, from "cmcd hash-password") makes every
request send HTTP basic auth. A password is checked with scrypt off the event loop, one check
at a time; a credential that passed is remembered (as an HMAC under a key of this process) so
a scrape every few seconds costs no scrypt.

HTTP is aiohttp's (its low-level server: no router, one handler) behind the API's front door
(cmcd/api/frontdoor.py): a connection is admitted under [metrics] max_connections before any
TLS byte is read, and its TLS handshake, its request line and headers, and the reading of the
response each must end within [metrics] header_timeout (reset and counted in
cmcd_listener_timeouts_total otherwise). One request per connection ("Connection: close").
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import heapq
import hmac
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass

from aiohttp import web, web_response
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from cmcd import __version__, crypto
from cmcd.admin.retention import BlockExpiryJob
from cmcd.api.frontdoor import Connection, FrontDoor
from cmcd.config import Config, split_hostport
from cmcd.deliver.engine import DeliveryEngine
from cmcd.doors import Door
from cmcd.queue.manage import QueueFigures
from cmcd.queue.scheduler import Scheduler
from cmcd.queue.spool import Spool
from cmcd.records import PENDING_STATES, RESULT_STATES
from cmcd.stats import Histogram
from cmcd.submit.service import SubmitService

log = logging.getLogger("cmcd.metrics")

#: destination sites shown by name in cmcd_destination_connections; the rest are summed as "_other"
TOP_SITES = 20
MIN_REFRESH_S = 1.0
REFRESH_COST = 50.0
BACKLOG = 128
#: aiohttp's logger for the listener's connections (a malformed request is one line, not a traceback)
HTTP_LOG = "cmcd.metrics.http"
SERVER_HEADER = "cmcd"  # no versions (what the API says too)
MAX_REMEMBERED = 64  # credentials that passed, remembered so a scrape costs no scrypt
MAX_LINE_BYTES = 4096  # the request line and each header line
MAX_HEADERS = 32


@dataclass(frozen=True)
class Timers:
    """The listener's waits for its front door (cmcd.api.frontdoor.Timers), in seconds."""

    handshake_timeout: float
    header_timeout: float
    keepalive_timeout: float


def _buckets(hist: Histogram) -> tuple[list[tuple[str, float]], float]:
    cumulative, total = hist.snapshot()
    return [("+Inf" if math.isinf(b) else repr(b), float(n)) for b, n in cumulative], total


class DaemonCollector(Collector):
    """Turns the daemon's counters into metric families at each scrape; every read is O(1) but
    the destination sites (one pass over them for the busiest TOP_SITES)."""

    def __init__(
        self,
        *,
        service: SubmitService,
        engine: DeliveryEngine,
        scheduler: Scheduler,
        queue: Callable[[], QueueFigures],
        backup_last_success: Callable[[], float],
        clock: Callable[[], float],
        webhooks: Callable[[], dict[str, int]] = dict,
        streams: Callable[[], dict[tuple[str, str], int]] = dict,
        block_expiry: Callable[[], BlockExpiryJob | None] = lambda: None,
    ):
        self.service = service
        self.block_expiry = block_expiry  # the hourly removal of blocks past their watch period (host jobs' worker)
        self.engine = engine
        self.scheduler = scheduler
        self.queue = queue
        self.backup_last_success = backup_last_success
        self.clock = clock
        self.webhooks = webhooks
        self.streams = streams

    def collect(self) -> Iterator[Metric]:
        stats = self.service.stats
        now = self.clock()

        info = GaugeMetricFamily("cmcd_build_info", "cmcd's version (always 1).", labels=["version"])
        info.add_metric([__version__], 1)
        yield info

        yield CounterMetricFamily(
            "cmcd_smtp_connections", "SMTP connections opened by clients (refused ones too).", stats.smtp_connections
        )
        auth = CounterMetricFamily("cmcd_smtp_auth", "SMTP AUTH attempts by result.", labels=["result"])
        for result, n in stats.auth.items():
            auth.add_metric([result], n)
        yield auth
        accepted = CounterMetricFamily(
            "cmcd_messages_accepted", "Messages accepted (250 after DATA) by tenant.", labels=["tenant"]
        )
        for tenant, n in sorted(stats.accepted.items()):
            accepted.add_metric([tenant], n)
        yield accepted
        rejected = CounterMetricFamily(
            "cmcd_messages_rejected", "Refusals at MAIL, RCPT and end of data by reason.", labels=["reason"]
        )
        for reason, n in stats.rejected.items():
            rejected.add_metric([reason], n)
        yield rejected
        api = CounterMetricFamily(
            "cmcd_api_requests", "Tenant API requests by route and HTTP status.", labels=["route", "code"]
        )
        for (route, code), n in sorted(stats.api_requests.items()):
            api.add_metric([route, code], n)
        yield api
        yield CounterMetricFamily(
            "cmcd_smtp_write_timeouts",
            "SMTP sessions reset because the client stopped reading replies ([smtp] write_timeout).",
            stats.smtp_write_timeouts,
        )
        yield CounterMetricFamily(
            "cmcd_api_write_timeouts",
            "API connections reset because the client stopped reading a response ([api] write_timeout).",
            stats.api_write_timeouts,
        )
        unsubscribes = CounterMetricFamily(
            "cmcd_unsubscribes", "One-click unsubscribe requests (RFC 8058 POSTs) by result.", labels=["result"]
        )
        for result, n in stats.unsubscribes.items():
            unsubscribes.add_metric([result], n)
        yield unsubscribes
        yield from listener_families(stats.doors)
        hooks = self.webhooks()
        events = CounterMetricFamily(
            "cmcd_webhook_events",
            "Mail events posted to tenants' webhooks, or dropped after retrying.",
            labels=["result"],
        )
        for result in ("sent", "dropped"):
            events.add_metric([result], hooks.get(result, 0))
        yield events
        yield CounterMetricFamily(
            "cmcd_webhook_failures",
            "Webhook requests that failed (status, timeout, refused address).",
            hooks.get("failed", 0),
        )

        deliveries = CounterMetricFamily(
            "cmcd_deliveries", "Delivery attempt outcomes per recipient by result.", labels=["result"]
        )
        counts = self.engine.counts
        for result in RESULT_STATES:
            deliveries.add_metric([result], counts.get(result, 0))
        yield deliveries
        by_stream = CounterMetricFamily(
            "cmcd_stream_events",
            "Mail-log events by message stream (transactional, broadcast): accepted (one a recipient) and "
            "each delivery outcome, counted as they reach the mail log.",
            labels=["stream", "event"],
        )
        for (stream, event), n in sorted(self.streams().items()):
            by_stream.add_metric([stream, event], n)
        yield by_stream
        buckets, total = _buckets(self.engine.delivery_seconds)
        yield HistogramMetricFamily(
            "cmcd_delivery_seconds", "Seconds from acceptance to a final state, per recipient.", buckets, total
        )

        figures = self.queue()
        recipients = GaugeMetricFamily("cmcd_queue_recipients", "Queued recipients by state.", labels=["state"])
        for state in PENDING_STATES:
            recipients.add_metric([state], figures.recipients.get(state, 0))
        yield recipients
        oldest = 0.0 if figures.oldest_received is None else max(0.0, now - figures.oldest_received)
        yield GaugeMetricFamily(
            "cmcd_queue_oldest_seconds", "Age of the oldest message in the queue (held ones aside).", oldest
        )
        yield GaugeMetricFamily("cmcd_spool_bytes", "Bytes of the spool database and its WAL.", figures.spool_bytes)
        outbox = GaugeMetricFamily(
            "cmcd_outbox_backlog",
            "Log rows waiting in the spool's outbox for the store (mail: mail-log events; login, ops: "
            "rows the store could not take when they happened).",
            labels=["kind"],
        )
        for kind in ("mail", "login", "ops"):
            outbox.add_metric([kind], figures.outbox.get(kind, 0))
        yield outbox
        yield GaugeMetricFamily(
            "cmcd_scheduler_inflight_recipients",
            "Recipients handed to delivery, not yet done.",
            self.scheduler.inflight,
        )

        yield GaugeMetricFamily(
            "cmcd_delivery_connections", "Outbound SMTP connections open now.", self.engine.connections
        )
        sites = self.engine.sites.values()
        busy = [s for s in sites if s.active > 0]
        top = heapq.nlargest(TOP_SITES, busy, key=lambda s: (s.active, s.key))
        per_site = GaugeMetricFamily(
            "cmcd_destination_connections",
            f'Outbound connections per destination site, for the {TOP_SITES} busiest; the rest as site="_other".',
            labels=["site"],
        )
        for site in top:
            per_site.add_metric([site.key], site.active)
        if len(busy) > len(top):
            per_site.add_metric(["_other"], sum(s.active for s in busy) - sum(s.active for s in top))
        yield per_site
        yield GaugeMetricFamily(
            "cmcd_destinations_dead",
            "Destination sites backed off as dead (every connection failed).",
            self.engine.dead_sites(),
        )
        failures = CounterMetricFamily(
            "cmcd_delivery_session_failures",
            "Outbound sessions that ended before a transaction completed, by stage "
            "(connect, hello: greeting/EHLO/STARTTLS, ready: 421 or close after EHLO, transaction).",
            labels=["stage"],
        )
        for stage, n in self.engine.session_failures.items():
            failures.add_metric([stage], n)
        yield failures
        yield CounterMetricFamily(
            "cmcd_delivery_connect_throttled",
            "Times new connections to a site waited for delivery.connect_rate_limit.",
            self.engine.connect_throttled,
        )
        loops = CounterMetricFamily(
            "cmcd_mail_loops",
            "Messages stopped as mail loops: too many Received: fields at intake or before delivery, "
            "or a next hop that is cmcd itself.",
            labels=["check"],
        )
        loops.add_metric(["hops_intake"], self.service.loops_refused)
        loops.add_metric(["hops_delivery"], self.engine.loops["hops"])
        loops.add_metric(["own_address"], self.engine.loops["own_address"])
        yield loops
        alerts = CounterMetricFamily(
            "cmcd_tenant_bounce_alerts",
            "Bounces of a class whose block action is alert (authentication, spam_block by default): "
            "never suppressed, a sign the tenant's mail itself is refused ([bounces] actions).",
            labels=["tenant", "class"],
        )
        names = self.service.directory.snapshot.tenant_names
        for (tenant_id, cls), n in sorted(self.engine.bounce_alerts.items()):
            alerts.add_metric([names.get(tenant_id, str(tenant_id)), cls], n)
        yield alerts
        expiry = self.block_expiry()
        yield CounterMetricFamily(
            "cmcd_blocks_expired",
            "Blocks (suppressions a bounce made) removed because their watch period ended ([bounces] watch_period).",
            expiry.expired if expiry is not None else 0,
        )
        yield CounterMetricFamily(
            "cmcd_block_expiry_failures",
            "Hourly block-expiry runs that failed (the store could not be written; the next run catches up).",
            expiry.failures if expiry is not None else 0,
        )
        yield from shaping_families(self.engine)
        yield CounterMetricFamily(
            "cmcd_delivery_possible_duplicates",
            "Recipients that may have been delivered twice: a failure after the whole message was sent, "
            "or in flight when the daemon last died.",
            self.engine.possible_duplicates,
        )

        yield GaugeMetricFamily(
            "cmcd_backup_last_success_timestamp_seconds",
            "When the last backup succeeded (Unix time; 0: none known).",
            self.backup_last_success(),
        )
        directory = self.service.directory
        yield GaugeMetricFamily(
            "cmcd_directory_version",
            "The store's directory version this process's tenancy caches were last read at.",
            directory.snapshot.version,
        )
        yield CounterMetricFamily(
            "cmcd_directory_reloads", "Full reloads of the in-memory tenancy directory.", directory.reloads
        )
        yield CounterMetricFamily(
            "cmcd_directory_refresh_failures",
            "Directory version checks or reloads that failed (the caches stay as they were; retried at the next poll).",
            directory.refresh_failures,
        )
        leases = self.service.leases
        reservations = CounterMetricFamily(
            "cmcd_quota_lease_reservations",
            "Blocks of tenants' daily quotas reserved from the store, one store round trip each, by result "
            "(full, short: less than asked, none: the quota is used up, failed: the store did not answer).",
            labels=["result"],
        )
        for result, n in leases.reservations.items():
            reservations.add_metric([result], n)
        yield reservations
        lease_messages = CounterMetricFamily(
            "cmcd_quota_lease_messages",
            "Messages of daily quotas reserved from the store in blocks, and returned unused at shutdown.",
            labels=["direction"],
        )
        lease_messages.add_metric(["reserved"], leases.reserved_messages)
        lease_messages.add_metric(["returned"], leases.returned_messages)
        yield lease_messages
        buckets, total = _buckets(self.service.astore.call_seconds)
        yield HistogramMetricFamily(
            "cmcd_store_write_seconds", "Seconds each store call took on the store thread.", buckets, total
        )


def shaping_families(engine: DeliveryEngine) -> Iterator[Metric]:
    """Provider shaping (cmcd/shaping.py): automation changes started and ended, those in force, the
    connection limit of each shaped site now (a worker's share: the host's is their sum), held mail."""
    actions = CounterMetricFamily(
        "cmcd_shaping_actions",
        "Automation changes started by provider, rule and action (limit, suspend, suspend_tenant), "
        'and their ends (action="restore").',
        labels=["provider", "rule", "action"],
    )
    for (provider, rule, action), n in sorted(engine.shaping_actions.items()):
        actions.add_metric([provider, rule, action], n)
    yield actions
    active = GaugeMetricFamily(
        "cmcd_shaping_changes",
        "Automation changes in force now, by provider and action.",
        labels=["provider", "action"],
    )
    counts: dict[tuple[str, str], int] = {}
    for change in engine.automation.active.values():
        key = (change.provider or "-", change.action)
        counts[key] = counts.get(key, 0) + 1
    for (provider, action), n in sorted(counts.items()):
        active.add_metric([provider, action], n)
    yield active
    shaped = {c.site for c in engine.automation.active.values()}
    limits = GaugeMetricFamily(
        "cmcd_shaping_connection_limit",
        "The connection limit in force at each shaped site (a provider's, or one automation changed).",
        labels=["site"],
    )
    for site in sorted(engine.sites.values(), key=lambda s: s.key):
        if site.provider or site.key in shaped:
            limits.add_metric([site.key], site.limit)
    yield limits
    yield CounterMetricFamily(
        "cmcd_shaping_held_recipients",
        "Recipients deferred by a suspension: no attempt counted, never expired or bounced because of it.",
        engine.held,
    )


class QueueFiguresCache:
    """The spool's queue figures, read again at most every max(MIN_REFRESH_S, REFRESH_COST x the
    last read's duration) seconds; concurrent scrapes wait for one read together."""

    def __init__(self, spool: Spool):
        self.spool = spool
        self.figures = QueueFigures()
        self._read_at = -math.inf  # time.monotonic() of the last queue read
        self._read_cost_s = 0.0
        self._reading: asyncio.Task[None] | None = None

    def current(self) -> QueueFigures:
        return self.figures

    async def refresh(self) -> None:
        if self._reading is None:
            if time.monotonic() - self._read_at < max(MIN_REFRESH_S, REFRESH_COST * self._read_cost_s):
                return
            self._reading = asyncio.get_running_loop().create_task(self._read())
        await asyncio.shield(self._reading)

    async def close(self) -> None:
        if self._reading is not None:
            await asyncio.gather(self._reading, return_exceptions=True)

    async def _read(self) -> None:
        start = time.monotonic()
        try:
            self.figures = await self.spool.figures()
        except Exception:  # a failed read keeps the last figures; the next scrape tries again
            log.exception("event=metrics_queue_read_failed")
        finally:
            self._read_at = time.monotonic()
            self._read_cost_s = self._read_at - start
            self._reading = None


def daemon_registry(
    *,
    service: SubmitService,
    engine: DeliveryEngine,
    scheduler: Scheduler,
    queue: QueueFiguresCache,
    backup_last_success: Callable[[], float] = lambda: 0.0,
    clock: Callable[[], float] = time.time,
    webhooks: Callable[[], dict[str, int]] = dict,
    streams: Callable[[], dict[tuple[str, str], int]] = dict,
    block_expiry: Callable[[], BlockExpiryJob | None] = lambda: None,
) -> CollectorRegistry:
    """The registry of one cmcd process's metrics."""
    registry = CollectorRegistry()
    registry.register(
        DaemonCollector(
            service=service, engine=engine, scheduler=scheduler, queue=queue.current,
            backup_last_success=backup_last_success, clock=clock, webhooks=webhooks, streams=streams,
            block_expiry=block_expiry,
        )
    )  # fmt: skip
    return registry


class MetricsServer:
    """Serves REGISTRY on [metrics] listen (nothing when it is empty); REFRESH runs before each scrape."""

    def __init__(
        self,
        config: Config,
        *,
        registry: CollectorRegistry,
        door: Door,
        refresh: Callable[[], Awaitable[None]] | None = None,
        max_connections: int | None = None,
    ):
        self.listen = config.metrics.listen
        #: scrapes at once: [metrics] max_connections, cut by the daemon to its share of descriptors
        self.door = door
        self.door.max_total = config.metrics.max_connections if max_connections is None else max_connections
        m = config.metrics
        #: the TLS handshake, the request's headers and the reading of the response: each within header_timeout
        self.timers = Timers(m.header_timeout, m.header_timeout, m.header_timeout)
        self._tls = (
            crypto.server_tls_context(str(config.path(m.tls_cert)), str(config.path(m.tls_key)))
            if m.listen and m.tls_cert
            else None
        )
        self._users = dict(m.basic_auth_users)  # login -> scrypt hash; empty: no authentication
        self._passed: set[bytes] = set()  # HMACs of Authorization values that passed
        self._cache_key = os.urandom(32)
        self._checking = asyncio.Lock()  # one scrypt (32 MiB) at a time
        self._dummy_hash = ""  # checked for an unknown login, so it costs what a known one does
        self.registry = registry
        self._refresh = refresh
        self.bound: list[str] = []
        self._front: FrontDoor | None = None
        self._runner: web.ServerRunner | None = None

    async def start(self) -> None:
        if not self.listen:
            return
        host, port = split_hostport(self.listen)
        # aiohttp's own answers before our handler (400 for a malformed request line) take its
        # default Server value, which names Python's and aiohttp's versions: make that ours too
        web_response.SERVER_SOFTWARE = SERVER_HEADER
        # a scrape is one short request: at most 32 header lines of 4 KiB (aiohttp's defaults
        # would let each connection hold ~1 MiB of headers)
        server = web.Server(
            self._handle, access_log=None, logger=logging.getLogger(HTTP_LOG),
            max_line_size=MAX_LINE_BYTES, max_field_size=MAX_LINE_BYTES, max_headers=MAX_HEADERS,
        )  # fmt: skip
        self._runner = web.ServerRunner(server, shutdown_timeout=self.timers.header_timeout)
        await self._runner.setup()
        self._front = FrontDoor(self.door, self._tls, server, lambda: self.timers, server_log=HTTP_LOG)
        port = await self._front.start(host, port, backlog=BACKLOG)
        self.bound.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        log.info("event=metrics_listening listen=%s", ",".join(self.bound))

    async def close(self) -> None:
        if self._front is not None:
            await self._front.close()
            self._front = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- HTTP ----------------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """aiohttp's handler for every request: the Connection's timers told, one answer, then close."""
        transport = request.transport
        conn = transport.get_protocol() if transport is not None else None
        if isinstance(conn, Connection):
            conn.request_started()  # the headers are in: no timer while it is answered
        try:
            try:
                status, headers, body = await self.respond(request.method, request.path, request.headers)
            except Exception:  # a bug here must not leave the scraper waiting for its timeout
                log.exception("event=metrics_scrape_failed")
                status, headers, body = 500, *_text(b"cmcd could not collect its metrics\n")
            response = web.Response(status=status, headers=headers, body=body)  # no body for HEAD: aiohttp's
            response.headers["Server"] = SERVER_HEADER
            response.force_close()
            return response
        finally:
            if isinstance(conn, Connection):
                conn.request_done()  # the response must be read within keepalive_timeout (header_timeout)

    async def respond(
        self, method: str, path: str, request_headers: Mapping[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) for one request (aiohttp leaves out the body of a HEAD answer)."""
        if self._users and not await self._authorized(request_headers.get("Authorization", "")):
            headers, body = _text(UNAUTHORIZED)
            headers["WWW-Authenticate"] = 'Basic realm="cmcd metrics", charset="UTF-8"'
            return 401, headers, body
        if path not in ("/metrics", "/"):
            return 404, *_text(NOT_FOUND)
        if method not in ("GET", "HEAD"):
            return 405, {"Allow": "GET, HEAD"}, b""
        if path == "/":
            return 200, *_text(INDEX)
        if self._refresh is not None:
            await self._refresh()
        encoder, content_type = choose_encoder(request_headers.get("Accept", ""))
        return 200, {"Content-Type": content_type}, encoder(self.registry)

    async def _authorized(self, authorization: str) -> bool:
        """Whether AUTHORIZATION ("Basic base64(login:password)") names a basic_auth_users login
        with its password."""
        scheme, _, blob = authorization.partition(" ")
        if scheme.lower() != "basic" or not blob.strip():
            return False
        seen = hmac.new(self._cache_key, blob.strip().encode("latin-1"), hashlib.sha256).digest()
        if seen in self._passed:
            return True
        try:
            login, sep, password = base64.b64decode(blob.strip(), validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        if not sep:
            return False
        async with self._checking:
            ok = await asyncio.to_thread(self._check, login, password)
        if ok:
            if len(self._passed) >= MAX_REMEMBERED:
                self._passed.clear()
            self._passed.add(seen)
        return ok

    def _check(self, login: str, password: str) -> bool:
        """scrypt, on a thread: the login's hash, or a dummy one for an unknown login."""
        stored = self._users.get(login)
        if stored is None:
            if not self._dummy_hash:
                self._dummy_hash = crypto.dummy_hash()
            crypto.verify_password(password, self._dummy_hash)
            return False
        return crypto.verify_password(password, stored)


def listener_families(doors: dict[str, Door]) -> Iterator[Metric]:
    """Per listener (smtp, api, metrics): connections refused and timed out; open and allowed (HTTP ones).
    A process reports the doors it holds; a supervisor reports its own metrics listener's this way and
    the merge puts them in place of its workers' (cmcd/daemon/merge.py)."""
    refused = CounterMetricFamily(
        "cmcd_listener_connections_refused",
        "Connections closed unserved, by listener and reason (max_connections, max_connections_per_ip; "
        "descriptors: accept() found none left).",
        labels=["listener", "reason"],
    )
    timeouts = CounterMetricFamily(
        "cmcd_listener_timeouts",
        "Connections closed because a wait on the client ran out, by listener and phase (handshake, "
        "headers, body, idle for HTTP; command, data for SMTP).",
        labels=["listener", "phase"],
    )
    open_now = GaugeMetricFamily(
        "cmcd_listener_connections", "Open connections of the HTTP listeners.", labels=["listener"]
    )
    allowed = GaugeMetricFamily(
        "cmcd_listener_max_connections",
        "Connections each listener may hold: its configured cap, cut at start to its share of descriptors.",
        labels=["listener"],
    )
    for name, door in doors.items():
        for reason, n in door.refused.items():
            refused.add_metric([name, reason], n)
        for phase, n in door.timeouts.items():
            timeouts.add_metric([name, phase], n)
        if name != "smtp":  # SMTP's sessions are in cmcctl status
            open_now.add_metric([name], door.open)
            allowed.add_metric([name], door.max_total)
    yield from (refused, timeouts, open_now, allowed)


NOT_FOUND = b"not found; cmcd's metrics are at /metrics\n"
UNAUTHORIZED = b"unauthorized: [metrics] basic_auth_users is set; send HTTP basic auth\n"
INDEX = b"cmcd: metrics are at /metrics\n"


def _text(body: bytes) -> tuple[dict[str, str], bytes]:
    return {"Content-Type": "text/plain; charset=utf-8"}, body
