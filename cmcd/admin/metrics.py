"""Prometheus metrics on a loopback HTTP listener; reads what the daemon already counts, counts nothing itself.

GET /metrics is answered on the event loop from plain counters (cmcd/stats.py, the delivery
engine's counts and sites, the scheduler) through a custom collector, so the hot paths never
touch prometheus_client. The queue figures (recipients by state, the oldest message, spool
bytes) come from the spool database, read on a thread of this module's own with its own
read-only connection: a large queue neither blocks the event loop nor delays delivery's body
reads. That read is repeated at most every max(MIN_REFRESH_S, REFRESH_COST x its last duration)
seconds (a 0.2 s count of a million rows: every 10 s); scrapes in between see the figures cached.

Settings: [metrics] listen = "host:port" ("" = off). By default plain HTTP with no
authentication, for loopback (it shows tenant names and destination hosts, never addresses).
Off loopback, do as the Prometheus exporters' web-config does: tls_cert and tls_key serve
HTTPS (the handshake must end within header_timeout; the connection caps count a connection
from the end of its handshake), and basic_auth_users (login -> scrypt hash, from "cmcd
hash-password") makes every request send HTTP basic auth. A password is checked with scrypt off the event loop, one check
at a time; a credential that passed is remembered (as an HMAC under a key of this process) so
a scrape every few seconds costs no scrypt.
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
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from cmcd import __version__, crypto, writeguard
from cmcd.config import Config, split_hostport
from cmcd.deliver.engine import DeliveryEngine
from cmcd.doors import Door
from cmcd.queue.audit import outbox_backlog
from cmcd.queue.scheduler import Scheduler
from cmcd.queue.spool import PENDING, Spool
from cmcd.stats import Histogram
from cmcd.submit.service import SubmitService

log = logging.getLogger("cmcd.metrics")

#: destination sites shown by name in cmcd_destination_connections; the rest are summed as "_other"
TOP_SITES = 20
MIN_REFRESH_S = 1.0
REFRESH_COST = 50.0
REQUEST_TIMEOUT_S = 10.0
MAX_REQUEST_BYTES = 16384
MAX_REMEMBERED = 64  # credentials that passed, remembered so a scrape costs no scrypt
DELIVERY_RESULTS = ("delivered", "deferred", "bounced", "expired", "suppressed")


@dataclass(frozen=True)
class QueueFigures:
    recipients: dict[str, int] = field(default_factory=dict)  # state -> rows
    oldest_received: float | None = None  # epoch seconds of the oldest message not held; None: there is none
    spool_bytes: int = 0  # queue.db and its write-ahead log
    outbox: dict[str, int] = field(default_factory=dict)  # kind (mail, login, ops) -> rows not yet in the store


def read_queue(conn: sqlite3.Connection, path: Path) -> QueueFigures:
    """The queue figures: one count grouped by state, one minimum, two stat calls, the outbox counts."""
    recipients = {state: n for state, n in conn.execute("SELECT state, COUNT(*) FROM recipients GROUP BY state")}
    (oldest,) = conn.execute("SELECT MIN(received) FROM messages WHERE held = 0").fetchone()
    size = 0
    for p in (path, path.with_name(path.name + "-wal")):
        try:
            size += os.stat(p).st_size
        except FileNotFoundError:
            pass
    return QueueFigures(recipients, oldest, size, outbox_backlog(conn))


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
    ):
        self.service = service
        self.engine = engine
        self.scheduler = scheduler
        self.queue = queue
        self.backup_last_success = backup_last_success
        self.clock = clock
        self.webhooks = webhooks

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
        yield from _listener_families(stats.doors)
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
        for result in DELIVERY_RESULTS:
            deliveries.add_metric([result], counts.get(result, 0))
        yield deliveries
        buckets, total = _buckets(self.engine.delivery_seconds)
        yield HistogramMetricFamily(
            "cmcd_delivery_seconds", "Seconds from acceptance to a final state, per recipient.", buckets, total
        )

        figures = self.queue()
        recipients = GaugeMetricFamily("cmcd_queue_recipients", "Queued recipients by state.", labels=["state"])
        for state in PENDING:
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
        buckets, total = _buckets(self.service.astore.call_seconds)
        yield HistogramMetricFamily(
            "cmcd_store_write_seconds", "Seconds each store call took on the store thread.", buckets, total
        )


class MetricsServer:
    """Serves /metrics on [metrics] listen (nothing when it is empty)."""

    def __init__(
        self,
        config: Config,
        *,
        service: SubmitService,
        engine: DeliveryEngine,
        scheduler: Scheduler,
        spool: Spool,
        backup_last_success: Callable[[], float] = lambda: 0.0,
        clock: Callable[[], float] = time.time,
        webhooks: Callable[[], dict[str, int]] = dict,
        max_connections: int | None = None,
    ):
        self.listen = config.metrics.listen
        #: scrapes at once: [metrics] max_connections, cut by the daemon to its share of descriptors
        self.door = service.stats.doors["metrics"]
        self.door.max_total = config.metrics.max_connections if max_connections is None else max_connections
        self.header_timeout = config.metrics.header_timeout
        m = config.metrics
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
        self.spool_path = spool.path
        self.registry = CollectorRegistry()
        self.registry.register(
            DaemonCollector(
                service=service, engine=engine, scheduler=scheduler, queue=lambda: self._figures,
                backup_last_success=backup_last_success, clock=clock, webhooks=webhooks,
            )
        )  # fmt: skip
        self.bound: list[str] = []
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics")
        self._conn: sqlite3.Connection | None = None
        self._figures = QueueFigures()
        self._read_at = -math.inf  # time.monotonic() of the last queue read
        self._read_cost_s = 0.0
        self._reading: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if not self.listen:
            return
        host, port = split_hostport(self.listen)
        # TLS (metrics.tls_cert) is done by the loop before _client runs, within header_timeout. Not
        # writer.start_tls() after admission: under uvloop a ClientHello read before it is lost.
        self._server = await asyncio.start_server(
            self._client, host, port, limit=MAX_REQUEST_BYTES, reuse_address=True,
            ssl=self._tls, ssl_handshake_timeout=self.header_timeout if self._tls else None,
        )  # fmt: skip
        for sock in self._server.sockets:
            name = sock.getsockname()
            self.bound.append(f"[{name[0]}]:{name[1]}" if ":" in name[0] else f"{name[0]}:{name[1]}")
        log.info("event=metrics_listening listen=%s", ",".join(self.bound))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._clients):
                task.cancel()
            await asyncio.gather(*self._clients, return_exceptions=True)
            await self._server.wait_closed()
        if self._reading is not None:
            await asyncio.gather(self._reading, return_exceptions=True)
        if self._conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._close_conn)
        self._executor.shutdown(wait=True)

    # -- the queue figures ---------------------------------------------------------------------

    async def refresh(self) -> None:
        """Read the queue figures again unless the last read is recent for its cost; concurrent
        scrapes wait for one read together."""
        if self._reading is None:
            if time.monotonic() - self._read_at < max(MIN_REFRESH_S, REFRESH_COST * self._read_cost_s):
                return
            self._reading = asyncio.get_running_loop().create_task(self._read())
        await asyncio.shield(self._reading)

    async def _read(self) -> None:
        start = time.monotonic()
        try:
            self._figures = await asyncio.get_running_loop().run_in_executor(self._executor, self._read_queue)
        except Exception:  # a failed read keeps the last figures; the next scrape tries again
            log.exception("event=metrics_queue_read_failed")
        finally:
            self._read_at = time.monotonic()
            self._read_cost_s = self._read_at - start
            self._reading = None

    def _read_queue(self) -> QueueFigures:
        if self._conn is None:
            self._conn = sqlite3.connect(f"file:{self.spool_path}?mode=ro", uri=True, check_same_thread=False)
        return read_queue(self._conn, self.spool_path)

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- HTTP ----------------------------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        ip = str(peer[0]) if peer else "?"
        if self.door.admit(ip) is not None:  # past metrics.max_connections: reset, counted
            log.warning("event=metrics_conn_refused client_ip=%s open=%d", ip, self.door.open)
            writeguard.reset(writer.transport)
            return
        self._clients.add(task)
        try:
            try:
                # the request line and headers, complete within header_timeout however slowly they come
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.header_timeout)
            except TimeoutError:
                self.door.timed_out("headers")
                log.info("event=metrics_timeout phase=headers client_ip=%s", ip)
                writeguard.reset(writer.transport)
                return
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            try:
                status, headers, body = await self.respond(head.decode("latin-1"))
            except Exception:  # a bug here must not leave the scraper waiting for its timeout
                log.exception("event=metrics_scrape_failed")
                status, headers, body = "500 Internal Server Error", *_text(b"cmcd could not collect its metrics\n")
            lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers.items()), "Connection: close"]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._clients.discard(task)
            self.door.release(ip)
            writer.close()

    async def respond(self, head: str) -> tuple[str, dict[str, str], bytes]:
        """(status, headers, body) for one HTTP request head."""
        request_line, *header_lines = head.split("\r\n")
        parts = request_line.split()
        if len(parts) != 3:
            return "400 Bad Request", {"Content-Length": "0"}, b""
        method, target, _ = parts
        if self._users and not await self._authorized(_header(header_lines, "authorization")):
            headers, body = _text(UNAUTHORIZED)
            headers["WWW-Authenticate"] = 'Basic realm="cmcd metrics", charset="UTF-8"'
            return "401 Unauthorized", headers, body if method != "HEAD" else b""
        path = target.split("?", 1)[0]
        if path not in ("/metrics", "/"):
            return "404 Not Found", *_text(NOT_FOUND)
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", {"Allow": "GET, HEAD", "Content-Length": "0"}, b""
        if path == "/":
            headers, body = _text(INDEX)
            return "200 OK", headers, body if method == "GET" else b""
        accept = _header(header_lines, "accept")
        await self.refresh()
        encoder, content_type = choose_encoder(accept)
        body = encoder(self.registry)
        headers = {"Content-Type": content_type, "Content-Length": str(len(body))}
        return "200 OK", headers, body if method == "GET" else b""

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


def _listener_families(doors: dict[str, Door]) -> Iterator[Metric]:
    """Per listener (smtp, api, metrics): connections refused and timed out; open and allowed (HTTP ones)."""
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


def _header(lines: list[str], wanted: str) -> str:
    """The value of header WANTED (lower case) in LINES, or ""."""
    for line in lines:
        name, _, value = line.partition(":")
        if name.strip().lower() == wanted:
            return value.strip()
    return ""


def _text(body: bytes) -> tuple[dict[str, str], bytes]:
    return {"Content-Type": "text/plain; charset=utf-8", "Content-Length": str(len(body))}, body
