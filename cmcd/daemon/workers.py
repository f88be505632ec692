"""A supervisor's worker processes: started, watched, restarted with backoff; never serves anything.

A worker is `python -m cmcd.daemon worker --index K --workers N --config PATH`. It inherits its
listening sockets (cmcd/listening.py) and one end of a socket pair: the worker writes "READY" on
it once it serves; the supervisor never writes, and the worker stops when it reads the end of it
(the supervisor is gone, kill -9 included). The kernel also kills the worker when the supervisor
dies (PR_SET_PDEATHSIG), so no orphan keeps a shard or a port.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from cmcd.listening import LISTEN_ENV, environment

log = logging.getLogger("cmcd.supervisor")

CONTROL_ENV = "CMCD_CONTROL_FD"
PARENT_ENV = "CMCD_SUPERVISOR_PID"
READY_TIMEOUT_S = 120.0  # recovering a large shard takes a while; a worker that says nothing by then is failed
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_S = 60.0  # a worker that served this long starts the backoff over when it dies
_PR_SET_PDEATHSIG = 1

CONFIG_ENV = "CMCD_CONFIG_DATA"  # the configuration the supervisor runs with, as JSON


def die_with_parent() -> None:
    """In a worker, first thing: the kernel kills this process when its supervisor ends (the
    caller then checks the supervisor was still there when this took effect)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class WorkerProcess:
    """Worker INDEX: its process, its readiness, its restarts."""

    def __init__(self, index: int, argv: list[str], sockets: dict[str, list[socket.socket]], config_data: str):
        self.index = index
        self.config_data = config_data  # JSON of the configuration every worker starts with
        self.argv = argv
        self.sockets = sockets
        self.proc: subprocess.Popen[bytes] | None = None
        self.control: socket.socket | None = None
        self.restarts = 0
        self.started_at = 0.0
        self.ready_at = 0.0
        self.backoff_s = BACKOFF_FIRST_S
        self.served_s = 0.0  # how long the last process served before it ended

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    @property
    def up(self) -> bool:
        """Ready and not known to have ended (only exited() reaps the process)."""
        return self.proc is not None and self.proc.returncode is None and self.ready_at > 0

    def spawn(self) -> None:
        """Start the process (from the event loop thread: PR_SET_PDEATHSIG follows the thread that forks)."""
        ours, theirs = socket.socketpair()
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        env[LISTEN_ENV] = environment(self.sockets)
        env[CONTROL_ENV] = str(theirs.fileno())
        env[PARENT_ENV] = str(os.getpid())
        env[CONFIG_ENV] = self.config_data
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cmcd.daemon", "worker", *self.argv, "--index", str(self.index)],
                env=env, stdin=subprocess.DEVNULL,
                pass_fds=[theirs.fileno(), *(s.fileno() for socks in self.sockets.values() for s in socks)],
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.control = ours
        self.started_at = time.monotonic()
        self.ready_at = 0.0
        log.info("event=worker_started worker=%d pid=%d", self.index, self.proc.pid)

    async def ready(self, timeout_s: float = READY_TIMEOUT_S) -> bool:
        """True once the worker said READY; False when it ended or said nothing within TIMEOUT_S."""
        assert self.control is not None
        loop = asyncio.get_running_loop()
        self.control.setblocking(False)
        try:
            data = await asyncio.wait_for(loop.sock_recv(self.control, 64), timeout_s)
        except (TimeoutError, OSError):
            return False
        if data.startswith(b"READY"):
            self.ready_at = time.monotonic()
            return True
        return False

    async def stopped_accepting(self, timeout_s: float) -> bool:
        """True once the worker said it takes no new connection (after SIGTERM); False when it ended
        or said nothing within TIMEOUT_S."""
        if self.control is None:
            return False
        try:
            data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.control, 64), timeout_s)
        except (TimeoutError, OSError):
            return False
        return data.startswith(b"STOPPING")

    async def exited(self) -> int:
        """Wait for the process to end; its exit status (negative: the signal that ended it)."""
        assert self.proc is not None
        proc = self.proc
        loop = asyncio.get_running_loop()
        if proc.returncode is not None:
            return self._ended(proc.returncode)
        try:
            fd = os.pidfd_open(proc.pid)
        except ProcessLookupError:  # already gone and reaped
            return self._ended(await asyncio.to_thread(proc.wait))
        done: asyncio.Future[None] = loop.create_future()

        def ended() -> None:
            if not done.done():
                done.set_result(None)

        loop.add_reader(fd, ended)
        try:
            if proc.poll() is None:
                await done
        finally:
            loop.remove_reader(fd)
            os.close(fd)
        return self._ended(proc.wait())

    def _ended(self, code: int) -> int:
        if self.control is not None:
            self.control.close()
            self.control = None
        self.served_s = time.monotonic() - self.ready_at if self.ready_at else 0.0
        self.ready_at = 0.0
        return code

    def signal(self, sig: int) -> None:
        """Send SIG unless the process is known to be reaped (never poll(): exited() reaps)."""
        if self.proc is not None and self.proc.returncode is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def next_backoff(self) -> float:
        """The wait before the next start: doubling from BACKOFF_FIRST_S up to BACKOFF_MAX_S, back to
        the first after a run of STABLE_S."""
        if self.served_s >= STABLE_S:
            self.backoff_s = BACKOFF_FIRST_S
        wait = self.backoff_s
        self.backoff_s = min(BACKOFF_MAX_S, self.backoff_s * 2)
        return wait


def worker_argv(config_path: str | Path, workers: int, accept_loss: bool) -> list[str]:
    return ["--config", str(config_path), "--workers", str(workers), *(["--accept-loss"] if accept_loss else [])]
