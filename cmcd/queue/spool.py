"""The durable spool: message bodies and per-recipient queue rows in one SQLite file, group-committed,
and the named operations every other part of cmcd uses on it.

A message is accepted only once its transaction is committed with synchronous=FULL in WAL
mode, which fsyncs the WAL before commit() returns: the body and its rows survive kill -9
and power loss together, or neither exists. One writer thread owns the connection; every
commit request that is waiting when it finishes the previous transaction goes into the next
one, so concurrent sessions share one fsync. Never speaks SMTP, never reads the store.

No connection leaves this package: callers use the operations below (intake, delivery, queue
administration, the outboxes, idempotency keys, the figures /metrics shows), which run on the
writer thread (changes) or on a reader thread with a read-only connection (reads, beside the
writer: WAL lets readers and the writer proceed together, so a long listing never delays a 250).
The SQL is in tables.py, work.py, manage.py, outbox.py and requests.py; the queue's running counts
(kept by triggers, read by the summary and the figures) in counts.py.

Everything that can hold an address is encrypted under the data key: addresses (with an HMAC
index), bodies (DSNs too), and remote replies (recipients.last_response_enc, events.response_enc),
which echo the recipient. The plaintext reply columns of older spools stay, always empty.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from cmcd.crypto import DataKeys
from cmcd.db import transaction
from cmcd.errors import SpoolError
from cmcd.queue import manage, outbox, requests, tables, work
from cmcd.queue.ids import QueueIdGenerator
from cmcd.queue.manage import QueueFigures
from cmcd.queue.outbox import AuditRecord
from cmcd.queue.requests import ApiRequest, StoredResponse
from cmcd.queue.work import ApplyReport, Job, Result
from cmcd.records import SpoolMessage

log = logging.getLogger("cmcd.spool")

BUSY_TIMEOUT_MS = 30_000  # the writer's wait for a lock another process holds (a backup, sqlite3 shell)

T = TypeVar("T")
Conn = sqlite3.Connection


@dataclass(frozen=True)
class RecoveryReport:
    inflight_requeued: int


class _Commit:
    __slots__ = ("msg", "day", "future", "loop")

    def __init__(self, msg: SpoolMessage, day: str, future: asyncio.Future[None], loop: asyncio.AbstractEventLoop):
        self.msg, self.day, self.future, self.loop = msg, day, future, loop


class _Call:
    __slots__ = ("fn", "future", "loop")

    def __init__(self, fn: Callable[[Conn], Any], future: asyncio.Future[Any], loop: asyncio.AbstractEventLoop):
        self.fn, self.future, self.loop = fn, future, loop


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the waiting session went away; the outcome stands regardless
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _resolve_all(
    futures: list[asyncio.Future[None]], error: BaseException | None, then: Callable[[], None] | None
) -> None:
    for future in futures:
        _resolve(future, None, error)
    if then is not None:
        then()


class _Reader:
    """A read-only connection to the spool with one thread of its own."""

    def __init__(self, path: Path, name: str):
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._conn: Conn | None = None

    async def run(self, fn: Callable[[Conn], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run, fn)

    def _run(self, fn: Callable[[Conn], T]) -> T:
        if self._conn is None:
            self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        return fn(self._conn)

    def close(self) -> None:
        self._executor.submit(self._close).result()
        self._executor.shutdown()

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class Spool:
    def __init__(self, directory: Path, keys: DataKeys, name: str = "queue.db"):
        self.directory = directory
        self.keys = keys
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / name  # queue.db, or queue-K.db for shard K > 0 (queue/startup.py)
        self._conn = sqlite3.connect(
            str(self.path), isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA secure_delete=ON")
        tables.create(self._conn, keys)
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'spool_id'").fetchone()
        #: this spool's identity (queue/startup.py); the store counts what it shipped under it
        self.spool_id = "" if row is None else str(row[0])
        #: called on the event loop after each group of messages is committed (wakes the scheduler)
        self.on_commit: Callable[[], None] | None = None
        #: held while daily counts move from the outbox to the store, and while both are read (quota.py)
        self.counts_lock = asyncio.Lock()
        self._jobs: queue.SimpleQueue[_Commit | _Call | None] = queue.SimpleQueue()
        self._reader = _Reader(self.path, "spool-read")  # listings, bodies, next due time, API requests
        self._figures_reader = _Reader(self.path, "spool-figures")  # /metrics counts: never delays a body read
        self._thread: threading.Thread | None = None
        self.commits = 0
        self.transactions = 0
        self._free = 0
        self._free_checked = -2.0
        self._wal_oversized = False

    # -- life cycle ------------------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Before start(): return inflight rows to queued (their attempt died with the last process)."""
        with self._conn:
            n = self._conn.execute("UPDATE recipients SET state = 'queued' WHERE state = 'inflight'").rowcount
        return RecoveryReport(inflight_requeued=n)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish every commit already requested, then close."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
        self._reader.close()
        self._figures_reader.close()
        self._conn.close()

    # -- intake ----------------------------------------------------------------------------

    def free_bytes(self) -> int:
        """Space left to unprivileged writers on the spool's file system, read at most once a second
        (statvfs is a cheap, non-blocking system call; the cache keeps it off the per-MAIL path)."""
        now = time.monotonic()
        if now - self._free_checked >= 1.0:
            st = os.statvfs(self.directory)
            self._free = st.f_bavail * st.f_frsize
            self._free_checked = now
        return self._free

    async def commit(self, msg: SpoolMessage, day: str) -> None:
        """Return once MSG (counted against DAY) is on stable storage; raise SpoolError if it could
        not be written. If the caller is cancelled meanwhile, the commit still completes (at-least-once).
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._jobs.put(_Commit(msg, day, fut, loop))
        await fut

    async def commit_all(
        self, messages: list[SpoolMessage], day: str, request: ApiRequest | None, forget_before: float
    ) -> None:
        """Commit MESSAGES (and the API request that produced them) in one transaction: all are on
        stable storage when this returns, or none is and SpoolError is raised. API requests older
        than FORGET_BEFORE are dropped on the way."""

        def run(conn: Conn) -> None:
            error = self._write(messages, [day] * len(messages), request, forget_before)
            if error is not None:
                raise error

        await self._call(run)
        if self.on_commit is not None:
            self.on_commit()

    async def commit_notice(self, msg: SpoolMessage) -> None:
        """Commit MSG, a message cmcd writes itself (the console's inquiry to the operator), as a DSN
        is queued: with its "accepted" events, counted against no daily quota. It is on stable
        storage when this returns; else SpoolError, and nothing of it was written."""

        def run(conn: Conn) -> None:
            with transaction(conn):
                tables.insert_messages(conn, self.keys, [msg])

        try:
            await self._call(run)
        except sqlite3.Error as exc:
            log.error("event=spool_commit_failed messages=1 queue_id=%s error=%r", msg.queue_id, str(exc))
            raise SpoolError(f"spool commit failed: {exc}") from exc
        if self.on_commit is not None:
            self.on_commit()

    async def find_request(self, tenant_id: int, key: str, since: float) -> StoredResponse | None:
        """The response to TENANT_ID's request with Idempotency-Key KEY, if one was committed since SINCE."""
        return await self._read(functools.partial(requests.find, tenant_id=tenant_id, key=key, since=since))

    async def requests_page(
        self, since: float, after: int, limit: int
    ) -> tuple[int, list[tuple[int, str, bytes, int, str, float]]]:
        """Up to LIMIT API requests committed since SINCE past row AFTER (requests.page: what the
        store's claims are reconciled with at start)."""
        return await self._read(functools.partial(requests.page, since=since, after=after, limit=limit))

    # -- delivery --------------------------------------------------------------------------

    async def claim_due(self, now: float, limit: int) -> list[Job]:
        """Up to LIMIT recipients due at NOW, marked inflight, grouped by message and domain."""
        return await self._call(functools.partial(work.claim_due, keys=self.keys, now=now, limit=limit))

    async def next_due(self) -> float | None:
        """The earliest next attempt of a recipient waiting to be claimed; None when there is none."""
        return await self._read(work.next_due)

    async def read_body(self, queue_id: str) -> bytes | None:
        """A message's body (None once it is gone: deleted by an operator meanwhile)."""
        return await self._read(functools.partial(work.read_body, keys=self.keys, queue_id=queue_id))

    async def apply_results(
        self,
        results: Sequence[Result] | Callable[[], Sequence[Result]],
        *,
        clock: Callable[[], float],
        hostname: str,
        ids: QueueIdGenerator,
        dsn_off: frozenset[int] = frozenset(),
        mono: Callable[[], float] = time.monotonic,
    ) -> ApplyReport:
        """Record RESULTS in one transaction with the bounces they cause and the erasure of every
        message they finish (work.apply_results), at CLOCK's time. RESULTS may be a function: it is
        called on the writer thread just before the transaction, so a write that waited for the
        writer takes every result that arrived meanwhile. The report names the results applied and
        when (on MONO) the commit returned; on an error nothing of them is recorded."""

        def run(conn: Conn) -> ApplyReport:
            batch = list(results() if callable(results) else results)
            if not batch:
                return ApplyReport(0, 0, 0)
            report = work.apply_results(
                conn, self.keys, batch, now=clock(), hostname=hostname, ids=ids, dsn_off=dsn_off
            )
            return replace(report, results=tuple(batch), committed_at=mono())

        return await self._call(run)

    async def checkpoint(self) -> tuple[int, int, int]:
        """Move the WAL into the database and truncate it, so erased pages leave the WAL file too."""
        return await self._call(work.checkpoint)

    # -- administration (cmcctl queue ..., tenant purge) -----------------------------------

    async def list_page(self, **filters: Any) -> dict[str, Any]:
        """One page of messages (manage.list_page: tenant_id, state, domain, received_before, after, limit)."""
        return await self._read(functools.partial(manage.list_page, keys=self.keys, **filters))

    async def show(self, queue_id: str, tenant_id: int | None = None) -> dict[str, Any]:
        return await self._read(functools.partial(manage.show, keys=self.keys, queue_id=queue_id, tenant_id=tenant_id))

    async def summary(self, now: float, tenant_id: int | None = None) -> dict[str, Any]:
        """Recipients by state and by domain in qshape's age buckets at NOW (counts.summary: read
        from the running counts, not from every row)."""
        return await self._read(functools.partial(manage.summary, now=now, tenant_id=tenant_id))

    async def retry(
        self,
        now: float,
        *,
        queue_id: str | None = None,
        domain: str | None = None,
        everything: bool = False,
        tenant_id: int | None = None,
    ) -> int:
        return await self._call(
            functools.partial(
                manage.retry, now=now, queue_id=queue_id, domain=domain, everything=everything, tenant_id=tenant_id
            )
        )

    async def hold(self, *, queue_id: str | None = None, tenant_id: int | None = None) -> int:
        return await self._call(functools.partial(manage.hold, queue_id=queue_id, tenant_id=tenant_id))

    async def release(self, now: float, *, queue_id: str | None = None, tenant_id: int | None = None) -> int:
        return await self._call(functools.partial(manage.release, now=now, queue_id=queue_id, tenant_id=tenant_id))

    async def delete(self, now: float, queue_id: str, tenant_id: int | None = None) -> int:
        return await self._call(
            functools.partial(manage.delete, keys=self.keys, now=now, queue_id=queue_id, tenant_id=tenant_id)
        )

    async def purge_tenant(self, tenant_id: int, logins: tuple[str, ...] = ()) -> int:
        return await self._call(functools.partial(manage.purge_tenant, tenant_id=tenant_id, logins=logins))

    async def figures(self) -> QueueFigures:
        """Recipients by state (the running counts), the oldest message (an index probe), the spool's
        size and the outbox backlog, read on a thread of their own (never delays delivery's body reads)."""
        return await self._figures_reader.run(functools.partial(manage.figures, path=self.path))

    # -- the outboxes (cmcd/queue/events.py ships them to the store) -----------------------

    async def take_events(self, limit: int) -> list[tuple[Any, ...]]:
        return await self._call(functools.partial(outbox.take_events, limit=limit))

    async def drop_events(self, up_to_id: int) -> None:
        await self._call(functools.partial(outbox.drop_events, up_to_id=up_to_id))

    async def put_audit(self, kind: str, records: Sequence[AuditRecord]) -> None:
        """Commit login or operation-log RECORDS (KIND "login" or "ops") to the outbox."""
        await self._call(functools.partial(outbox.put_audit, kind=kind, records=records))

    async def take_audit(self, limit: int) -> list[tuple[int, str, AuditRecord]]:
        return await self._call(functools.partial(outbox.take_audit, limit=limit))

    async def drop_audit(self, up_to_id: int) -> None:
        await self._call(functools.partial(outbox.drop_audit, up_to_id=up_to_id))

    async def outbox_backlog(self) -> dict[str, int]:
        return await self._call(outbox.backlog)

    async def take_counts(self, limit: int) -> list[tuple[int, int, str, int]]:
        return await self._call(functools.partial(outbox.take_counts, limit=limit))

    async def drop_counts(self, up_to_id: int) -> None:
        await self._call(functools.partial(outbox.drop_counts, up_to_id=up_to_id))

    async def unshipped_counts(self, day: str, after_id: int) -> dict[int, int]:
        return await self._call(functools.partial(outbox.unshipped_counts, day=day, after_id=after_id))

    # -- the threads -----------------------------------------------------------------------

    async def _read(self, fn: Callable[[Conn], T]) -> T:
        return await self._reader.run(fn)

    async def _call(self, fn: Callable[[Conn], T]) -> T:
        """Run FN(connection) on the writer thread."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._jobs.put(_Call(fn, fut, loop))
        return await fut

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            batch = [job]
            while True:
                try:
                    batch.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            commits = [j for j in batch if isinstance(j, _Commit)]
            if commits:
                self._commit_group(commits)
            for j in batch:
                if isinstance(j, _Call):
                    try:
                        result, error = j.fn(self._conn), None
                    except Exception as exc:  # handed to the caller
                        result, error = None, exc
                    j.loop.call_soon_threadsafe(_resolve, j.future, result, error)
            if any(j is None for j in batch):
                return

    def _commit_group(self, commits: list[_Commit]) -> None:
        error = self._write([c.msg for c in commits], [c.day for c in commits])
        # one wake-up of the event loop for the whole group, not one per message
        commits[0].loop.call_soon_threadsafe(
            _resolve_all, [c.future for c in commits], error, self.on_commit if error is None else None
        )

    def _write(
        self,
        messages: list[SpoolMessage],
        days: list[str],
        request: ApiRequest | None = None,
        forget_before: float = 0.0,
    ) -> SpoolError | None:
        """One transaction on the writer thread: MESSAGES (counted against DAYS), and REQUEST if
        given; None when it committed, else the error (nothing of it was written)."""
        conn = self._conn
        error: SpoolError | None = None
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                tables.insert_messages(conn, self.keys, messages)
                tables.count_messages(conn, messages, days)
                if request is not None:
                    requests.insert(conn, request, time.time(), forget_before)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except Exception as exc:
            log.error("event=spool_commit_failed messages=%d error=%r", len(messages), str(exc))
            error = SpoolError(f"spool commit failed: {exc}")
            if isinstance(exc, sqlite3.OperationalError):  # disk full, I/O: not a constraint
                # pages of the rolled-back transaction that spilled into the WAL keep their disk space
                # (on a full disk: all of it); give it back now, or after the next commit that works
                self._wal_oversized = True
        else:
            self.commits += len(messages)
            self.transactions += 1
        if self._wal_oversized:
            self._truncate_wal()
        return error

    def _truncate_wal(self) -> None:
        """Checkpoint and truncate the WAL without waiting: a reader in the way (delivery reading a
        body) just means the next commit tries again, never that this one stalls."""
        self._conn.execute("PRAGMA busy_timeout = 0")
        try:
            busy = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlite3.Error as exc:  # the data file could not grow: still full
            log.warning("event=spool_checkpoint_failed error=%r", str(exc))
            return
        finally:
            self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._wal_oversized = bool(busy)


class DayClock:
    """The calendar day (in the server's time zone) that daily quotas count against.

    Called for every message, so the day's name is kept until the clock passes midnight.
    """

    def __init__(self, tz: Any):
        self.tz = tz
        self._start = self._end = 0.0
        self._day = ""

    def day(self, now_s: float) -> str:
        if not self._start <= now_s < self._end:
            local = datetime.datetime.fromtimestamp(now_s, self.tz)
            midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
            self._day = midnight.strftime("%Y-%m-%d")
            self._start = midnight.timestamp()
            # aware datetime arithmetic is wall-clock: this is the next local midnight, DST or not
            self._end = (midnight + datetime.timedelta(days=1)).timestamp()
        return self._day
