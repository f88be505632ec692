"""The durable spool: message bodies and per-recipient queue rows in one SQLite file, group-committed.

A message is accepted only once its transaction is committed with synchronous=FULL in WAL
mode, which fsyncs the WAL before commit() returns: the body and its rows survive kill -9
and power loss together, or neither exists. One writer thread owns the connection; every
commit request that is waiting when it finishes the previous transaction goes into the next
one, so concurrent sessions share one fsync. Never speaks SMTP, never reads the store.

Everything that can hold an address is encrypted under the data key: addresses (with an HMAC
index), bodies (DSNs too), and remote replies (recipients.last_response_enc, events.response_enc),
which echo the recipient. The plaintext reply columns of older spools stay, always empty.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmcd.crypto import DataKeys
from cmcd.db import transaction
from cmcd.errors import SpoolError
from cmcd.records import SpoolMessage

log = logging.getLogger("cmcd.spool")

BUSY_TIMEOUT_MS = 30_000  # the writer's wait for a lock another process holds (a backup, sqlite3 shell)

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    queue_id TEXT PRIMARY KEY,
    tenant_id INTEGER NOT NULL,
    user_id INTEGER NOT NULL,
    sender_enc BLOB NOT NULL,
    sender_hmac BLOB NOT NULL,
    size_bytes INTEGER NOT NULL,
    received REAL NOT NULL,
    body BLOB NOT NULL,  -- AES-256-GCM under the data key, the queue id as associated data
    message_id TEXT NOT NULL DEFAULT '',
    held INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS recipients (
    id INTEGER PRIMARY KEY,
    queue_id TEXT NOT NULL REFERENCES messages(queue_id),
    rcpt_enc BLOB NOT NULL,
    rcpt_hmac BLOB NOT NULL,
    domain TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_response TEXT NOT NULL DEFAULT '',  -- always empty: the reply is in last_response_enc
    last_mx TEXT NOT NULL DEFAULT '',
    notify INTEGER NOT NULL DEFAULT 0,  -- 1: bounced or expired, and the sender's DSN is still to be queued
    last_response_enc BLOB  -- the last reply, AES-256-GCM under the data key (it echoes the address)
);
CREATE INDEX IF NOT EXISTS recipients_queue ON recipients(queue_id);
CREATE INDEX IF NOT EXISTS recipients_due ON recipients(next_attempt) WHERE state IN ('queued', 'deferred');
CREATE INDEX IF NOT EXISTS recipients_inflight ON recipients(state) WHERE state = 'inflight';
CREATE TABLE IF NOT EXISTS events (
    -- outbox of mail-log events, committed with the queue changes they describe and shipped to the store
    id INTEGER PRIMARY KEY,
    event_key TEXT NOT NULL,
    ts REAL NOT NULL,
    tenant_id INTEGER NOT NULL,
    queue_id TEXT NOT NULL,
    event TEXT NOT NULL,
    sender_enc BLOB NOT NULL,
    sender_hmac BLOB NOT NULL,
    rcpt_enc BLOB NOT NULL,
    rcpt_hmac BLOB NOT NULL,
    rcpt_domain TEXT NOT NULL,
    status TEXT NOT NULL,
    response TEXT NOT NULL,  -- always empty: the reply is in response_enc
    attempt INTEGER NOT NULL DEFAULT 0,
    mx TEXT NOT NULL DEFAULT '',
    ip TEXT NOT NULL DEFAULT '',
    tls TEXT NOT NULL DEFAULT '',
    delay REAL NOT NULL DEFAULT 0,
    size INTEGER NOT NULL DEFAULT 0,
    message_id TEXT NOT NULL DEFAULT '',
    suppress INTEGER NOT NULL DEFAULT 0,  -- 1: the store adds the recipient to the tenant's suppression list
    response_enc BLOB  -- the reply, encrypted like last_response_enc; shipped to the store as it is
);
CREATE TABLE IF NOT EXISTS audit_events (
    -- outbox of login and operation-log rows the store could not take when they happened (cmcd/queue/audit.py)
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,  -- 'login' or 'ops'
    event_key TEXT NOT NULL,
    record TEXT NOT NULL  -- the row as a JSON object
);
CREATE TABLE IF NOT EXISTS api_requests (
    -- API requests sent with an Idempotency-Key, committed with the messages they queued
    tenant_id INTEGER NOT NULL,
    key TEXT NOT NULL,
    request_hash BLOB NOT NULL,
    status INTEGER NOT NULL,
    response TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (tenant_id, key)
);
CREATE INDEX IF NOT EXISTS api_requests_created ON api_requests(created);
CREATE TABLE IF NOT EXISTS daily_counts (
    tenant_id INTEGER NOT NULL,
    day TEXT NOT NULL,
    messages INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, day)
);
CREATE INDEX IF NOT EXISTS messages_tenant ON messages(tenant_id);
CREATE TABLE IF NOT EXISTS meta (
    -- spool_id: this spool's identity, also kept in the store, which refuses a spool not its own (queue/startup.py)
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

#: columns added after the first release, for a spool written by an older cmcd
_ADDED_COLUMNS = {
    "messages": ("message_id TEXT NOT NULL DEFAULT ''", "held INTEGER NOT NULL DEFAULT 0"),
    "recipients": ("last_mx TEXT NOT NULL DEFAULT ''", "notify INTEGER NOT NULL DEFAULT 0", "last_response_enc BLOB"),
    "events": (
        "attempt INTEGER NOT NULL DEFAULT 0", "mx TEXT NOT NULL DEFAULT ''", "ip TEXT NOT NULL DEFAULT ''",
        "tls TEXT NOT NULL DEFAULT ''", "delay REAL NOT NULL DEFAULT 0", "size INTEGER NOT NULL DEFAULT 0",
        "message_id TEXT NOT NULL DEFAULT ''", "suppress INTEGER NOT NULL DEFAULT 0", "tags TEXT NOT NULL DEFAULT ''",
        "response_enc BLOB",
    ),
}  # fmt: skip

#: recipient states that still need work; every other state is final
PENDING = ("queued", "deferred", "inflight", "held")
FINAL = ("delivered", "bounced", "expired", "suppressed", "deleted", "lost")  # lost: cmcd serve --accept-loss

EVENT_COLUMNS = (
    "event_key", "ts", "tenant_id", "queue_id", "event", "sender_enc", "sender_hmac", "rcpt_enc", "rcpt_hmac",
    "rcpt_domain", "status", "response_enc", "attempt", "mx", "ip", "tls", "delay", "size", "message_id", "suppress",
)  # fmt: skip
_EVENT_COLUMNS = ", ".join(EVENT_COLUMNS)
_EVENT_MARKS = ", ".join("?" * len(EVENT_COLUMNS))
# the plaintext response column of older spools has no default: it is written empty
INSERT_EVENT = f"INSERT INTO events({_EVENT_COLUMNS}, response) VALUES ({_EVENT_MARKS}, '')"


def _upgrade(conn: sqlite3.Connection, keys: DataKeys) -> None:
    for table, columns in _ADDED_COLUMNS.items():
        have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        for column in columns:
            if column.split()[0] not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
    if _seal_replies(conn, keys):
        # secure_delete zeroed the old values in the file; their old pages in the WAL go too
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("VACUUM")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _seal_replies(conn: sqlite3.Connection, keys: DataKeys) -> int:
    """Encrypt the plaintext replies a spool written by an older cmcd holds (one transaction, once:
    meta replies_sealed marks a spool whose replies are all encrypted)."""
    rewritten = 0
    with transaction(conn):
        if conn.execute("SELECT 1 FROM meta WHERE key = 'replies_sealed'").fetchone() is not None:
            return 0
        conn.execute("INSERT INTO meta(key, value) VALUES ('replies_sealed', '1')")
        for table, plain, sealed in (("recipients", "last_response", "last_response_enc"),
                                     ("events", "response", "response_enc")):  # fmt: skip
            rows = conn.execute(f"SELECT id, {plain} FROM {table} WHERE {plain} != ''").fetchall()
            conn.executemany(
                f"UPDATE {table} SET {sealed} = ?, {plain} = '' WHERE id = ?",
                [(keys.seal_text(str(text)), row_id) for row_id, text in rows],
            )
            rewritten += len(rows)
    return rewritten


def take_events(conn: sqlite3.Connection, limit: int) -> list[tuple[Any, ...]]:
    """The oldest outbox events, with their outbox id last (run through Spool.call)."""
    return conn.execute(f"SELECT {_EVENT_COLUMNS}, tags, id FROM events ORDER BY id LIMIT ?", (limit,)).fetchall()


def drop_events(conn: sqlite3.Connection, up_to_id: int) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM events WHERE id <= ?", (up_to_id,))


def insert_messages(conn: sqlite3.Connection, k: DataKeys, messages: list[SpoolMessage]) -> None:
    """Add MESSAGES, their recipient rows and their "accepted" events, inside the caller's transaction."""
    msgs: list[tuple[Any, ...]] = []
    rcpts: list[tuple[Any, ...]] = []
    events: list[tuple[Any, ...]] = []
    for m in messages:
        sender_enc, sender_hmac = k.encrypt(m.sender), k.index(m.sender)
        msgs.append(
            (m.queue_id, m.tenant_id, m.user_id, sender_enc, sender_hmac, len(m.body), m.received_ts,
             k.encrypt_bytes(m.body, m.queue_id.encode()), m.message_id)
        )  # fmt: skip
        for n, r in enumerate(m.recipients):
            rcpt_enc, rcpt_hmac = k.encrypt(r.address), k.index(r.address)
            rcpts.append((m.queue_id, rcpt_enc, rcpt_hmac, r.domain, m.received_ts))
            events.append(
                (f"{m.queue_id}:{n}:accepted", m.received_ts, m.tenant_id, m.queue_id, "accepted", sender_enc,
                 sender_hmac, rcpt_enc, rcpt_hmac, r.domain, "queued", None, 0, "", "", "", 0.0, len(m.body),
                 m.message_id, 0, ",".join(m.tags))
            )  # fmt: skip
    conn.executemany(
        "INSERT INTO messages(queue_id, tenant_id, user_id, sender_enc, sender_hmac, size_bytes, received, body, "
        "message_id) VALUES (?,?,?,?,?,?,?,?,?)",
        msgs,
    )
    conn.executemany(
        "INSERT INTO recipients(queue_id, rcpt_enc, rcpt_hmac, domain, next_attempt) VALUES (?,?,?,?,?)", rcpts
    )
    conn.executemany(f"INSERT INTO events({_EVENT_COLUMNS}, tags, response) VALUES ({_EVENT_MARKS}, ?, '')", events)


def add_daily_counts(conn: sqlite3.Connection, counts: dict[tuple[int, str], int]) -> None:
    conn.executemany(
        "INSERT INTO daily_counts(tenant_id, day, messages) VALUES (?,?,?) "
        "ON CONFLICT(tenant_id, day) DO UPDATE SET messages = messages + excluded.messages",
        [(t, d, n) for (t, d), n in counts.items()],
    )


@dataclass(frozen=True)
class ApiRequest:
    """An API request's Idempotency-Key and the response it produced, committed with its messages."""

    tenant_id: int
    key: str
    request_hash: bytes
    status: int
    response: str


def find_api_request(conn: sqlite3.Connection, tenant_id: int, key: str, since: float) -> tuple[bytes, int, str] | None:
    row = conn.execute(
        "SELECT request_hash, status, response FROM api_requests WHERE tenant_id = ? AND key = ? AND created >= ?",
        (tenant_id, key, since),
    ).fetchone()
    return None if row is None else (bytes(row[0]), row[1], row[2])


@dataclass(frozen=True)
class RecoveryReport:
    inflight_requeued: int
    partial_files_removed: int


class _Commit:
    __slots__ = ("msg", "day", "future", "loop")

    def __init__(self, msg: SpoolMessage, day: str, future: asyncio.Future[None], loop: asyncio.AbstractEventLoop):
        self.msg, self.day, self.future, self.loop = msg, day, future, loop


class _Call:
    __slots__ = ("fn", "future", "loop")

    def __init__(
        self, fn: Callable[[sqlite3.Connection], Any], future: asyncio.Future[Any], loop: asyncio.AbstractEventLoop
    ):
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


class Spool:
    def __init__(self, directory: Path, keys: DataKeys):
        self.directory = directory
        self.keys = keys
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "queue.db"
        self._conn = sqlite3.connect(
            str(self.path), isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA secure_delete=ON")
        self._conn.executescript(SCHEMA)
        _upgrade(self._conn, keys)
        #: called on the event loop after each group of messages is committed (wakes the scheduler)
        self.on_commit: Callable[[], None] | None = None
        self._jobs: queue.SimpleQueue[_Commit | _Call | None] = queue.SimpleQueue()
        self._read_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-read")
        self._read_conn: sqlite3.Connection | None = None
        self._thread: threading.Thread | None = None
        self.commits = 0
        self.transactions = 0
        self._free = 0
        self._free_checked = -2.0
        self._wal_oversized = False

    # -- life cycle ------------------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Before start(): return inflight rows to queued and drop any partial temp files."""
        with self._conn:
            n = self._conn.execute("UPDATE recipients SET state = 'queued' WHERE state = 'inflight'").rowcount
        removed = 0
        for p in self.directory.glob("*.tmp"):
            p.unlink()
            removed += 1
        return RecoveryReport(inflight_requeued=n, partial_files_removed=removed)

    def daily_counts(self, day: str) -> dict[int, int]:
        rows = self._conn.execute("SELECT tenant_id, messages FROM daily_counts WHERE day = ?", (day,))
        return {r[0]: r[1] for r in rows}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish every commit already requested, then close."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
        self._read_executor.submit(self._close_reader).result()
        self._read_executor.shutdown()
        self._conn.close()

    def _close_reader(self) -> None:
        if self._read_conn is not None:
            self._read_conn.close()
            self._read_conn = None

    # -- requests from the event loop ------------------------------------------------------

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
        """Return once MSG is on stable storage; raise SpoolError if it could not be written.

        If the caller is cancelled meanwhile, the commit still completes (at-least-once).
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

        def run(conn: sqlite3.Connection) -> None:
            error = self._write(messages, [day] * len(messages), request, forget_before)
            if error is not None:
                raise error

        await self.call(run)
        if self.on_commit is not None:
            self.on_commit()

    async def read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run FN(read-only connection) on the spool's reader thread, beside the writer (WAL lets
        readers and the writer proceed together), so a long listing never delays a 250."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._read_executor, self._run_read, fn)

    def _run_read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        if self._read_conn is None:
            self._read_conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        return fn(self._read_conn)

    async def call(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run FN(connection) on the writer thread (reads and queue changes outside intake)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._jobs.put(_Call(fn, fut, loop))
        return await fut

    # -- the writer thread -----------------------------------------------------------------

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
                insert_messages(conn, self.keys, messages)
                counts: dict[tuple[int, str], int] = {}
                for m, day in zip(messages, days, strict=True):
                    counts[(m.tenant_id, day)] = counts.get((m.tenant_id, day), 0) + 1
                add_daily_counts(conn, counts)
                if request is not None:
                    conn.execute("DELETE FROM api_requests WHERE created < ?", (forget_before,))
                    conn.execute(
                        "INSERT INTO api_requests(tenant_id, key, request_hash, status, response, created) "
                        "VALUES (?,?,?,?,?,?)",
                        (request.tenant_id, request.key, request.request_hash, request.status, request.response,
                         time.time()),
                    )  # fmt: skip
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
