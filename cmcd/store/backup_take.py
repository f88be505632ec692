"""Taking a backup of the store and keeping the newest generations: the snapshot, its chunks and
manifest, pruning, and listing the generations in backup.dir; never restores or reads a generation's rows.

A backup (a generation) is an online snapshot of the store's SQLite file (the backup API, in one step, so it
is one consistent read transaction while intake keeps writing in WAL mode), sealed with AES-256-GCM under a
key of its own (backup.key_file, never the data key; cmcd.store.backup_file). Everything here blocks:
callers on the event loop run it in a thread.

Since version 2 a generation is deduplicated: in the snapshot the secondary indexes are dropped with
secure_delete on (their pages become zeroed free pages; their CREATE statements are kept, and run again on
restore), so what is left changes only where rows changed, and the file is cut into 64 KiB chunks kept once
each under backup.dir/chunks (cmcd.store.backup_chunks). The generation's file, cmcd-store-TIME.bak, is then
a manifest: the index statements, the snapshot's size and its chunk ids, sealed. An hour's generation costs
the chunks that changed in that hour; pruning a generation removes the chunks no kept generation uses.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
import re
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cmcd.errors import BackupError
from cmcd.store import backup_chunks as chunks
from cmcd.store.backup_file import SEGMENT_BYTES, SEGMENT_LOG2, pack_manifest, read_manifest, seal
from cmcd.store.backup_fs import as_backup_error, fsync_dir, locked
from cmcd.store.backup_key import BackupKey, load_key

log = logging.getLogger("cmcd.backup")

_NAME_RE = re.compile(r"^cmcd-store-(\d{8}T\d{6})Z(?:-(\d+))?\.bak$")
#: the UTC time in a generation's name (and in the name a restore sets the old store aside under)
STAMP = "%Y%m%dT%H%M%S"
_PARTIAL_PREFIX = ".cmcd-store-"
#: plaintext stores being worked on (a snapshot, a generation being purged); a crash leaves them to remove_partials
SNAPSHOT_PREFIX = ".cmcd-snapshot-"


@dataclass(frozen=True)
class BackupInfo:
    """One backup file (a generation): its name, where it is, its size and when it was taken (Unix time, UTC)."""

    name: str
    path: Path
    size_bytes: int
    created: float


# -- taking a backup -----------------------------------------------------------------------


def take_backup(
    store_path: Path,
    backup_dir: Path,
    key_file: Path,
    keep: int,
    now: float,
    *,
    work_dir: Path | None = None,
    segment_bytes: int = SEGMENT_BYTES,
    chunked: bool = True,
) -> BackupInfo:
    """Snapshot the store at STORE_PATH into a new encrypted file in BACKUP_DIR, then keep only the newest KEEP.

    The plaintext snapshot is a temporary file in WORK_DIR (by default the store's own directory, which
    already holds the store in the clear), removed before returning. The key file is created (0600) if
    missing. Two backups never run at once (a lock file in BACKUP_DIR); a second one waits. CHUNKED False
    writes the whole snapshot into the file (format version 1) instead of a manifest of chunks.
    """
    if keep < 1:
        raise BackupError(f"backup.keep is {keep}; it must be at least 1")
    if segment_bytes.bit_length() - 1 not in SEGMENT_LOG2 or segment_bytes & (segment_bytes - 1):
        raise ValueError(f"segment_bytes must be a power of two from 4 KiB to 16 MiB, not {segment_bytes}")
    if not store_path.is_file():
        raise BackupError(f"{store_path}: no store to back up (store.path)")
    key = load_key(key_file, create=True)
    work = work_dir if work_dir is not None else store_path.parent
    with as_backup_error(backup_dir, "cannot create the backup directory (backup.dir)"):
        backup_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with locked(backup_dir):
        remove_partials(backup_dir, work)
        with as_backup_error(work, "cannot write the snapshot of the store"):
            fd, snap_name = tempfile.mkstemp(prefix=SNAPSHOT_PREFIX, suffix=".db", dir=work)
        os.close(fd)
        snap = Path(snap_name)
        try:
            _snapshot(store_path, snap)
            final = _free_name(backup_dir, now)
            indexes = strip_indexes(snap) if chunked else None
            write_generation(snap, indexes, backup_dir, key, now, final, segment_bytes)
        finally:
            for p in (snap, snap.with_name(snap.name + "-journal")):
                p.unlink(missing_ok=True)
        info = _info(final)
        _prune(backup_dir, keep, final, key)
    return info


def _snapshot(store_path: Path, dest: Path) -> None:
    """Copy the store into DEST with the SQLite backup API in one step: one read transaction, so the copy
    is consistent, and in WAL mode writers are not held up meanwhile. DEST ends in rollback-journal mode,
    a single self-contained file."""
    try:
        src = sqlite3.connect(store_path.resolve().as_uri() + "?mode=rw", uri=True, timeout=30)
        try:
            dst = sqlite3.connect(str(dest), isolation_level=None)
            try:
                src.backup(dst)
                dst.execute("PRAGMA journal_mode=DELETE")
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as exc:
        raise BackupError(f"{store_path}: cannot snapshot the store: {exc}") from None


def strip_indexes(db: Path) -> list[str]:
    """Drop the secondary indexes of the snapshot DB with secure_delete on, so their pages become zeroed free
    pages (an index on a hash changes all over each hour; a table grows at its end); return their CREATE
    statements, run again on restore. Indexes SQLite makes for UNIQUE constraints stay."""
    try:
        conn = sqlite3.connect(str(db), isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=OFF")  # a temporary file: a crash leaves it to remove_partials
            conn.execute("PRAGMA synchronous=OFF")
            conn.execute("PRAGMA secure_delete=ON")
            rows = conn.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
            ).fetchall()
            conn.execute("BEGIN")
            for name, _ in rows:
                conn.execute('DROP INDEX "{}"'.format(str(name).replace('"', '""')))
            conn.execute("COMMIT")
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise BackupError(f"{db}: cannot prepare the snapshot of the store: {exc}") from None
    return [str(sql) for _, sql in rows]


def write_generation(
    snap: Path,
    indexes: list[str] | None,
    backup_dir: Path,
    key: BackupKey,
    created: float,
    final: Path,
    segment_bytes: int,
) -> chunks.Stored | None:
    """Write the generation FINAL (a new name, or one rewritten in place) of snapshot SNAP: its chunks and
    a manifest listing them and INDEXES, or with INDEXES None the whole snapshot (version 1)."""
    partial: Path | None = None
    stored = None
    try:
        with as_backup_error(backup_dir, "cannot write the backup"):
            if indexes is not None:
                with snap.open("rb") as f:
                    stored = chunks.store_chunks(f, backup_dir, chunks.ChunkKeys.derive(key.key), _PARTIAL_PREFIX)
                manifest = pack_manifest(snap.stat().st_size, indexes, stored.ids)
            fd, partial_name = tempfile.mkstemp(prefix=_PARTIAL_PREFIX, suffix=".tmp", dir=backup_dir)
            partial = Path(partial_name)
            with os.fdopen(fd, "wb") as out, io.BytesIO(manifest) if indexes is not None else snap.open("rb") as src:
                seal(src, out, key, created, segment_bytes, 1 if indexes is None else 2)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, final)
            partial = None
            fsync_dir(backup_dir)
    finally:
        if partial is not None:
            partial.unlink(missing_ok=True)
    return stored


def _free_name(backup_dir: Path, now: float) -> Path:
    """cmcd-store-YYYYMMDDTHHMMSSZ.bak in UTC, with -2, -3, ... for more backups in the same second, each
    numbered after the highest there (never reusing a pruned name, which would sort before the others)."""
    stamp = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime(STAMP)
    taken = [
        int(m.group(2) or 1)
        for m in map(_NAME_RE.match, os.listdir(backup_dir))
        if m is not None and m.group(1) == stamp
    ]
    seq = max(taken, default=0) + 1
    return backup_dir / (f"cmcd-store-{stamp}Z.bak" if seq == 1 else f"cmcd-store-{stamp}Z-{seq}.bak")


def _prune(backup_dir: Path, keep: int, written: Path, key: BackupKey) -> None:
    """Remove all but the newest KEEP backups (never the one just WRITTEN, even if the clock went back)."""
    old = [b for b in list_backups(backup_dir)[:-keep] if b.path != written]
    for b in old:
        try:
            b.path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("event=backup_prune_failed file=%s error=%r", b.path, exc.strerror or str(exc))
            continue
        log.info("event=backup_pruned file=%s", b.path)
    if old:
        fsync_dir(backup_dir)
        collect_chunks(backup_dir, key, overwrite=False)


def collect_chunks(backup_dir: Path, key: BackupKey, *, overwrite: bool) -> int:
    """Remove the chunks no kept generation lists (left by a pruned, rewritten or unfinished generation);
    return how many went. A manifest that cannot be read stops it: its chunks are unknown, so none go."""
    referenced: set[bytes] = set()
    for b in list_backups(backup_dir):
        try:
            manifest = read_manifest(b.path, key)
        except BackupError as exc:
            log.warning("event=backup_chunks_kept reason=%r", f"a generation cannot be read: {exc}")
            return 0
        if manifest is not None:
            referenced.update(manifest.ids)
    unused = chunks.chunks_on_disk(backup_dir) - referenced
    removed = chunks.remove_chunks(backup_dir, sorted(unused), overwrite=overwrite)
    if removed:
        log.info("event=backup_chunks_removed count=%d", removed)
    return removed


def remove_partials(backup_dir: Path, work: Path) -> None:
    """Remove what a backup that died midway left behind (the lock is held, so no backup is running)."""
    for directory, prefix in ((backup_dir, _PARTIAL_PREFIX), (work, SNAPSHOT_PREFIX)):
        try:
            names = [e.name for e in os.scandir(directory) if e.name.startswith(prefix)]
        except OSError:
            continue
        for name in names:
            with contextlib.suppress(OSError):
                (directory / name).unlink()
                log.info("event=backup_partial_removed file=%s", directory / name)


# -- listing -------------------------------------------------------------------------------


def list_backups(backup_dir: Path) -> list[BackupInfo]:
    """The backups in BACKUP_DIR, oldest first; other files there are ignored. No directory: none."""
    found: list[tuple[float, int, BackupInfo]] = []
    try:
        entries = list(os.scandir(backup_dir))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise BackupError(f"{backup_dir}: cannot list backups (backup.dir): {exc.strerror or exc}") from None
    for entry in entries:
        m = _NAME_RE.match(entry.name)
        if m is None:
            continue
        try:
            info = _info(Path(entry.path))
        except (FileNotFoundError, BackupError):
            continue  # pruned meanwhile
        found.append((info.created, int(m.group(2) or 1), info))
    found.sort(key=lambda t: (t[0], t[1]))
    return [info for _, _, info in found]


def _info(path: Path) -> BackupInfo:
    m = _NAME_RE.match(path.name)
    if m is None:
        raise BackupError(f"{path}: not a backup file name (cmcd-store-YYYYMMDDTHHMMSSZ.bak)")
    created = datetime.datetime.strptime(m.group(1), STAMP).replace(tzinfo=datetime.UTC).timestamp()
    return BackupInfo(name=path.name, path=path, size_bytes=path.stat().st_size, created=created)
