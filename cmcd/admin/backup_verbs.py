"""The backup.* admin verbs and the periodic backup task; the snapshot, compression and AES run in a thread, never on the loop.

Settings: backup.dir, backup.key_file, backup.keep, backup.interval (the first backup is one interval
after start). Backups hold the store only, never the spool or a message body (cmcd.store.backup).
backup.purge-tenant removes a tenant already purged from the store from every kept backup as well.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from pathlib import Path
from typing import Any

from cmcd.admin.verb import Args, BadRequest, Context, Verb, change, read
from cmcd.config import Config
from cmcd.crypto import DataKeys
from cmcd.errors import BackupError, NotFound
from cmcd.store.backup import BackupInfo, list_backups, purge_tenant, take_backup, verify_backup

log = logging.getLogger("cmcd.backup")


def run_backup(config: Config, store_path: Path) -> tuple[BackupInfo, float]:
    """Take one backup now (blocking); return it and how many seconds it took."""
    started = time.monotonic()
    info = take_backup(
        store_path,
        config.path(config.backup.dir),
        config.path(config.backup.key_file),
        config.backup.keep,
        time.time(),
        work_dir=store_path.parent,
    )
    return info, time.monotonic() - started


def _info(b: BackupInfo) -> dict[str, Any]:
    # absolute: the caller's working directory is not the daemon's
    return {"name": b.name, "path": str(b.path.absolute()), "size_bytes": b.size_bytes, "created": b.created}


def _in_backup_dir(config: Config, file: str) -> Path:
    """FILE as a path inside backup.dir: a bare name there, or an absolute path that resolves into it.

    The daemon opens the file with its own rights, which reach files the caller may not (the store's
    directory, key files, /proc). Taking any path would let whoever may use the socket probe what exists
    on the host, or point the daemon at a FIFO or a device; so only what is in backup.dir is read.
    Symbolic links are followed before the check, so a link in backup.dir to elsewhere is refused too.
    """
    directory = config.path(config.backup.dir).resolve()
    if "/" not in file:
        candidate = directory / file
    elif Path(file).is_absolute():
        candidate = Path(file)
    else:
        raise BadRequest(f"backup.verify: give a file name in backup.dir ({directory}) or an absolute path")
    resolved = candidate.resolve()
    if resolved == directory or not resolved.is_relative_to(directory):
        raise BadRequest(f"backup.verify: {file} is not in backup.dir ({directory}); only backups there are verified")
    if not resolved.is_file():
        raise BackupError(f"{resolved}: no such backup file")
    return resolved


def _verify(config: Config, store_path: Path, file: str, data_keys: DataKeys | None) -> dict[str, Any]:
    path = _in_backup_dir(config, file)
    r = verify_backup(path, config.path(config.backup.key_file), data_keys=data_keys, work_dir=store_path.parent)
    return {
        "name": r.name,
        "path": str(r.path),
        "size_bytes": r.size_bytes,
        "created": r.created,
        "db_bytes": r.db_bytes,
        "integrity": r.integrity,
        "rows": r.rows,
        "data_key": "matches" if r.data_key_ok else "differs (restore would need the data key it was taken with)",
    }


async def _backup_now(ctx: Context, a: Args) -> Any:
    config = ctx.config
    loop = asyncio.get_running_loop()
    try:
        info, seconds = await loop.run_in_executor(None, run_backup, config, config.path(config.store.path))
    except BackupError as exc:
        log.error("event=backup_failed trigger=admin error=%r", str(exc))
        raise
    log.info("event=backup_done trigger=admin file=%s bytes=%d seconds=%.2f", info.path, info.size_bytes, seconds)
    return _info(info) | {"seconds": round(seconds, 3)}


async def _backup_list(ctx: Context, a: Args) -> Any:
    config = ctx.config
    loop = asyncio.get_running_loop()
    backups = await loop.run_in_executor(None, list_backups, config.path(config.backup.dir))
    return [_info(b) for b in backups]


async def _backup_verify(ctx: Context, a: Args) -> Any:
    config = ctx.config
    file = a.text("file")
    loop = asyncio.get_running_loop()
    store_path = config.path(config.store.path)
    return await loop.run_in_executor(None, _verify, config, store_path, file, ctx.store.keys)


async def _backup_purge_tenant(ctx: Context, a: Args) -> Any:
    """Remove a purged tenant from every kept backup. The argument is tenant_name, not name: a refusal is
    logged with the arguments that name a tenant, and the name of an erased tenant must not be kept."""
    config = ctx.config
    name = a.text("tenant_name")
    try:
        await ctx.astore.call(ctx.store.tenant, name)
    except NotFound:
        pass
    else:
        raise BadRequest(
            f"backup.purge-tenant: tenant {name!r} still exists; erase it first: cmcctl tenant delete {name} --purge"
        )
    store_path = config.path(config.store.path)
    job = functools.partial(
        purge_tenant,
        config.path(config.backup.dir),
        config.path(config.backup.key_file),
        name,
        work_dir=store_path.parent,
    )
    loop = asyncio.get_running_loop()
    r = await loop.run_in_executor(None, job)
    rows = " ".join(f"{k}={v}" for k, v in r.rows.items())
    detail = f"generations={r.generations} rewritten={len(r.rewritten)} chunks_erased={r.chunks_removed} {rows}"
    actor, actor_uid = a.actor
    # named by its number, like the tenant.purge row: the operation log keeps no name of an erased tenant
    await ctx.audit.op(
        ts=time.time(),
        actor_uid=actor_uid,
        actor=actor,
        action="backup.purge-tenant",
        target=" ".join(f"tenant #{i}" for i in r.tenant_ids) or "-",
        result="ok",
        tenant_id=None,
        detail=detail.strip(),
    )
    log.info("event=backup_tenant_purge_done generations=%d rewritten=%d", r.generations, len(r.rewritten))
    return {
        "generations": r.generations,
        "rewritten": r.rewritten,
        "tenant_ids": r.tenant_ids,
        "rows": r.rows,
        "chunks_erased": r.chunks_removed,
    }


BACKUP_VERBS: dict[str, Verb] = {
    "backup.now": change(_backup_now, (), "store"),
    "backup.list": read(_backup_list),
    "backup.verify": read(_backup_verify, "file"),
    # writes its own "ok" row (naming the tenant by number); the server logs a refusal
    "backup.purge-tenant": read(_backup_purge_tenant, "tenant_name"),
}


class BackupScheduler:
    """Takes a backup every backup.interval, the first one interval after start(); failures are logged, not raised."""

    def __init__(self, config: Config, store_path: Path):
        #: read at each backup, so a reload can change backup.keep and backup.interval
        self.config = config
        self._store_path = store_path
        #: Unix time of the newest good backup (at start: the newest one in backup.dir; 0.0 when none)
        self.last_success = 0.0
        self.attempts = 0
        self.failures = 0
        self._task: asyncio.Task[None] | None = None
        self._running: asyncio.Future[tuple[BackupInfo, float]] | None = None
        self._attempted = asyncio.Condition()
        #: set once last_success has been read from backup.dir after start()
        self.ready = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="backup-scheduler")

    async def close(self) -> None:
        """Stop scheduling; a backup in progress is let finish, so it leaves no partial file behind."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        running, self._running = self._running, None
        if running is not None:
            await asyncio.wait([running])
            if not running.cancelled() and running.exception() is not None:
                log.error("event=backup_failed error=%r", str(running.exception()))

    async def wait_attempts(self, n: int) -> None:
        """Return once at least N scheduled backups have been tried (done or failed)."""
        async with self._attempted:
            await self._attempted.wait_for(lambda: self.attempts >= n)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        backup_dir = self.config.path(self.config.backup.dir)
        try:
            existing = await loop.run_in_executor(None, list_backups, backup_dir)
        except BackupError as exc:
            log.warning("event=backup_list_failed error=%r", str(exc))
            existing = []
        if existing:
            self.last_success = existing[-1].created
        self.ready.set()
        due = loop.time() + float(self.config.backup.interval)
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            await self._once()
            interval = float(self.config.backup.interval)
            due += interval
            if due <= loop.time():  # the backup took longer than the interval (or the host slept): no catch-up burst
                due = loop.time() + interval

    async def _once(self) -> None:
        loop = asyncio.get_running_loop()
        running = self._running = loop.run_in_executor(None, run_backup, self.config, self._store_path)
        try:
            info, seconds = await asyncio.shield(running)
        except asyncio.CancelledError:
            raise  # close(): self._running stays set, so close() waits for the thread to finish
        except BackupError as exc:
            self.failures += 1
            log.error("event=backup_failed error=%r", str(exc))
        except Exception as exc:
            self.failures += 1
            log.exception("event=backup_failed error=%r", str(exc) or type(exc).__name__)
        else:
            self.last_success = info.created
            log.info("event=backup_done file=%s bytes=%d seconds=%.2f", info.path, info.size_bytes, seconds)
        self._running = None
        self.attempts += 1
        async with self._attempted:
            self._attempted.notify_all()
