"""Opens the store and the spool at start-up, refusing either when it cannot be trusted; never delivers, never listens.

The store keeps the id of its spool (meta `spool_id`, also in the spool's own meta table). A
spool that is missing or empty while the store says one was in use, a spool with another id, or
one that fails SQLite's quick_check stops start-up with UntrustedFileError: one line naming the
file and the way out. `cmcd serve --accept-loss` is that way out when no intact copy exists: the
bad file is renamed FILE.lost-TIME (never deleted), a new spool is started, and every recipient
the store's mail log knows was accepted but has no final state is logged "lost" (a final state).
A store that is missing while the spool holds mail, or a store that is empty or damaged, is
refused by the store (cmcd/store/store.py open_store); no flag starts without it. First start on
an empty data directory creates the key, the store and the spool as before. Blocking throughout:
callers run open_checked() in a thread.

With [server] workers = N, worker K opens shard K (queue-K.db; shard 0 keeps queue.db): the store
keeps one id per shard (meta spool_id.K), and a shard's unfinished recipients are those whose queue
ids name it. A shard beyond N that still holds mail stops start-up (stranded_shards); a shard is held
by one process at a time (lock_shard).
"""

from __future__ import annotations

import datetime
import fcntl
import os
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from cmcd.errors import UntrustedFileError
from cmcd.queue.ids import shard_of
from cmcd.queue.spool import Spool
from cmcd.store import Store, open_store
from cmcd.store.integrity import RESTORE_STORE, database_problem
from cmcd.store.lost import Unfinished, record_lost, set_spool_id, spool_id, unfinished

SPOOL_FILE = "queue.db"  # shard 0's file (and the only one with [server] workers = 1)
SHARD_FILE = re.compile(r"queue-([1-9][0-9]*)\.db")
LOCK_WAIT_S = 15.0  # a worker of a supervisor just killed may still hold its shard for a moment
ACCEPT_LOSS = "cmcd serve --accept-loss"


@dataclass(frozen=True)
class LostMessage:
    """A message the lost spool held: what the log line about it says."""

    queue_id: str
    tenant: str
    recipients: int


@dataclass
class Opened:
    store: Store
    spool: Spool
    spool_id: str
    #: with --accept-loss: the messages recorded lost, and the files renamed aside
    lost: list[LostMessage] = field(default_factory=list)
    set_aside: list[Path] = field(default_factory=list)


def shard_file(shard: int) -> str:
    """The file name of spool shard SHARD in spool.dir: queue.db for shard 0, queue-K.db for K > 0."""
    return SPOOL_FILE if shard == 0 else f"queue-{shard}.db"


def stranded_shards(spool_dir: Path, workers: int) -> list[str]:
    """A line for each shard file beyond WORKERS that still holds mail or mail-log rows: no worker
    would deliver it, so start-up refuses until [server] workers reaches it again."""
    out = []
    for path in sorted(spool_dir.glob("queue-*.db")):
        m = SHARD_FILE.fullmatch(path.name)
        if m is None or int(m.group(1)) < workers:
            continue
        held = _held(path)
        if held:
            out.append(
                f"{path}: spool shard {m.group(1)} holds {held}, but [server] workers = {workers}; "
                f"set workers to at least {int(m.group(1)) + 1} until it has drained (cmcctl queue summary)"
            )
    return out


def lock_host(spool_dir: Path) -> int:
    """Hold SPOOL_DIR for this supervisor (an exclusive flock on spool.dir/supervisor.lock, released
    when it ends): a second `cmcd serve` on the same spool stops before it binds or opens anything."""
    spool_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(spool_dir / "supervisor.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UntrustedFileError(
            f"{spool_dir / 'supervisor.lock'}: another cmcd is running on this spool.dir (is cmcd already running?)"
        ) from None
    return fd


def lock_shard(spool_dir: Path, shard: int, wait_s: float = LOCK_WAIT_S) -> int:
    """Hold spool shard SHARD for this process (an exclusive flock on its .lock file, released when
    the process ends, kill -9 too); wait up to WAIT_S for another process to let go, then raise
    UntrustedFileError naming the shard. Returns the descriptor, to keep open."""
    spool_dir.mkdir(parents=True, exist_ok=True)
    path = spool_dir / f"{shard_file(shard)}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise UntrustedFileError(
                    f"{spool_dir / shard_file(shard)}: spool shard {shard} is in use by another process "
                    f"(held for {wait_s:g} s); is another cmcd running on this spool.dir?"
                ) from None
            time.sleep(0.05)  # polling a lock another process holds; flock has no timed wait


def prepare_store(store_path: Path, key_file: Path, spool_dir: Path) -> None:
    """For a supervisor, before its workers open the store together: refuse a missing store while
    a shard holds mail (as open_checked does for one), else create or migrate the store once."""
    if not store_path.exists():
        for spool_path in sorted(spool_dir.glob("queue*.db")):
            held = _held(spool_path)
            if held:
                raise UntrustedFileError(
                    f"{store_path}: the store is missing, but the spool {spool_path} holds {held}; {RESTORE_STORE}"
                )
    open_store(store_path, key_file).close()


def open_checked(
    store_path: Path, key_file: Path, spool_dir: Path, *, accept_loss: bool, now: float, shard: int = 0
) -> Opened:
    """Open the store and spool shard SHARD, or raise UntrustedFileError naming the file at fault."""
    spool_path = spool_dir / shard_file(shard)
    if not store_path.exists():  # before open_store: a key without its store is the lesser news
        held = _held(spool_path)
        if held:
            raise UntrustedFileError(
                f"{store_path}: the store is missing, but the spool {spool_path} holds {held}; {RESTORE_STORE}"
            )
    store = open_store(store_path, key_file)
    try:
        return _open_spool(store, spool_path, shard, accept_loss=accept_loss, now=now)
    except BaseException:
        store.close()
        raise


def _held(spool_path: Path) -> str:
    """What a spool whose store is gone still holds ("3 messages"), or "" when it holds nothing."""
    try:
        if spool_path.stat().st_size == 0:
            return ""
    except FileNotFoundError:
        return ""
    try:
        conn = sqlite3.connect(f"file:{spool_path}?mode=ro", uri=True)
        try:
            n = conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
            n_events = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return "data that cannot be read"
    if n:
        return f"{n} message{'s' if n != 1 else ''}"
    return f"{n_events} mail-log event{'s' if n_events != 1 else ''}" if n_events else ""


def _spool_id_of(spool_path: Path) -> str | None:
    conn = sqlite3.connect(f"file:{spool_path}?mode=rw", uri=True)
    try:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is None:
            return None
        row = conn.execute("SELECT value FROM meta WHERE key = 'spool_id'").fetchone()
        return None if row is None else str(row[0])
    finally:
        conn.close()


def _write_spool_id(spool_path: Path, value: str) -> None:
    conn = sqlite3.connect(str(spool_path), isolation_level=None)
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('spool_id', ?)", (value,))
    finally:
        conn.close()


def _unfinished(store: Store, shard: int) -> list[Unfinished]:
    """The store's unfinished recipients whose queue ids name SHARD (an id of another form: shard 0)."""
    return [u for u in unfinished(store) if (shard_of(u.queue_id) or 0) == shard]


def _problem(store: Store, spool_path: Path, shard: int, expected: str | None) -> tuple[str, str | None]:
    """What is wrong with the spool ("" if nothing) and the id it carries."""
    try:
        size = spool_path.stat().st_size
    except FileNotFoundError:
        size = -1
    if size <= 0:
        if expected is None and not _unfinished(store, shard):
            return "", None  # a new spool (first start, or an older store with nothing in flight)
        why = "the spool is missing" if size < 0 else "the spool is empty (0 bytes)"
        return f"{why}, but the store {store.path} says one was in use", None
    damage = database_problem(spool_path, "spool")
    if damage:
        return damage, None
    found = _spool_id_of(spool_path)
    if expected is not None and found != expected:
        return (
            f"this is not the spool of the store {store.path} (its id is {found or 'missing'}, not {expected})",
            found,
        )
    return "", found


def _open_spool(store: Store, spool_path: Path, shard: int, *, accept_loss: bool, now: float) -> Opened:
    expected = spool_id(store, shard)
    problem, found = _problem(store, spool_path, shard, expected)
    lost: list[LostMessage] = []
    aside: list[Path] = []
    if problem:
        if not accept_loss:
            n = len(_unfinished(store, shard))
            raise UntrustedFileError(
                f"{spool_path}: {problem}; {n} accepted recipient{'s have' if n != 1 else ' has'} no final state; "
                "put back the intact spool (is its file system mounted?), "
                f"or start once with `{ACCEPT_LOSS}` to log them as lost and begin a new spool"
            )
        aside = _set_aside(spool_path, now)
        found = None
        lost = _record_lost(store, spool_path, shard, aside, now)
    new_id = found or secrets.token_hex(16)
    if found is None:
        spool_path.parent.mkdir(parents=True, exist_ok=True)
        _write_spool_id(spool_path, new_id)
    try:
        spool = Spool(spool_path.parent, store.keys, spool_path.name)
    except sqlite3.OperationalError as exc:  # whole, but cannot be written (mode, owner, a full disk)
        raise UntrustedFileError(
            f"{spool_path}: cannot open the spool ({exc}); check its owner, mode and disk"
        ) from None
    if expected != new_id:
        set_spool_id(store, new_id, shard)
    return Opened(store, spool, new_id, lost, aside)


def _set_aside(spool_path: Path, now: float) -> list[Path]:
    """Rename the spool and its -wal and -shm files to NAME.lost-TIME (never delete them)."""
    stamp = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    base = spool_path.with_name(f"{spool_path.name}.lost-{stamp}")
    n = 1
    while any(Path(f"{base}{s}").exists() for s in ("", "-wal", "-shm")):
        n += 1
        base = spool_path.with_name(f"{spool_path.name}.lost-{stamp}.{n}")
    moved = []
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{spool_path}{suffix}")
        if src.exists():
            dst = Path(f"{base}{suffix}")
            src.rename(dst)
            moved.append(dst)
    return moved


def _record_lost(store: Store, spool_path: Path, shard: int, aside: list[Path], now: float) -> list[LostMessage]:
    """Log every unfinished recipient of the shard as lost; the messages, for one log line each."""
    recipients = _unfinished(store, shard)
    kept = f"kept as {aside[0].name}" if aside else "missing"
    why = f"lost with the spool {spool_path} ({kept}); no final state was recorded; started with --accept-loss"
    record_lost(store, recipients, now, why)
    by_message: dict[str, LostMessage] = {}
    for u in recipients:
        m = by_message.get(u.queue_id)
        by_message[u.queue_id] = LostMessage(u.queue_id, u.tenant, (m.recipients if m else 0) + 1)
    return list(by_message.values())
