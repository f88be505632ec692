"""The supervisor of [server] workers > 1: owns what is one per host and holds no mail itself.

It binds the SMTP and API addresses once per worker with SO_REUSEPORT (cmcd/listening.py), starts
the workers (cmcd/daemon/workers.py) and restarts one that dies (with backoff: logged, counted in
cmcd_worker_restarts_total; the new worker recovers its shard before it accepts), serves the
operators' admin socket, /metrics (every worker's added up, cmcd/daemon/merge.py), systemd's
notify (READY=1 once every worker is ready) and watchdog, and passes SIGHUP and SIGTERM on.

The admin socket: queue verbs fan out to every worker's private socket and the answers are merged
(a verb naming a queue id goes to the worker whose shard the id names); status adds up; every other
verb runs in worker 0, and after a change every other worker reads the store's directory again
before the answer is returned, so a tenancy command is in force in every worker on return. Worker 0
also runs the once-per-host jobs (backups, retention, webhooks): the supervisor stays small.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from cmcd import __version__
from cmcd import config as config_mod
from cmcd.admin.metrics import MetricsServer, listener_families
from cmcd.admin.server import SocketServer
from cmcd.admin.verb import BadRequest, Caller, Stream
from cmcd.admin.verbs import VERBS
from cmcd.config import Config
from cmcd.daemon import merge
from cmcd.daemon.logs import sd_notify, watchdog
from cmcd.daemon.process import RESTART_ONLY, keep_restart_only, log_loss, setting, worker_socket
from cmcd.daemon.wire import Refusal, WorkerUnavailable, ask, forward
from cmcd.daemon.workers import WorkerProcess, worker_argv
from cmcd.doors import Door
from cmcd.errors import CmcdError, ConfigError, UntrustedFileError
from cmcd.listening import bind_shared, bound_name, key
from cmcd.queue.ids import shard_of
from cmcd.queue.startup import lock_host, open_checked, prepare_store, stranded_shards
from cmcd.shares import raised_limits

log = logging.getLogger("cmcd.supervisor")

SMTP_BACKLOG = 1024
API_BACKLOG = 512
STOP_MARGIN_S = 10.0  # past shutdown_grace, a worker still running is killed
STOP_ACCEPT_WAIT_S = 5.0  # a worker's word that it takes no new connection, after SIGTERM
HEALTH_EVERY_S = 10.0  # how often every ready worker is asked for its status
HEALTH_TIMEOUT_S = 10.0
HEALTH_MISSES = 3  # unanswered checks in a row before a worker is killed (and restarted)
SCRAPE_TIMEOUT_S = 5.0
OPERATOR_TIMEOUT_S = 1800.0  # an operator's verb in a worker (a purge or retry of a large shard)

#: queue verbs that fan out when they name no queue id
_FAN_OUT = frozenset({"queue.list", "queue.summary", "queue.retry", "queue.hold", "queue.release", "shaping.status"})
#: queue verbs that go to one shard when they name a queue id
_BY_ID = frozenset({"queue.show", "queue.retry", "queue.hold", "queue.release", "queue.delete"})


class Supervisor:
    def __init__(self, config: Config, config_path: str, notify_socket: str | None = None, accept_loss: bool = False):
        self.config = config
        self.config_path = config_path
        #: the configuration as read (JSON): what a worker starts with; a reload keeps what only a restart changes
        self.config_data = json.dumps(config_mod.read_data(config_path))
        self.notify_socket = notify_socket
        self.accept_loss = accept_loss
        self.n = config.server.workers
        self.workers: list[WorkerProcess] = []
        self.sockets: list[socket.socket] = []
        self.bound: dict[str, list[str]] = {"smtp": [], "smtps": [], "api": []}
        self.stop_event = asyncio.Event()
        self.stopping = False
        self.started = time.time()
        self._host_lock: int | None = None
        #: the /metrics listener's connections: its refusals and timeouts are shown with the workers' figures
        self.metrics_door = Door("metrics", config.metrics.max_connections)
        self.merger = merge.MetricsMerger()
        self.merged: list[Metric] = []  # the host's families as last scraped

    # -- life cycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        # refuses (UntrustedFileError, one line naming the file) a store or shard it cannot trust
        # before any worker starts; the store is made (first start) or migrated here, once
        await asyncio.to_thread(self._check_files)
        self._warn_raised()
        per_worker = self._bind()
        argv = worker_argv(self.config_path, self.n, self.accept_loss)
        self.workers = [WorkerProcess(k, argv, per_worker[k], self.config_data) for k in range(self.n)]
        tasks: list[asyncio.Task[None]] = []
        admin: AdminProxy | None = None
        metrics: MetricsServer | None = None
        try:
            for w in self.workers:
                w.spawn()
            await self._all_ready()
            admin = AdminProxy(self)
            await admin.start()
            metrics = MetricsServer(cfg, registry=self._registry(), door=self.metrics_door, refresh=self._scrape)
            await metrics.start()
        except BaseException:
            if admin is not None:
                await admin.close()
            await self._stop_workers()
            raise
        tasks = [loop.create_task(self._watch(w)) for w in self.workers]
        tasks.append(loop.create_task(self._health()))
        log.info(
            "event=ready version=%s pid=%d smtp=%s smtps=%s admin=%s api=%s workers=%d",
            __version__, os.getpid(), ",".join(self.bound["smtp"]) or "-", ",".join(self.bound["smtps"]) or "-",
            cfg.path(cfg.admin.socket), ",".join(self.bound["api"]) or "-", self.n,
        )  # fmt: skip
        sd_notify(self.notify_socket, "READY=1")
        if self.notify_socket:
            tasks.append(loop.create_task(watchdog(self.notify_socket)))
        await self.stop_event.wait()
        self.stopping = True
        for sock in self.sockets:  # its copies: a listener closes once every worker has closed its own too
            sock.close()
        for w in self.workers:
            w.signal(signal.SIGTERM)
        # "stopping" once no worker takes a new connection (a worker busy recovering may take a moment)
        await asyncio.gather(*(w.stopped_accepting(STOP_ACCEPT_WAIT_S) for w in self.workers))
        log.info("event=stopping workers=%d grace_s=%g", self.n, cfg.server.shutdown_grace)
        sd_notify(self.notify_socket, "STOPPING=1")
        await metrics.close()
        await admin.close()
        await self._stop_workers()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        log.info("event=stopped")

    def _check_files(self) -> None:
        """The store and every shard opened and checked as a single process does at start (with
        --accept-loss, a bad shard set aside and its mail logged lost, here, once), then closed:
        the workers open them again, already trusted."""
        cfg = self.config
        spool_dir = cfg.path(cfg.spool.dir)
        self._host_lock = lock_host(spool_dir)  # before anything is bound or opened: one supervisor per spool.dir
        prepare_store(cfg.path(cfg.store.path), cfg.path(cfg.store.key_file), spool_dir)
        stranded = stranded_shards(spool_dir, self.n)
        if stranded:
            raise UntrustedFileError("; ".join(stranded))
        for shard in range(self.n):
            opened = open_checked(
                cfg.path(cfg.store.path), cfg.path(cfg.store.key_file), spool_dir,
                accept_loss=self.accept_loss, now=time.time(), shard=shard,
            )  # fmt: skip
            log_loss(opened, self.accept_loss)
            opened.spool.stop()
            opened.store.close()
        self.accept_loss = False  # used: the workers open shards that are whole again

    def _warn_raised(self) -> None:
        for raised in raised_limits(self.config, self.n):
            log.warning("event=limit_below_workers workers=%d limit=%r", self.n, str(raised))

    def _bind(self) -> list[dict[str, list[socket.socket]]]:
        """Every listening address bound once per worker; worker K's sockets by key."""
        cfg = self.config
        per_worker: list[dict[str, list[socket.socket]]] = [{} for _ in range(self.n)]
        plan: list[tuple[str, str, int]] = [("smtp", str(a), SMTP_BACKLOG) for a in cfg.smtp.listen]
        plan += [("smtps", str(a), SMTP_BACKLOG) for a in cfg.smtp.listen_tls]
        if cfg.api.listen:
            plan.append(("api", cfg.api.listen, API_BACKLOG))
        for kind, address, backlog in plan:
            try:
                sets = bind_shared(address, self.n, backlog)
            except OSError as exc:
                for s in self.sockets:
                    s.close()
                raise CmcdError(f"cannot listen on {address} ({kind}): {exc.strerror or exc}") from None
            for k, socks in enumerate(sets):
                self.sockets += socks
                per_worker[k][key(kind, address)] = socks
            self.bound[kind] += [bound_name(sock) for sock in sets[0]]
        return per_worker

    async def _all_ready(self) -> None:
        """Every worker ready, or CmcdError naming the first that ended or said nothing."""
        results = await asyncio.gather(*(w.ready() for w in self.workers))
        for w, ok in zip(self.workers, results, strict=True):
            if not ok:
                w.signal(signal.SIGKILL)  # silent for READY_TIMEOUT_S: it is not coming
                code = await w.exited()
                raise CmcdError(f"worker {w.index} did not start (exit status {code}); its reason is in the log above")

    async def _watch(self, w: WorkerProcess) -> None:
        """Restart worker W whenever it ends while the supervisor is not stopping; a restart that
        fails is tried again after the next backoff, for as long as the supervisor runs."""
        while not self.stopping:
            try:
                code = await w.exited()
                if self.stopping:
                    return
                w.restarts += 1
                wait = w.next_backoff()
                log.error(
                    "event=worker_exited worker=%d status=%d restarts=%d restart_in_s=%g",
                    w.index, code, w.restarts, wait,
                )  # fmt: skip
                await asyncio.sleep(wait)  # the restart backoff
                if self.stopping:
                    return
                w.spawn()
                if await w.ready():
                    log.info("event=worker_restarted worker=%d pid=%d", w.index, w.pid)
                else:
                    log.error("event=worker_restart_failed worker=%d", w.index)
                    w.signal(signal.SIGKILL)  # ended or silent: exited() reaps it, and the loop tries again
            except asyncio.CancelledError:
                raise
            except Exception:  # spawn failed (fork, descriptors): wait, then try again
                log.exception("event=worker_restart_error worker=%d", w.index)
                await asyncio.sleep(w.next_backoff())
                if w.proc is None or w.proc.returncode is not None:
                    try:
                        w.spawn()
                    except Exception:
                        log.exception("event=worker_restart_error worker=%d", w.index)

    async def _health(self) -> None:
        """A worker whose event loop does not answer for HEALTH_MISSES checks in a row is killed
        (and restarted by _watch): the systemd watchdog only sees the supervisor's own loop."""
        misses = [0] * self.n
        while True:
            await asyncio.sleep(HEALTH_EVERY_S)  # the period of the check
            for w in self.workers:
                if not w.up:
                    misses[w.index] = 0
                    continue
                try:
                    await ask(self.socket_of(w.index), {"verb": "status", "log": False}, timeout_s=HEALTH_TIMEOUT_S)
                    misses[w.index] = 0
                except (Refusal, WorkerUnavailable) as exc:
                    misses[w.index] += 1
                    log.warning(
                        "event=worker_unanswered worker=%d misses=%d error=%r", w.index, misses[w.index], str(exc)
                    )
                    if misses[w.index] >= HEALTH_MISSES:
                        log.error("event=worker_unresponsive worker=%d pid=%d action=kill", w.index, w.pid)
                        w.signal(signal.SIGKILL)
                        misses[w.index] = 0

    async def _stop_workers(self) -> None:
        """SIGTERM to every worker; one that has not ended by shutdown_grace + STOP_MARGIN_S is killed."""
        self.stopping = True
        for w in self.workers:
            w.signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.server.shutdown_grace + STOP_MARGIN_S
        for w in self.workers:
            if w.proc is None or w.proc.returncode is not None:
                continue
            try:
                await asyncio.wait_for(w.exited(), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                log.error("event=worker_killed worker=%d pid=%d reason=stop_timeout", w.index, w.pid)
                w.signal(signal.SIGKILL)
                await w.exited()

    async def reload(self) -> None:
        """SIGHUP: check the file, keep what only a restart changes, then pass the signal to every
        ready worker (each reloads its share; one starting later gets the same configuration)."""
        try:
            fresh = await asyncio.to_thread(config_mod.read_data, self.config_path)
            config_mod.from_dict(fresh)  # the file as it is must be valid, even where a restart is needed
            old = json.loads(self.config_data)
            data = keep_restart_only(old, fresh)
            new = config_mod.from_dict(data)
        except ConfigError as exc:
            log.error("event=reload_failed problems=%r", exc.problems)
            return
        stuck = [path for path in RESTART_ONLY if setting(old, path) != setting(fresh, path)]
        if stuck:
            log.warning("event=reload_needs_restart keys=%s", ",".join(stuck))
        self.config_data = json.dumps(data)
        for w in self.workers:
            w.config_data = self.config_data
        self.config = dataclasses.replace(new, server=dataclasses.replace(new.server, workers=self.n))
        self._warn_raised()
        for w in self.workers:
            if w.up:
                w.signal(signal.SIGHUP)
        log.info("event=reloaded config=%s workers=%d", self.config_path, self.n)

    # -- talking to workers ----------------------------------------------------------------------

    def socket_of(self, index: int) -> Any:
        return worker_socket(self.config, index)

    async def ask_each(self, request: dict[str, Any]) -> list[Any]:
        """REQUEST's result from every worker, in worker order: a result, or the exception
        (Refusal, WorkerUnavailable) of a worker that refused or did not answer."""
        return list(
            await asyncio.gather(
                *(ask(self.socket_of(k), request, timeout_s=OPERATOR_TIMEOUT_S) for k in range(self.n)),
                return_exceptions=True,
            )
        )

    # -- metrics -----------------------------------------------------------------------------------

    def _registry(self) -> CollectorRegistry:
        registry = CollectorRegistry()
        registry.register(_HostCollector(self))
        return registry

    async def _scrape(self) -> None:
        """Every worker's metrics at once, each within SCRAPE_TIMEOUT_S; a worker that misses a
        scrape (restarting, stuck) keeps its last figures (merge.MetricsMerger)."""
        replies = await asyncio.gather(
            *(ask(self.socket_of(k), {"verb": "worker.metrics", "log": False}, timeout_s=SCRAPE_TIMEOUT_S)
              for k in range(self.n)),
            return_exceptions=True,
        )  # fmt: skip
        texts: dict[int, str] = {}
        for k, r in enumerate(replies):
            if isinstance(r, dict) and isinstance(r.get("text"), str):
                texts[k] = r["text"]
            else:
                log.warning("event=metrics_worker_missing worker=%d error=%r", k, str(r))
        self.merged = self.merger.merge(texts, own=listener_families({"metrics": self.metrics_door}))


class _HostCollector(Collector):
    def __init__(self, sup: Supervisor):
        self.sup = sup

    def collect(self) -> Iterator[Metric]:
        yield from self.sup.merged
        up = GaugeMetricFamily("cmcd_worker_up", "1 while the worker serves.", labels=["worker"])
        restarts = CounterMetricFamily("cmcd_worker_restarts", "Worker processes restarted.", labels=["worker"])
        cpu = CounterMetricFamily("cmcd_worker_cpu_seconds", "CPU time of the worker process.", labels=["worker"])
        for w in self.sup.workers:
            up.add_metric([str(w.index)], 1 if w.up else 0)
            restarts.add_metric([str(w.index)], w.restarts)
            cpu.add_metric([str(w.index)], _cpu_seconds(w.pid))
        yield GaugeMetricFamily("cmcd_workers", "Worker processes configured.", self.sup.n)
        yield up
        yield restarts
        yield cpu


def _cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of process PID (0 when it is gone)."""
    if not pid:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the operators' admin socket ---------------------------------------------------------------------


class AdminProxy(SocketServer):
    """admin.socket for a host of workers: each request answered by the workers it concerns."""

    def __init__(self, sup: Supervisor):
        super().__init__(sup.config.path(sup.config.admin.socket))
        self.sup = sup

    async def handle(self, caller: Caller, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError:
            request = None
        if not isinstance(request, dict) or not isinstance(request.get("verb"), str):
            try:
                return await self._forward(0, line, mutation=False)  # worker 0 explains what is wrong with it
            except WorkerUnavailable as exc:
                return {"ok": False, "error": _unavailable(exc)}
        verb: str = request["verb"]
        if verb not in VERBS:  # a worker's private verbs are not the operators'
            return {"ok": False, "error": f"unknown verb {verb!r}; known verbs: {', '.join(VERBS)}"}
        # a fresh request: the supervisor alone says who asks ("as") and which rows are written
        # ("log", "record"); an operator's own keys of that name never reach a worker
        request = {"verb": verb, "args": request.get("args"), "as": dataclasses.asdict(caller)}
        raw_args = request["args"]
        args: dict[str, Any] = raw_args if isinstance(raw_args, dict) else {}
        try:
            if verb == "status":
                return _ok(await self._status())
            queue_id = args.get("queue_id") if isinstance(args.get("queue_id"), str) else None
            if verb in _BY_ID and queue_id is not None:
                shard = shard_of(queue_id)
                index = shard if shard is not None and shard < self.sup.n else 0
                try:
                    return await self._forward(index, json.dumps(request).encode(), mutation=False)
                except WorkerUnavailable as exc:  # its worker is down: the refusal is still on record
                    if VERBS[verb].mutation:
                        await self._record(request, _unavailable(exc))
                    return {"ok": False, "error": _unavailable(exc)}
            if verb in _FAN_OUT:
                return await self._fan_out(verb, request, args)
            return await self._forward(0, json.dumps(request).encode(), mutation=VERBS[verb].mutation)
        except WorkerUnavailable as exc:
            return {"ok": False, "error": _unavailable(exc)}

    async def _status(self) -> dict[str, Any]:
        """Every worker's status added up; a worker that is down (restarting) is listed with up: false."""
        sup = self.sup
        replies = await asyncio.gather(
            *(ask(sup.socket_of(k), {"verb": "status", "log": False}, timeout_s=10) for k in range(sup.n)),
            return_exceptions=True,
        )
        answers = [r for r in replies if isinstance(r, dict)]
        out = merge.status(answers)
        out.update(
            pid=os.getpid(), uptime_s=round(time.time() - sup.started, 1), worker=None,
            listeners={"smtp": sup.bound["smtp"], "smtps": sup.bound["smtps"]}, api_listener=",".join(sup.bound["api"]),
        )  # fmt: skip
        by_index = {a.get("worker"): entry for a, entry in zip(answers, out["workers"], strict=True)}
        out["workers"] = [
            by_index.get(w.index, {"worker": w.index, "pid": w.pid}) | {"up": w.up, "restarts": w.restarts}
            for w in sup.workers
        ]
        return out

    async def _fan_out(self, verb: str, request: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
        mutation = VERBS[verb].mutation
        replies = await self.sup.ask_each(request | {"log": False})
        failed = [(k, r) for k, r in enumerate(replies) if isinstance(r, BaseException)]
        if failed:
            done = [k for k, r in enumerate(replies) if not isinstance(r, BaseException)]
            error = "; ".join(f"worker {k}: {r}" for k, r in failed)
            if mutation and done:  # a change made in some shards only: say where
                error += f" (done in worker{'s' if len(done) > 1 else ''} {', '.join(map(str, done))}; run it again)"
            if mutation or args:  # as the admin server does: a refused read that named something is on record
                await self._record(request, error)
            return {"ok": False, "error": error if len(failed) < len(replies) else str(failed[0][1])}
        answers = list(replies)
        if verb == "queue.list":
            limit = args.get("limit")
            result: Any = merge.list_page(answers, limit if isinstance(limit, int) else 100)
        elif verb == "queue.summary":
            result = merge.summary(answers)
        elif verb == "shaping.status":
            result = merge.side_by_side(answers)
        else:
            result = merge.add(answers)
        if mutation:
            await self._record(request, "ok")
        return _ok(result)

    async def _record(self, request: dict[str, Any], outcome: str) -> None:
        """The one operation-log row of a fanned-out change, written by worker 0."""
        try:
            await ask(self.sup.socket_of(0), request | {"record": outcome})
        except (Refusal, WorkerUnavailable):
            log.exception("event=ops_log_write_failed verb=%s", request.get("verb"))

    async def _forward(self, index: int, line: bytes, *, mutation: bool) -> dict[str, Any]:
        # an operator's verb may run long (a purge, a backup): a generous timer, but a timer
        answer = await forward(self.sup.socket_of(index), line, timeout_s=OPERATOR_TIMEOUT_S)
        if answer.stream:
            return {"ok": True, "result": Stream(_relay(answer.rows()))}
        if mutation and answer.first.get("ok"):
            await self._refresh_others(index)
        return answer.first

    async def _refresh_others(self, done_by: int) -> None:
        """Every other worker reads the store's directory now: the change is in force everywhere on return.
        A worker that is down reads it when it starts."""
        others = [k for k in range(self.sup.n) if k != done_by]
        results = await asyncio.gather(
            *(ask(self.sup.socket_of(k), {"verb": "worker.refresh", "log": False}) for k in others),
            return_exceptions=True,
        )
        for k, r in zip(others, results, strict=True):
            if isinstance(r, BaseException):
                log.warning("event=worker_refresh_failed worker=%d error=%r", k, str(r))


async def _relay(rows: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    try:
        async for row in rows:
            yield row
    except Refusal as exc:
        raise BadRequest(str(exc)) from None


def _unavailable(exc: WorkerUnavailable) -> str:
    return f"{exc}; the worker may be restarting, try again"


def _ok(result: Any) -> dict[str, Any]:
    return {"ok": True, "result": result}
