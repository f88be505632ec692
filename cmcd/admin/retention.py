"""Retention: mail-log rows go after retention.mail_log_days, login and operation rows after
retention.audit_log_days; daily, and on `cmcctl retention run`. Blocks (suppressions a bounce made)
whose watch period ended go every hour (BlockExpiryJob), so none outlives it by more than an hour.

Rows are deleted in small batches, each its own transaction on the store's thread, so other store
work (mail-log shipping, logins) runs between them; secure_delete overwrites the freed pages and a
checkpoint then truncates the WAL. One operation-log row records how many rows went (through the
AuditLog when given: kept in the spool's outbox if the store cannot take it). Cut short by a crash,
a run leaves only whole batches of the oldest expired rows deleted; the next run finishes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from cmcd.admin.verb import Args, Context, Verb, read
from cmcd.config import Config
from cmcd.queue.audit import AuditLog
from cmcd.store import AsyncStore

log = logging.getLogger("cmcd.retention")

BATCH = 5000
DAY_S = 86400.0
#: how often blocks past their watch period are removed: the most a block outlives it
BLOCK_EXPIRY_INTERVAL_S = 3600.0


async def run_retention(
    config: Config,
    astore: AsyncStore,
    now: float,
    *,
    actor: str = "cmcd",
    actor_uid: int | None = None,
    audit: AuditLog | None = None,
) -> dict[str, int]:
    store = astore.store
    log.info("event=retention_started")
    cutoffs = {
        "mail_log": now - config.retention.mail_log_days * DAY_S,
        "message_tags": now - config.retention.mail_log_days * DAY_S,
        "login_log": now - config.retention.audit_log_days * DAY_S,
        "ops_log": now - config.retention.audit_log_days * DAY_S,
    }
    removed = {}
    for table, cutoff in cutoffs.items():
        total = 0
        while True:
            n = await astore.call(store.expire_rows, table, cutoff, BATCH)
            total += n
            if n < BATCH:
                break
        removed[table] = total
    # blocks whose watch period is over: the address may be tried again (cmcd/bounces.py)
    removed["blocks"] = await astore.call(store.expire_blocks, now)
    await astore.call(store.checkpoint)
    detail = " ".join(f"{t}={n}" for t, n in removed.items())
    await _op_row(astore, audit, actor, actor_uid, "retention.run", "logs", detail)
    log.info("event=retention_done %s", detail)
    return removed


async def _op_row(
    astore: AsyncStore, audit: AuditLog | None, actor: str, actor_uid: int | None, action: str, target: str, detail: str
) -> None:
    """A job's operation-log row: through AUDIT (kept in the spool's outbox when the store cannot
    take it) when the job has one, else straight to the store."""
    if audit is not None:
        await audit.op(
            ts=time.time(), actor_uid=actor_uid, actor=actor, action=action, target=target, result="ok", detail=detail
        )
    else:
        await astore.call(
            astore.store.log_op, actor_uid=actor_uid, actor=actor, action=action, target=target, result="ok",
            detail=detail,
        )  # fmt: skip


class _Periodic:
    """A job run by a task of its own from start() until close()."""

    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        raise NotImplementedError


class RetentionJob(_Periodic):
    """Runs retention a minute after start, then every day."""

    def __init__(
        self,
        config: Config,
        astore: AsyncStore,
        clock: Callable[[], float] = time.time,
        *,
        audit: AuditLog | None = None,
    ):
        self.config = config
        self.astore = astore
        self.clock = clock
        self.audit = audit

    async def _run(self) -> None:
        await asyncio.sleep(60.0)
        while True:
            try:
                await run_retention(self.config, self.astore, self.clock(), audit=self.audit)
            except Exception:
                log.exception("event=retention_failed")
            await asyncio.sleep(DAY_S)


class BlockExpiryJob(_Periodic):
    """Removes the blocks whose watch period is over (store.expire_blocks, on the store's thread) at
    start and every INTERVAL_S after; each run that removes any is logged and on the operation log,
    and EXPIRED and FAILURES count for /metrics."""

    def __init__(
        self,
        astore: AsyncStore,
        clock: Callable[[], float] = time.time,
        *,
        audit: AuditLog | None = None,
        interval_s: float = BLOCK_EXPIRY_INTERVAL_S,
    ):
        self.astore = astore
        self.clock = clock
        self.audit = audit
        self.interval_s = interval_s
        self.runs = 0
        self.expired = 0  # blocks removed since start
        self.failures = 0  # runs that could not reach the store

    async def run_once(self) -> int:
        """One pass at the clock's now; how many blocks went."""
        now = self.clock()
        n = await self.astore.call(self.astore.store.expire_blocks, now)
        self.runs += 1
        self.expired += n
        if n:
            log.info("event=blocks_expired count=%d", n)
            await _op_row(self.astore, self.audit, "cmcd", None, "blocks.expire", "blocks", f"expired={n}")
        return n

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:
                self.failures += 1
                log.exception("event=blocks_expiry_failed")
            await asyncio.sleep(self.interval_s)


async def _retention_run(ctx: Context, a: Args) -> Any:
    actor, actor_uid = a.actor
    return await run_retention(ctx.config, ctx.astore, time.time(), actor=actor, actor_uid=actor_uid, audit=ctx.audit)


#: run_retention writes the run's own operation-log row (how many rows went)
RETENTION_VERBS: dict[str, Verb] = {"retention.run": read(_retention_run)}
