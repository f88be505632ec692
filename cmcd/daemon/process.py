"""One cmcd process: wires the whole path of a message together and owns its event loop, signals and
shutdown; no rules. It runs alone ([server] workers = 1) or as worker K of a supervisor (a
WorkerRole): then it opens spool shard K, takes its listening sockets from the supervisor, serves
a private admin socket its supervisor speaks to, and only worker 0 runs what is once per host
(backups, retention, webhook deliveries, finishing a purge cut short).

Start order: store -> queue (spool) -> submit -> scheduler and delivery -> smtp -> admin; shutdown in reverse.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.exposition import generate_latest

from cmcd import __version__, bounces, doors, shaping
from cmcd import config as config_mod
from cmcd.admin.backup_verbs import BackupScheduler
from cmcd.admin.metrics import MetricsServer, QueueFiguresCache, daemon_registry
from cmcd.admin.retention import BlockExpiryJob, RetentionJob
from cmcd.admin.server import AdminServer
from cmcd.admin.verb import Peers
from cmcd.admin.verbs import VERBS
from cmcd.admin.worker_verbs import WORKER_VERBS
from cmcd.api.server import ApiServer
from cmcd.api.webhooks import WebhookDispatcher
from cmcd.config import Config
from cmcd.daemon.logs import sd_notify, watchdog
from cmcd.deliver.engine import DeliveryEngine
from cmcd.deliver.routing import Router, make_resolver
from cmcd.errors import ConfigError, StoreError, UntrustedFileError
from cmcd.listening import Inherited
from cmcd.queue import requests
from cmcd.queue.audit import AuditLog
from cmcd.queue.events import EventShipper
from cmcd.queue.ids import QueueIdGenerator
from cmcd.queue.scheduler import Scheduler
from cmcd.queue.spool import Spool
from cmcd.queue.startup import Opened, lock_shard, open_checked, stranded_shards
from cmcd.shares import share_shaping, worker_share
from cmcd.smtp.listener import SmtpListeners
from cmcd.store import AsyncStore
from cmcd.submit.service import SubmitService
from cmcd.tenancy import Directory, Tenancy

log = logging.getLogger("cmcd")


def worker_socket(config: Config, index: int) -> Path:
    """Worker INDEX's private admin socket: beside admin.socket, for the supervisor (and worker 0) only."""
    path = config.path(config.admin.socket)
    return path.with_name(f"{path.name}.w{index}")


EXIT_SUPERVISOR_GONE = 70


@dataclass
class WorkerRole:
    """What makes a process worker INDEX of WORKERS under a supervisor."""

    index: int
    workers: int
    #: to the supervisor: "READY" is written here once the worker serves; its end means the supervisor is gone
    control: socket.socket
    inherited: Inherited = field(default_factory=lambda: Inherited("{}"))
    #: the other workers (worker 0 reaches them for a purge); None for the others
    peers: Peers | None = None


#: settings read once at start; a SIGHUP reload names them in the log when they changed
RESTART_ONLY = (
    "server.timezone", "server.workers", "smtp.listen", "smtp.listen_tls", "spool.dir", "store.path", "store.key_file",
    "admin.socket", "metrics.listen", "api.listen", "backup.dir", "backup.key_file", "dns.nameservers", "dns.timeout",
    "metrics.tls_cert", "metrics.tls_key", "metrics.basic_auth_users",
    "api.max_connections", "api.max_connections_per_ip", "metrics.max_connections",  # sized with the descriptors at start
)  # fmt: skip


def setting(data: dict[str, Any], path: str) -> Any:
    """The value of PATH ("section.key") in a configuration as read (None: not set)."""
    section, key = path.split(".")
    table = data.get(section)
    return table.get(key) if isinstance(table, dict) else None


def keep_restart_only(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """NEW (a configuration as read) with every RESTART_ONLY setting as in OLD: a running host
    keeps those until it restarts, whatever the file says meanwhile."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in new.items()}
    for path in RESTART_ONLY:
        section, key = path.split(".")
        table = out.setdefault(section, {})
        if not isinstance(table, dict):
            continue
        value = setting(old, path)
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
    return out


def _keeping(old: Config, new: Config, paths: tuple[str, ...]) -> Config:
    """NEW with the settings at PATHS as in OLD."""
    for path in paths:
        section, key = path.split(".")
        kept = getattr(getattr(old, section), key)
        new = dataclasses.replace(new, **{section: dataclasses.replace(getattr(new, section), **{key: kept})})
    return new


def _changed(old: Config, new: Config, paths: tuple[str, ...]) -> list[str]:
    def get(cfg: Config, path: str) -> Any:
        section, key = path.split(".")
        return getattr(getattr(cfg, section), key)

    return [p for p in paths if get(old, p) != get(new, p)]


class Daemon:
    def __init__(
        self,
        config: Config,
        notify_socket: str | None = None,
        config_path: str | None = None,
        accept_loss: bool = False,
        role: WorkerRole | None = None,
    ):
        self.role = role
        self.host_config = config  # as loaded; a worker runs on its share of the host's limits
        self.config = worker_share(config, role.index, role.workers) if role is not None else config
        self.shard = role.index if role is not None else 0
        self._shard_lock: int | None = None
        self.accept_loss = accept_loss  # cmcd serve --accept-loss: a bad spool is set aside, its mail logged lost
        self.config_path = config_path
        self.notify_socket = notify_socket
        self.admin: AdminServer | None = None
        self.backups: BackupScheduler | None = None
        self.started = time.time()
        self.stop_event = asyncio.Event()
        self.smtp: SmtpListeners | None = None
        self.service: SubmitService | None = None
        self.directory: Directory | None = None
        self.tenancy: Tenancy | None = None
        self.spool: Spool | None = None
        self.scheduler: Scheduler | None = None
        self.engine: DeliveryEngine | None = None
        self.api: ApiServer | None = None
        self.webhooks: WebhookDispatcher | None = None
        self.block_expiry: BlockExpiryJob | None = None

    def status(self) -> dict[str, Any]:
        sessions = self.smtp.ctx.sessions if self.smtp else None
        return {
            "version": __version__,
            "pid": os.getpid(),
            "worker": self.role.index if self.role is not None else None,
            "uptime_s": round(time.time() - self.started, 1),
            "sessions": len(sessions.live) if sessions else 0,
            "accepted": self.service.accepted if self.service else 0,
            "spool_commits": self.spool.commits if self.spool else 0,
            "spool_transactions": self.spool.transactions if self.spool else 0,
            "listeners": self.smtp.bound if self.smtp else {},
            # the API's address as bound (api.listen may name port 0): cmcctl evidence probes its TLS
            "api_listener": f"{self.config.api.listen.rpartition(':')[0]}:{self.api.port}" if self.api else "",
            "inflight": self.scheduler.inflight if self.scheduler else 0,
            "outbound_connections": self.engine.connections if self.engine else 0,
            "delivery": dict(self.engine.counts) if self.engine else {},
            "possible_duplicates": self.engine.possible_duplicates if self.engine else 0,
            "outcome_commit_ms": self.engine.commit_window_ms() if self.engine else {},
            "session_failures": dict(self.engine.session_failures) if self.engine else {},
            "connect_throttled": self.engine.connect_throttled if self.engine else 0,
            "loops": (dict(self.engine.loops) if self.engine else {})
            | {"intake": self.service.loops_refused if self.service else 0},
        }

    async def run(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        role = self.role
        host_jobs = role is None or role.index == 0  # once per host: backups, retention, webhooks, purges

        # refuses (UntrustedFileError) a store or spool it cannot trust, before anything listens
        await asyncio.to_thread(self._hold_shard)
        opened = await asyncio.to_thread(
            open_checked, cfg.path(cfg.store.path), cfg.path(cfg.store.key_file), cfg.path(cfg.spool.dir),
            accept_loss=self.accept_loss, now=time.time(), shard=self.shard,
        )  # fmt: skip
        store = opened.store
        astore = AsyncStore(store)
        self.spool = spool = opened.spool
        log_loss(opened, self.accept_loss)
        report = await asyncio.to_thread(spool.recover)
        log.info("event=spool_recovered inflight_requeued=%d", report.inflight_requeued)
        await _reconcile_requests(spool, astore, self.shard, cfg.api.idempotency_ttl)
        spool.start()
        audit = AuditLog(spool, astore)  # login and operation rows: the store, else the spool's outbox
        # the block policy of the configuration in force: a reload changes it for the next rows shipped
        events = EventShipper(spool, astore, audit, blocks=lambda: self.config.bounces.policy())
        events.start()
        self.directory = directory = Directory(astore)
        await directory.start()
        self.tenancy = tenancy = Tenancy(cfg, astore, audit, directory)
        self.service = service = SubmitService(cfg, astore, spool, audit=audit, directory=directory)
        service.ids = QueueIdGenerator(self.shard)  # queue ids name the shard that holds the message
        service.rate_shares = role.workers if role is not None else 1
        service.shard = self.shard
        await service.start()
        self.scheduler = scheduler = Scheduler(
            spool, lambda jobs: engine.submit(jobs), max_inflight=cfg.delivery.max_inflight
        )
        rules = await asyncio.to_thread(bounces.load_rules, bounce_override(cfg))  # a bad file stops start-up
        log.info("event=bounce_rules_loaded rules=%d files=%s", len(rules), ",".join(rules.files))
        shaped = await asyncio.to_thread(shaping.load_shaping, shaping_override(cfg))  # a bad file stops start-up
        log_shaping(shaped)
        self.engine = engine = DeliveryEngine(
            cfg, spool, Router(cfg), service.suppressions,
            release=scheduler.release, wake=scheduler.wake, dsn_off=lambda: service.dsn_off, rules=rules,
            shaping=self._share(shaped), audit=audit, block_actions=lambda t: directory.snapshot.block_actions.get(t),
        )  # fmt: skip
        engine.results.ids = service.ids  # a DSN is queued in this shard too, with ids of the same counter
        spool.on_commit = scheduler.wake
        if report.inflight_requeued:
            # in flight when the last process died: the remote may have said 250 before the outcome was
            # written, so a retry can deliver these a second time (at-least-once)
            engine.possible_duplicates += report.inflight_requeued
            log.warning("event=possible_duplicate reason=restart recipients=%d", report.inflight_requeued)
        engine.start()
        if cfg.delivery.enabled:
            scheduler.start()
        else:
            log.warning("event=delivery_disabled reason=config")
        inherited = role.inherited if role is not None else Inherited("{}")
        self.smtp = smtp = SmtpListeners(cfg, service, inherited)
        await smtp.start()
        engine.router.set_own_listeners(smtp.bound["smtp"] + smtp.bound["smtps"])
        self.backups = backups = BackupScheduler(cfg, cfg.path(cfg.store.path)) if host_jobs else None
        queue_figures = QueueFiguresCache(spool)
        registry = daemon_registry(
            service=service, engine=engine, scheduler=scheduler, queue=queue_figures,
            backup_last_success=lambda: backups.last_success if backups is not None else 0.0,
            webhooks=lambda: self.webhooks.counts if self.webhooks is not None else {},
            streams=lambda: events.streams.events,
            block_expiry=lambda: self.block_expiry,
        )  # fmt: skip

        async def metrics_text() -> bytes:
            await queue_figures.refresh()
            return generate_latest(registry)

        admin = AdminServer(
            cfg, tenancy, spool, self.status, scheduler=scheduler, engine=engine,
            drop_sessions=smtp.ctx.sessions.drop_tenant, intake=service,
            verbs=VERBS if role is None else VERBS | WORKER_VERBS,
            path=worker_socket(cfg, role.index) if role is not None else None, private=role is not None,
            resume_purges=host_jobs, extra={"peers": role.peers if role is not None else None, "metrics_text": metrics_text},
        )  # fmt: skip
        await admin.start()
        self.admin = admin
        fds = _plan_descriptors(cfg)  # the HTTP listeners' caps: their share of the descriptors left
        metrics = MetricsServer(
            cfg, registry=registry, door=service.stats.doors["metrics"], refresh=queue_figures.refresh,
            max_connections=fds.metrics_max_connections,
        )  # fmt: skip
        if role is None:  # a worker's metrics reach /metrics through its supervisor
            await metrics.start()
        resolver = make_resolver(cfg)  # for webhook URLs: dns.nameservers, never another resolver
        if cfg.api.listen:
            self.api = ApiServer(cfg, service, astore, tenancy, resolver, max_connections=fds.api_max_connections)
            await self.api.start(next(iter(inherited.take("api", cfg.api.listen)), None))  # the API: one address
        webhooks = retention = None
        if host_jobs:
            self.webhooks = webhooks = WebhookDispatcher(cfg, astore, resolver, audit=audit)
            webhooks.start()
            retention = RetentionJob(cfg, astore, audit=audit)
            retention.start()
            self.block_expiry = BlockExpiryJob(astore, audit=audit)
            self.block_expiry.start()
            assert backups is not None
            backups.start()

        if role is not None:
            await self._serve_as_worker(role, smtp)
        else:
            await self._serve_alone(smtp)

        smtp.stop_accepting()
        if role is not None:  # the supervisor waits for every worker to stop accepting before it says so
            try:
                role.control.send(b"STOPPING\n")
            except OSError:
                pass
        log.info("event=stopping grace_s=%g", cfg.server.shutdown_grace)
        sd_notify(self.notify_socket, "STOPPING=1")
        await metrics.close()
        await queue_figures.close()
        if self.api is not None:
            await self.api.close()
        if webhooks is not None:
            await webhooks.close()
        await admin.close()
        if retention is not None:
            await retention.close()
        if self.block_expiry is not None:
            await self.block_expiry.close()
        if backups is not None:
            await backups.close()
        await smtp.close(cfg.server.shutdown_grace)
        await scheduler.close()
        await engine.close()
        await service.close()
        await directory.close()
        await events.close()
        await asyncio.to_thread(spool.stop)
        await asyncio.to_thread(astore.close)
        log.info("event=stopped")

    def _hold_shard(self) -> None:
        """Refuse shards no worker would drain; hold this process's shard (released when it ends)."""
        cfg = self.config
        spool_dir = cfg.path(cfg.spool.dir)
        if self.role is None:
            stranded = stranded_shards(spool_dir, 1)
            if stranded:
                raise UntrustedFileError("; ".join(stranded))
        self._shard_lock = lock_shard(spool_dir, self.shard)

    async def _serve_alone(self, smtp: SmtpListeners) -> None:
        cfg = self.config
        log.info(
            "event=ready version=%s pid=%d smtp=%s smtps=%s admin=%s api=%s",
            __version__,
            os.getpid(),
            ",".join(smtp.bound["smtp"]) or "-",
            ",".join(smtp.bound["smtps"]) or "-",
            cfg.path(cfg.admin.socket),
            f"{cfg.api.listen.rpartition(':')[0]}:{self.api.port}" if self.api is not None else "-",
        )
        sd_notify(self.notify_socket, "READY=1")
        pinger = asyncio.get_running_loop().create_task(watchdog(self.notify_socket)) if self.notify_socket else None
        await self.stop_event.wait()
        if pinger is not None:
            pinger.cancel()

    async def _serve_as_worker(self, role: WorkerRole, smtp: SmtpListeners) -> None:
        """Tell the supervisor this worker serves; stop when told to, or when the supervisor is gone."""
        loop = asyncio.get_running_loop()
        log.info(
            "event=worker_ready worker=%d pid=%d shard=%s smtp=%s smtps=%s", role.index, os.getpid(),
            self.spool.path.name if self.spool else "-", ",".join(smtp.bound["smtp"]) or "-",
            ",".join(smtp.bound["smtps"]) or "-",
        )  # fmt: skip
        role.control.setblocking(False)

        def readable() -> None:
            try:
                data = role.control.recv(64)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # the supervisor is gone (kill -9: the kernel's SIGKILL follows a moment later)
                # end now, as that SIGKILL would: no graceful stop (no 421 to clients) in the moment
                # between; the spool is durable and the next worker requeues what was in flight
                log.warning("event=supervisor_gone worker=%d action=exit", role.index)
                os._exit(EXIT_SUPERVISOR_GONE)

        loop.add_reader(role.control.fileno(), readable)
        try:
            await loop.sock_sendall(role.control, b"READY\n")
        except OSError:
            self.stop_event.set()
        await self.stop_event.wait()
        loop.remove_reader(role.control.fileno())

    async def reload(self) -> None:
        """SIGHUP: read the configuration again and apply what can change while running: limits,
        timeouts, routes, the retry schedule and delivery settings, DKIM settings, the TLS
        certificate. Open sessions and connections stay. What only a restart changes is logged."""
        if self.config_path is None:
            log.warning("event=reload_skipped reason=no_config_path")
            return
        try:
            new = await asyncio.to_thread(config_mod.load, self.config_path)
        except ConfigError as exc:
            log.error("event=reload_failed problems=%r", exc.problems)
            return
        stuck = _changed(self.host_config, new, RESTART_ONLY)
        if stuck:
            log.warning("event=reload_needs_restart keys=%s", ",".join(stuck))
        new = _keeping(self.host_config, new, RESTART_ONLY)  # in force until a restart, as the log says
        self.host_config = new
        if self.role is not None:  # this worker's share of the host's limits, from the file as read
            new = worker_share(new, self.role.index, self.role.workers)
        self.config = new
        if self.service is not None:
            self.service.config = new
            self.service.data_budget.limit_bytes = new.smtp.max_data_in_flight
            self.service.dkim.config = new.dkim
            self.service._tenant_limits.clear()
        if self.smtp is not None:
            try:
                await asyncio.to_thread(self.smtp.reload, new)
            except (OSError, ValueError) as exc:
                log.error("event=reload_tls_failed error=%r", str(exc))
        if self.api is not None:
            self.api.config = new
            try:
                await asyncio.to_thread(self.api.reload_certificate)
            except (OSError, ValueError) as exc:
                log.error("event=reload_tls_failed listener=api error=%r", str(exc))
        if self.webhooks is not None:
            self.webhooks.config = new
        if self.engine is not None:
            self.engine.reconfigure(new)
            await self._reload_bounce_rules(new)
            await self._reload_shaping(new)
        if self.scheduler is not None:
            self.scheduler.max_inflight = new.delivery.max_inflight
            self.scheduler.wake()
        if self.admin is not None:
            self.admin.reconfigure(new)
        if self.backups is not None:
            self.backups.config = new
        log.info("event=reloaded config=%s", self.config_path)

    async def _reload_bounce_rules(self, cfg: Config) -> None:
        """The bounce rules read again (off the event loop); a file that cannot be used keeps the rules in force."""
        assert self.engine is not None
        override = bounce_override(cfg)
        try:
            rules = await asyncio.to_thread(bounces.load_rules, override)
        except bounces.BounceRulesError as exc:
            log.error("event=bounce_rules_reload_failed file=%s error=%r", override or bounces.SHIPPED_RULES, str(exc))
            return
        self.engine.set_rules(rules)
        log.info("event=bounce_rules_loaded rules=%d files=%s", len(rules), ",".join(rules.files))

    async def _reload_shaping(self, cfg: Config) -> None:
        """The shaping files read again (off the event loop); a file that cannot be used keeps the shaping in force."""
        assert self.engine is not None
        override = shaping_override(cfg)
        try:
            shaped = await asyncio.to_thread(shaping.load_shaping, override)
        except shaping.ShapingError as exc:
            log.error("event=shaping_reload_failed file=%s error=%r", override or shaping.SHIPPED_SHAPING, str(exc))
            return
        self.engine.set_shaping(self._share(shaped))
        log_shaping(shaped)

    def _share(self, shaped: shaping.Shaping) -> shaping.Shaping:
        """This worker's share of the providers' limits (the whole of them in a single process). A
        limit below the worker count becomes one connection per worker (each worker delivers only its
        own shard's mail, so none can have none): worker 0 says so, once per load, naming each."""
        if self.role is None:
            return shaped
        if self.role.index == 0:
            for p in shaped.providers:
                if 0 < p.limits.connection_limit < self.role.workers:
                    log.warning(
                        "event=limit_below_workers workers=%d limit='shaping provider %s connection_limit %d: "
                        "%d at once'", self.role.workers, p.name, p.limits.connection_limit, self.role.workers,
                    )  # fmt: skip
        return share_shaping(shaped, self.role.index, self.role.workers)


def shaping_override(cfg: Config) -> Path | None:
    """The operator's shaping file ([shaping] override_file), or None."""
    return cfg.path(cfg.shaping.override_file) if cfg.shaping.override_file else None


def log_shaping(shaped: shaping.Shaping) -> None:
    log.info(
        "event=shaping_loaded providers=%d rules=%d files=%s",
        len(shaped.providers), len(shaped.rules), ",".join(shaped.files),
    )  # fmt: skip


def bounce_override(cfg: Config) -> Path | None:
    """The operator's bounce rules file ([bounces] override_file), or None."""
    return cfg.path(cfg.bounces.override_file) if cfg.bounces.override_file else None


def _plan_descriptors(cfg: Config) -> doors.DescriptorPlan:
    """Raise RLIMIT_NOFILE to its hard limit; cut the API's and metrics' caps to their shares (cmcd/doors.py)."""
    plan = doors.plan_descriptors(cfg.api.max_connections, cfg.metrics.max_connections)
    log.info(
        "event=descriptor_caps nofile_soft=%d nofile_hard=%d open_at_start=%d reserve=%d api_max_connections=%d "
        "metrics_max_connections=%d smtp_max_connections=%d delivery_max_connections=%d",
        plan.soft_limit, plan.hard_limit, plan.open_at_start, doors.FD_RESERVE, plan.api_max_connections,
        plan.metrics_max_connections, cfg.smtp.max_connections, cfg.delivery.max_connections,
    )  # fmt: skip
    if plan.api_max_connections < cfg.api.max_connections:
        log.warning(
            "event=api_connections_capped configured=%d effective=%d nofile_soft=%d hint=%s",
            cfg.api.max_connections, plan.api_max_connections, plan.soft_limit,
            "raise LimitNOFILE= (systemd) or the hard limit for more API connections",
        )  # fmt: skip
    return plan


async def _reconcile_requests(spool: Spool, astore: AsyncStore, shard: int, ttl_s: float) -> None:
    """Before serving: the store's Idempotency-Key claims of this shard agree with its spool again
    (queue/requests.py); a store that cannot be written now leaves them (other workers answer 409)."""
    try:
        written, dropped = await requests.reconcile(spool, astore, shard, time.time(), ttl_s)
    except (sqlite3.Error, StoreError) as exc:
        log.warning("event=idempotency_reconcile_failed shard=%d error=%r", shard, str(exc))
        return
    if written or dropped:
        log.info("event=idempotency_reconciled shard=%d responses_copied=%d claims_dropped=%d", shard, written, dropped)


def log_loss(opened: Opened, accept_loss: bool) -> None:
    """One warning per message --accept-loss recorded lost, then the total."""
    for m in opened.lost:
        log.warning("event=message_lost queue_id=%s tenant=%s recipients=%d", m.queue_id, m.tenant, m.recipients)
    if opened.set_aside or opened.lost:
        log.warning(
            "event=spool_loss_accepted messages=%d recipients=%d set_aside=%s",
            len(opened.lost),
            sum(m.recipients for m in opened.lost),
            ",".join(str(p) for p in opened.set_aside) or "-",
        )
    elif accept_loss:
        log.info("event=accept_loss_unused reason=spool_intact")
