"""The evidence report's parts every section shares: the controls, a report line, how times and
sizes are written, and the run a section reads from; never measures anything itself.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import os
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmcd.queue.manage import QueueFigures, add_figures

if TYPE_CHECKING:
    from cmcd.admin.verb import Context

#: control number -> title, as the ISO/IEC 27017 white paper numbers and names them
CONTROLS: dict[str, str] = {
    "9.2.1": "User registration and de-registration",
    "9.2.3": "Management of privileged access rights",
    "9.4.1": "Information access restriction",
    "10.1.1": "Policy on the use of cryptographic controls",
    "12.1.3": "Capacity management",
    "12.3.1": "Information backup",
    "12.4.1": "Event logging",
    "12.4.4": "Clock synchronisation",
    "18.1.3": "Protection of records",
    "CLD.8.1.5": "Removal of cloud service customer assets",
    "CLD.9.5.1": "Segregation in virtual computing environments",
}
STATUSES = ("ok", "attention", "fail")
DAY_S = 86400.0


@dataclass(frozen=True)
class Line:
    """One line of the report."""

    control: str
    item: str
    setting: str
    evidence: str
    status: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"control": self.control, "title": CONTROLS[self.control]} | {
            k: v for k, v in asdict(self).items() if k != "control"
        }


def duration(seconds: float) -> str:
    """A duration the way a person reads it: 45s, 12m, 3.5h, 12.0d."""
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 2 * DAY_S:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / DAY_S:.1f}d"


def utc(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def file_mode(path: Path) -> tuple[int, int] | None:
    """(permission bits, owner uid) of PATH, or None when it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.S_IMODE(st.st_mode), st.st_uid


def size_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Run:
    """One report: the daemon's parts it reads, the tenant it is for (None: all), its time, and
    what its sections share (the queue's figures, read once; the newest backup's age)."""

    def __init__(self, ctx: Context, tenant: str | None, tenant_id: int | None, now: float):
        self.config = ctx.config
        self.astore = ctx.astore
        self.store = ctx.store
        self.spool = ctx.spool
        self.engine = ctx.engine
        self.status = ctx.status
        self.peers = ctx.peers
        self.tenant = tenant
        self.tenant_id = tenant_id
        self.now = now
        self.newest_backup_age: float | None = None  # set by the backups section
        self._queue: QueueFigures | None = None

    async def read(self, fn: Callable[..., Any], *args: Any) -> Any:
        """FN(store, *ARGS) on the store's thread."""
        return await self.astore.call(fn, self.store, *args)

    async def thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))

    async def queue_figures(self) -> QueueFigures:
        """The host's queue figures: this shard's, and with workers every other shard's added."""
        if self._queue is None:
            mine = await self.spool.figures()
            others = await self.peers.each("worker.figures") if self.peers is not None else []
            self._queue = add_figures([mine, *(QueueFigures(**f) for f in others)])
        return self._queue
