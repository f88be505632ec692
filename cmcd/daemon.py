"""Wires the daemon together and owns the event loop, signals and shutdown (and the `cmcd` command); no rules.

Start order: store -> queue (spool) -> submit -> scheduler and delivery -> smtp -> admin; shutdown in reverse.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sqlite3
import sys
import time
from typing import Any

import click

from cmcd import __version__, crypto, doors
from cmcd import config as config_mod
from cmcd.admin.backup_cli import restore_command
from cmcd.admin.backup_verbs import BackupScheduler
from cmcd.admin.metrics import MetricsServer
from cmcd.admin.retention import RetentionJob
from cmcd.admin.server import AdminServer
from cmcd.api.server import ApiServer
from cmcd.api.webhooks import WebhookDispatcher
from cmcd.config import Config
from cmcd.deliver.engine import DeliveryEngine
from cmcd.deliver.routing import Router, make_resolver
from cmcd.errors import CmcdError, ConfigError
from cmcd.queue.audit import AuditLog
from cmcd.queue.events import EventShipper
from cmcd.queue.scheduler import Scheduler
from cmcd.queue.spool import Spool
from cmcd.queue.startup import Opened, open_checked
from cmcd.redact import redact_urls
from cmcd.smtp.listener import SmtpListeners
from cmcd.store import AsyncStore
from cmcd.submit.service import SubmitService
from cmcd.tenancy import Directory, Tenancy
from cmcd.textout import escape_controls

log = logging.getLogger("cmcd")


class LogfmtFormatter(logging.Formatter):
    """One line per event: ts=... level=... logger=... then the message's own key=value pairs.

    Values a client chose (a login name, a remote reply) reach the message through %s; control
    characters in the line are escaped (\\r \\n \\x00), so no value can start a line of its own.
    Anything that looks like an address loses its local part (crypto.redact_addresses): remote
    replies echo the recipient, and the log is the one record that cannot be encrypted. A URL
    keeps its host and path only (redact.redact_urls: a webhook's token is in its query string)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        msg = record.getMessage()
        if "=" not in msg.split(" ", 1)[0]:
            msg = f"msg={msg!r}"
        line = f"ts={ts} level={record.levelname.lower()} logger={record.name} {msg}"
        if record.exc_info:
            line += " exc=" + repr(self.formatException(record.exc_info))
        return escape_controls(crypto.redact_addresses(redact_urls(line)))


def setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every command at INFO
    logging.getLogger("asyncio").setLevel(logging.WARNING)


def sd_notify(notify_socket: str | None, message: str) -> None:
    """Tell systemd (Type=notify) about READY=1 / STOPPING=1; a no-op outside systemd."""
    if not notify_socket:
        return
    addr = "\0" + notify_socket[1:] if notify_socket.startswith("@") else notify_socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(message.encode())


#: settings read once at start; a SIGHUP reload names them in the log when they changed
RESTART_ONLY = (
    "server.timezone", "smtp.listen", "smtp.listen_tls", "spool.dir", "store.path", "store.key_file",
    "admin.socket", "metrics.listen", "api.listen", "backup.dir", "backup.key_file", "dns.nameservers", "dns.timeout",
    "metrics.tls_cert", "metrics.tls_key", "metrics.basic_auth_users",
    "api.max_connections", "api.max_connections_per_ip", "metrics.max_connections",  # sized with the descriptors at start
)  # fmt: skip


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
    ):
        self.config = config
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

    def status(self) -> dict[str, Any]:
        sessions = self.smtp.ctx.sessions if self.smtp else None
        return {
            "version": __version__,
            "pid": os.getpid(),
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

        # refuses (UntrustedFileError) a store or spool it cannot trust, before anything listens
        opened = await asyncio.to_thread(
            open_checked, cfg.path(cfg.store.path), cfg.path(cfg.store.key_file), cfg.path(cfg.spool.dir),
            accept_loss=self.accept_loss, now=time.time(),
        )  # fmt: skip
        store = opened.store
        astore = AsyncStore(store)
        self.spool = spool = opened.spool
        _log_loss(opened, self.accept_loss)
        report = await asyncio.to_thread(spool.recover)
        log.info("event=spool_recovered inflight_requeued=%d", report.inflight_requeued)
        spool.start()
        audit = AuditLog(spool, astore)  # login and operation rows: the store, else the spool's outbox
        events = EventShipper(spool, astore, audit)
        events.start()
        self.directory = directory = Directory(astore)
        await directory.start()
        self.tenancy = tenancy = Tenancy(cfg, astore, audit, directory)
        self.service = service = SubmitService(cfg, astore, spool, audit=audit, directory=directory)
        await service.start()
        self.scheduler = scheduler = Scheduler(
            spool, lambda jobs: engine.submit(jobs), max_inflight=cfg.delivery.max_inflight
        )
        self.engine = engine = DeliveryEngine(
            cfg, spool, Router(cfg), service.suppressions,
            release=scheduler.release, wake=scheduler.wake, dsn_off=lambda: service.dsn_off,
        )  # fmt: skip
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
        self.smtp = smtp = SmtpListeners(cfg, service)
        await smtp.start()
        engine.router.set_own_listeners(smtp.bound["smtp"] + smtp.bound["smtps"])
        admin = AdminServer(
            cfg, tenancy, spool, self.status, scheduler=scheduler, engine=engine,
            drop_sessions=smtp.ctx.sessions.drop_tenant, intake=service,
        )  # fmt: skip
        await admin.start()
        self.admin = admin
        self.backups = backups = BackupScheduler(cfg, cfg.path(cfg.store.path))
        fds = _plan_descriptors(cfg)  # the HTTP listeners' caps: their share of the descriptors left
        metrics = MetricsServer(
            cfg, service=service, engine=engine, scheduler=scheduler, spool=spool,
            max_connections=fds.metrics_max_connections,
            backup_last_success=lambda: backups.last_success,
            webhooks=lambda: self.webhooks.counts if self.webhooks is not None else {},
        )  # fmt: skip
        await metrics.start()
        resolver = make_resolver(cfg)  # for webhook URLs: dns.nameservers, never another resolver
        if cfg.api.listen:
            self.api = ApiServer(cfg, service, astore, tenancy, resolver, max_connections=fds.api_max_connections)
            await self.api.start()
        self.webhooks = webhooks = WebhookDispatcher(cfg, astore, resolver, audit=audit)
        webhooks.start()
        retention = RetentionJob(cfg, astore, audit=audit)
        retention.start()
        backups.start()

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
        watchdog = loop.create_task(self._watchdog()) if self.notify_socket else None
        await self.stop_event.wait()
        if watchdog is not None:
            watchdog.cancel()

        log.info("event=stopping grace_s=%g", cfg.server.shutdown_grace)
        sd_notify(self.notify_socket, "STOPPING=1")
        await metrics.close()
        if self.api is not None:
            await self.api.close()
        await webhooks.close()
        await admin.close()
        await retention.close()
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

    async def _watchdog(self) -> None:
        """WATCHDOG=1 at half of systemd's WatchdogSec, from the event loop: a stuck loop misses it."""
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        if usec <= 0:
            return
        while True:
            sd_notify(self.notify_socket, "WATCHDOG=1")
            await asyncio.sleep(usec / 2e6)

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
        old = self.config
        stuck = _changed(old, new, RESTART_ONLY)
        if stuck:
            log.warning("event=reload_needs_restart keys=%s", ",".join(stuck))
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
        if self.scheduler is not None:
            self.scheduler.max_inflight = new.delivery.max_inflight
            self.scheduler.wake()
        if self.admin is not None:
            self.admin.reconfigure(new)
        if self.backups is not None:
            self.backups.config = new
        log.info("event=reloaded config=%s", self.config_path)


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


def _log_loss(opened: Opened, accept_loss: bool) -> None:
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


def serve(
    config: Config, notify_socket: str | None = None, config_path: str | None = None, accept_loss: bool = False
) -> None:
    import uvloop

    uvloop.run(Daemon(config, notify_socket, config_path, accept_loss).run())


DEFAULT_CONFIG = "/etc/cmcd/cmcd.toml"


def _load(path: str) -> config_mod.Config:
    try:
        return config_mod.load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"cmcd: {path}: {problem}", err=True)
        sys.exit(2)


@click.group()
def main() -> None:
    """cmcd: a self-hosted, multi-tenant mail delivery daemon."""


@main.command("serve")
@click.option("--config", "config_path", default=DEFAULT_CONFIG, show_default=True, help="TOML configuration file.")
@click.option(
    "--accept-loss",
    is_flag=True,
    help="Start even though the spool is missing, empty, damaged or not this store's: rename it FILE.lost-TIME, "
    "start a new spool and log every recipient it held as lost. Use once, after an intact copy proved unavailable.",
)
def serve_command(config_path: str, accept_loss: bool) -> None:
    """Run the daemon in the foreground (systemd Type=notify).

    Start-up refuses, with one line naming the file and what to do, a store or spool it cannot
    trust: a data key without its store, a store that is missing while the spool holds mail, empty,
    garbled or failing SQLite's quick_check (restore it with `cmcd restore BACKUP`), or a spool that
    is missing, empty, damaged or another store's (put it back, or start once with --accept-loss).
    """
    cfg = _load(config_path)
    os.umask(0o077)  # the store, spool and keys are for the daemon's user only
    setup_logging()
    try:
        serve(cfg, notify_socket=os.environ.get("NOTIFY_SOCKET"), config_path=config_path, accept_loss=accept_loss)
    except CmcdError as exc:
        click.echo(f"cmcd: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"cmcd: cannot start: {exc}", err=True)
        sys.exit(1)
    except sqlite3.Error as exc:  # a database the start-up checks did not name: still one line, no traceback
        click.echo(f"cmcd: cannot start: a database file cannot be used: {' '.join(str(exc).split())}", err=True)
        sys.exit(1)


@main.command("check-config")
@click.option("--config", "config_path", default=DEFAULT_CONFIG, show_default=True, help="TOML configuration file.")
def check_config(config_path: str) -> None:
    """Validate a configuration file without starting; exit non-zero on any problem."""
    _load(config_path)
    click.echo(f"{config_path}: ok")


@main.command("hash-password")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin instead of asking twice.")
def hash_password_command(password_stdin: bool) -> None:
    """Print the scrypt hash of a password, for [metrics] basic_auth_users."""
    if password_stdin:
        password = sys.stdin.read().removesuffix("\n").removesuffix("\r")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    if not password:
        click.echo("cmcd: an empty password; nothing to hash", err=True)
        sys.exit(2)
    click.echo(crypto.hash_password(password))


main.add_command(restore_command)

if __name__ == "__main__":
    main()
