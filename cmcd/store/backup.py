"""Encrypted backups of the store: take, list, verify, restore and purge a tenant from them; never the spool
or a message body.

A backup (a generation) is an online snapshot of the store's SQLite file (the backup API, in one step, so it
is one consistent read transaction while intake keeps writing in WAL mode), sealed with AES-256-GCM under a
key of its own (backup.key_file, never the data key). Everything here blocks: callers on the event loop run it
in a thread.

Since version 2 a generation is deduplicated: in the snapshot the secondary indexes are dropped with
secure_delete on (their pages become zeroed free pages; their CREATE statements are kept, and run again on
restore), so what is left changes only where rows changed, and the file is cut into 64 KiB chunks kept once
each under backup.dir/chunks (cmcd.store.backup_chunks). The generation's file, cmcd-store-TIME.bak, is then
a manifest: the index statements, the snapshot's size and its chunk ids, sealed as below. An hour's
generation costs the chunks that changed in that hour; pruning a generation removes the chunks no kept
generation uses.

File format, versions 1 (the whole snapshot) and 2 (a manifest)::

    header   44 bytes: magic "CMCD-BAK", version (1 or 2), compression (1 = zlib), log2 of the segment size,
             a zero byte, creation time (microseconds, big-endian), key id (8 bytes), salt (16 bytes)
    segments the compressed snapshot (v1) or manifest (v2) cut into segments of 2**n bytes, the last one shorter (maybe empty),
             each AES-256-GCM sealed (16-byte tag) with the header as associated data

Each file has its own key, HKDF-SHA256(backup key, salt); segment i is sealed under the nonce
i (11 bytes, big-endian) + 1 if it is the last segment else 0. So a changed header or segment fails
authentication, and so do segments swapped, dropped, or cut off at the end (the last segment left
would not be marked last). Nothing decrypted is used before the whole file has authenticated.

Manifest (v2, the plaintext of the segments): the line "cmcd-manifest-v2", a line of JSON ({"db_bytes",
"chunk_bytes", "chunks", "indexes"}), then the chunk ids, 16 bytes each.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hmac
import io
import json
import logging
import os
import re
import secrets
import sqlite3
import stat
import struct
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cmcd import crypto
from cmcd.errors import BackupError, KeyFileError
from cmcd.store import backup_chunks as chunks
from cmcd.store.store import _KEY_CHECK, delete_tenant_rows

log = logging.getLogger("cmcd.backup")

MAGIC = b"CMCD-BAK"
#: the version take_backup writes (2: a manifest of deduplicated chunks); version 1 files are still read
FORMAT_VERSION = 2
_VERSIONS = (1, 2)
_MANIFEST_MAGIC = b"cmcd-manifest-v2\n"
_ZLIB = 1
#: zlib level 3: half the time of the default 6 on a store, 1-2% larger (encrypted addresses do not compress)
_ZLIB_LEVEL = 3
_HEADER = struct.Struct(">8sBBBBQ8s16s")
HEADER_BYTES = _HEADER.size
_TAG_BYTES = 16
#: compressed bytes per sealed segment (1 MiB); a reader accepts 4 KiB to 16 MiB
SEGMENT_BYTES = 1 << 20
_SEGMENT_LOG2 = range(12, 25)
_KEY_HEADER = "cmcd-backup-key-v1"
_DATA_KEY_HEADER = "cmcd-data-key-v1"
_NAME_RE = re.compile(r"^cmcd-store-(\d{8}T\d{6})Z(?:-(\d+))?\.bak$")
_STAMP = "%Y%m%dT%H%M%S"
_LOCK_NAME = ".cmcd-backup.lock"
_PARTIAL_PREFIX = ".cmcd-store-"
_SNAPSHOT_PREFIX = ".cmcd-snapshot-"
#: tables whose rows verify and restore count, when the backup has them
COUNTED_TABLES = ("tenants", "users", "domains", "dkim_keys", "suppressions", "mail_log", "login_log", "ops_log")
# SQLite's unix VFS holds a shared lock on this byte of the -shm file for as long as a connection is open
_SHM_DMS_BYTE = 128


@dataclass(frozen=True)
class BackupInfo:
    """One backup file (a generation): its name, where it is, its size and when it was taken (Unix time, UTC)."""

    name: str
    path: Path
    size_bytes: int
    created: float


@dataclass(frozen=True)
class VerifyResult:
    """A backup that authenticated, decompressed and passed SQLite's integrity check."""

    name: str
    path: Path
    size_bytes: int
    created: float
    db_bytes: int
    integrity: str
    #: rows per table, for the tables in COUNTED_TABLES the backup has
    rows: dict[str, int]
    #: whether the data key given decrypts the backup's key check (None: no data key given)
    data_key_ok: bool | None = None


@dataclass(frozen=True)
class RestoreResult:
    verified: VerifyResult
    store_path: Path
    #: where the store that was replaced now is (None: there was none)
    previous: Path | None


@dataclass(frozen=True)
class BackupKey:
    """The backup key: 32 bytes, used only to derive each file's AES-256-GCM key."""

    key: bytes = field(repr=False)

    @property
    def key_id(self) -> bytes:
        """A public 8-byte name for the key, kept in each header so a wrong key gets a clear message."""
        return hmac.digest(self.key, b"cmcd backup key id", "sha256")[:8]

    def file_aead(self, salt: bytes) -> AESGCM:
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"cmcd backup v1 file key")
        return AESGCM(hkdf.derive(self.key))


@dataclass(frozen=True)
class PurgeResult:
    """A tenant removed from the kept backups: generations looked at and rewritten, chunks erased."""

    generations: int
    rewritten: list[str]
    tenant_ids: list[int]
    rows: dict[str, int]
    chunks_removed: int


@dataclass(frozen=True)
class _Manifest:
    db_bytes: int
    indexes: list[str]
    ids: list[bytes]


@dataclass(frozen=True)
class _Header:
    raw: bytes
    version: int
    created: float
    segment_bytes: int
    key_id: bytes
    salt: bytes


# -- the backup key ------------------------------------------------------------------------


def generate_backup_key_file(path: Path) -> None:
    """Write a new backup key file readable by its owner only (0600); refuse to overwrite one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(f"{_KEY_HEADER}\nkey {secrets.token_hex(32)}\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(path.parent)
    except FileExistsError:
        raise
    except OSError as exc:
        raise BackupError(
            f"{path}: cannot create the backup key file (backup.key_file): {exc.strerror or exc}; "
            "make its directory writable by cmcd or point backup.key_file elsewhere"
        ) from None


def read_backup_key(path: Path) -> BackupKey:
    """The backup key in PATH; refused when missing, readable by group or others, or not a backup key."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise BackupError(
            f"{path}: backup key file missing (backup.key_file); a backup can only be read with the key it was "
            "written with"
        ) from None
    except OSError as exc:
        raise BackupError(f"{path}: cannot read the backup key file (backup.key_file): {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise BackupError(
            f"{path}: backup key file is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run: chmod 600 {path}"
        )
    try:
        lines = path.read_text().split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not text"
        raise BackupError(f"{path}: cannot read the backup key file (backup.key_file): {reason}") from None
    if lines[0] == _DATA_KEY_HEADER:
        raise BackupError(
            f"{path}: this is the store's data key, not a backup key; backup.key_file must name a file of its own"
        )
    try:
        if lines[0] != _KEY_HEADER:
            raise ValueError
        fields = dict(line.split(" ", 1) for line in lines[1:] if line)
        key = bytes.fromhex(fields["key"])
        if len(key) != 32:
            raise ValueError
    except (ValueError, KeyError):
        raise BackupError(f"{path}: not a cmcd backup key file (backup.key_file)") from None
    return BackupKey(key)


def _load_key(path: Path, create: bool) -> BackupKey:
    if create and not path.exists():
        try:
            generate_backup_key_file(path)
        except FileExistsError:
            pass  # another backup made it a moment ago
        else:
            log.warning(
                "event=backup_key_created file=%s note=%r",
                path,
                "keep a copy off this host: backups cannot be read without it",
            )
    return read_backup_key(path)


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
    if segment_bytes.bit_length() - 1 not in _SEGMENT_LOG2 or segment_bytes & (segment_bytes - 1):
        raise ValueError(f"segment_bytes must be a power of two from 4 KiB to 16 MiB, not {segment_bytes}")
    if not store_path.is_file():
        raise BackupError(f"{store_path}: no store to back up (store.path)")
    key = _load_key(key_file, create=True)
    work = work_dir if work_dir is not None else store_path.parent
    with _io(backup_dir, "cannot create the backup directory (backup.dir)"):
        backup_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _locked(backup_dir):
        _remove_partials(backup_dir, work)
        with _io(work, "cannot write the snapshot of the store"):
            fd, snap_name = tempfile.mkstemp(prefix=_SNAPSHOT_PREFIX, suffix=".db", dir=work)
        os.close(fd)
        snap = Path(snap_name)
        try:
            _snapshot(store_path, snap)
            final = _free_name(backup_dir, now)
            indexes = _strip_indexes(snap) if chunked else None
            _write_generation(snap, indexes, backup_dir, key, now, final, segment_bytes)
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


def _strip_indexes(db: Path) -> list[str]:
    """Drop the secondary indexes of the snapshot DB with secure_delete on, so their pages become zeroed free
    pages (an index on a hash changes all over each hour; a table grows at its end); return their CREATE
    statements, run again on restore. Indexes SQLite makes for UNIQUE constraints stay."""
    try:
        conn = sqlite3.connect(str(db), isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=OFF")  # a temporary file: a crash leaves it to _remove_partials
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


def _write_generation(
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
        with _io(backup_dir, "cannot write the backup"):
            if indexes is not None:
                with snap.open("rb") as f:
                    stored = chunks.store_chunks(f, backup_dir, chunks.ChunkKeys.derive(key.key), _PARTIAL_PREFIX)
                head = {"db_bytes": snap.stat().st_size, "chunk_bytes": chunks.CHUNK_BYTES,
                        "chunks": len(stored.ids), "indexes": indexes}  # fmt: skip
                manifest = _MANIFEST_MAGIC + json.dumps(head).encode() + b"\n" + b"".join(stored.ids)
            fd, partial_name = tempfile.mkstemp(prefix=_PARTIAL_PREFIX, suffix=".tmp", dir=backup_dir)
            partial = Path(partial_name)
            with os.fdopen(fd, "wb") as out, io.BytesIO(manifest) if indexes is not None else snap.open("rb") as src:
                _seal(src, out, key, created, segment_bytes, 1 if indexes is None else 2)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, final)
            partial = None
            _fsync_dir(backup_dir)
    finally:
        if partial is not None:
            partial.unlink(missing_ok=True)
    return stored


def _seal(src: BinaryIO, out: BinaryIO, key: BackupKey, created: float, segment_bytes: int, version: int) -> None:
    salt = os.urandom(16)
    created_us = max(0, round(created * 1_000_000))
    log2 = segment_bytes.bit_length() - 1
    header = _HEADER.pack(MAGIC, version, _ZLIB, log2, 0, created_us, key.key_id, salt)
    aead = key.file_aead(salt)
    out.write(header)
    compressor = zlib.compressobj(_ZLIB_LEVEL)
    pending = bytearray()
    index = 0

    def emit(final: bool) -> None:
        nonlocal index
        while len(pending) >= segment_bytes:
            out.write(aead.encrypt(_nonce(index, False), bytes(pending[:segment_bytes]), header))
            del pending[:segment_bytes]
            index += 1
        if final:  # shorter than a segment (maybe empty): that is how a reader knows it is the last
            out.write(aead.encrypt(_nonce(index, True), bytes(pending), header))

    while block := src.read(4 * SEGMENT_BYTES):
        pending += compressor.compress(block)
        emit(False)
    pending += compressor.flush()
    emit(True)


def _nonce(index: int, final: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


def _free_name(backup_dir: Path, now: float) -> Path:
    """cmcd-store-YYYYMMDDTHHMMSSZ.bak in UTC, with -2, -3, ... for more backups in the same second, each
    numbered after the highest there (never reusing a pruned name, which would sort before the others)."""
    stamp = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime(_STAMP)
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
        _fsync_dir(backup_dir)
        _collect_chunks(backup_dir, key, overwrite=False)


def _collect_chunks(backup_dir: Path, key: BackupKey, *, overwrite: bool) -> int:
    """Remove the chunks no kept generation lists (left by a pruned, rewritten or unfinished generation);
    return how many went. A manifest that cannot be read stops it: its chunks are unknown, so none go."""
    referenced: set[bytes] = set()
    for b in list_backups(backup_dir):
        try:
            manifest = _read_manifest(b.path, key)
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


def _remove_partials(backup_dir: Path, work: Path) -> None:
    """Remove what a backup that died midway left behind (the lock is held, so no backup is running)."""
    for directory, prefix in ((backup_dir, _PARTIAL_PREFIX), (work, _SNAPSHOT_PREFIX)):
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
    created = datetime.datetime.strptime(m.group(1), _STAMP).replace(tzinfo=datetime.UTC).timestamp()
    return BackupInfo(name=path.name, path=path, size_bytes=path.stat().st_size, created=created)


# -- reading: verify and restore -----------------------------------------------------------


def verify_backup(
    file: Path, key_file: Path, *, data_keys: crypto.DataKeys | None = None, work_dir: Path | None = None
) -> VerifyResult:
    """Authenticate and decrypt FILE into a private temporary directory in WORK_DIR, run SQLite's integrity
    check on it and count its rows; raise BackupError (saying what is wrong) for a file that fails any step.
    With DATA_KEYS, also report whether they are the data key the backed-up store was written with."""
    key = read_backup_key(key_file)
    with _io(work_dir or Path(tempfile.gettempdir()), "cannot make a temporary directory to verify in"):
        tmp = tempfile.TemporaryDirectory(prefix=".cmcd-verify-", dir=work_dir)
    with tmp as directory:
        db = Path(directory) / "store.db"
        with _io(db, "cannot write the decrypted backup"), db.open("wb") as out:
            header, indexes = _unseal_store(file, key, out)
        _rebuild_indexes(file, db, indexes)
        return _inspect(file, header, db, data_keys)


def restore_backup(
    file: Path, key_file: Path, store_path: Path, *, data_key_file: Path | None = None, now: float
) -> RestoreResult:
    """Replace the store at STORE_PATH with the one in backup FILE; cmcd must be stopped.

    FILE is verified in full first (authentication, integrity check, and with DATA_KEY_FILE that the key
    there is the one the backed-up store was written with); anything wrong refuses the restore and leaves
    the store as it was. The restored file is written next to the store, fsynced and renamed over it; the
    store it replaces (with its -wal, if any) is kept as STORE.pre-restore-YYYYMMDDTHHMMSSZ.
    """
    if store_in_use(store_path):
        raise BackupError(f"{store_path}: the store is open in another process (is cmcd running?); stop cmcd first")
    key = read_backup_key(key_file)
    data_keys = None
    if data_key_file is not None:
        try:
            data_keys = crypto.read_key_file(data_key_file)
        except KeyFileError as exc:
            raise BackupError(
                f"{exc}; cmcd cannot open a restored store without the data key it was written with: put that "
                "key file in place, then restore again"
            ) from None
    directory = store_path.parent
    with _io(directory, "cannot write the restored store next to store.path"):
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".cmcd-restore-", suffix=".db", dir=directory)
    tmp = Path(tmp_name)
    renamed = False
    try:
        with _io(tmp, "cannot write the restored store"), os.fdopen(fd, "wb") as out:
            header, indexes = _unseal_store(file, key, out)
        _rebuild_indexes(file, tmp, indexes)
        with _io(tmp, "cannot write the restored store"), tmp.open("rb+") as f:
            os.fsync(f.fileno())
        verified = _inspect(file, header, tmp, data_keys)
        if verified.data_key_ok is False:
            raise BackupError(
                f"{file}: the store in this backup was written with another data key than {data_key_file} "
                "(store.key_file); put the data key file that was in use when it was taken there, then restore again"
            )
        with _io(store_path, "cannot replace the store"):
            _match_owner(tmp, store_path)
            previous = _set_aside(store_path, now)
            os.replace(tmp, store_path)
            renamed = True
            _fsync_dir(directory)
    finally:
        if not renamed:
            tmp.unlink(missing_ok=True)
    return RestoreResult(verified=verified, store_path=store_path, previous=previous)


def purge_tenant(
    backup_dir: Path, key_file: Path, name: str, *, work_dir: Path, segment_bytes: int = SEGMENT_BYTES
) -> PurgeResult:
    """Remove tenant NAME and every row of it from every kept generation in BACKUP_DIR, so a purge holds for
    the backups too. Each generation that has the tenant is decrypted into WORK_DIR, its rows are deleted
    there with secure_delete on (the store's own purge, delete_tenant_rows; no VACUUM, so pages stay where
    they are and the rewritten generations still share their chunks), and it is written again under its
    own name; a version 1 file is overwritten with zeros once replaced. Then every chunk no generation
    lists any more is overwritten with zeros and unlinked. Holds the backup lock: an hourly backup waits.
    """
    key = read_backup_key(key_file)
    if not backup_dir.is_dir():
        return PurgeResult(0, [], [], {}, 0)
    rewritten: list[str] = []
    tenant_ids: set[int] = set()
    rows: dict[str, int] = {}
    with _locked(backup_dir):
        _remove_partials(backup_dir, work_dir)
        generations = list_backups(backup_dir)
        for g in generations:
            with _io(work_dir, "cannot write a generation to purge"):
                fd, tmp_name = tempfile.mkstemp(prefix=_SNAPSHOT_PREFIX, suffix=".db", dir=work_dir)
            tmp = Path(tmp_name)
            try:
                with _io(tmp, "cannot write a generation to purge"), os.fdopen(fd, "wb") as out:
                    header, indexes = _unseal_store(g.path, key, out)
                found = _delete_tenant(g.path, tmp, name)
                if found is None:
                    continue
                tenant_ids.add(found[0])
                for table, n in found[1].items():
                    rows[table] = rows.get(table, 0) + n
                if header.version == 1:
                    indexes = _strip_indexes(tmp)
                with _io(g.path, "cannot rewrite the generation"), g.path.open("r+b") as old:
                    _write_generation(tmp, indexes, backup_dir, key, header.created, g.path, segment_bytes)
                    if header.version == 1:  # the whole old snapshot was in it
                        old.write(bytes(os.fstat(old.fileno()).st_size))
                        old.flush()
                        os.fsync(old.fileno())
                rewritten.append(g.name)
                log.info("event=backup_tenant_purged file=%s tenant_id=%d", g.path, found[0])
            finally:
                tmp.unlink(missing_ok=True)
                tmp.with_name(tmp.name + "-journal").unlink(missing_ok=True)
        removed = _collect_chunks(backup_dir, key, overwrite=True)
    return PurgeResult(len(generations), rewritten, sorted(tenant_ids), rows, removed)


def _delete_tenant(file: Path, db: Path, name: str) -> tuple[int, dict[str, int]] | None:
    """Delete tenant NAME's rows from the decrypted generation DB with secure_delete on (and without a
    journal, which would keep them in another file); None when it has no such tenant."""
    try:
        conn = sqlite3.connect(str(db), isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=OFF")
            conn.execute("PRAGMA synchronous=OFF")
            conn.execute("PRAGMA secure_delete=ON")
            row = conn.execute("SELECT id FROM tenants WHERE name = ?", (name,)).fetchone()
            if row is None:
                return None
            tenant_id = int(row[0])
            conn.execute("BEGIN")
            counts = delete_tenant_rows(conn, tenant_id)
            # the mark of a purge begun names the tenant
            conn.execute("DELETE FROM meta WHERE key = ?", (f"purge:{tenant_id}",))
            conn.execute("COMMIT")
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise BackupError(f"{file}: cannot remove the tenant from this generation: {exc}") from None
    return tenant_id, counts


def store_in_use(store_path: Path) -> bool:
    """Whether another process has the store open: SQLite holds a shared lock on a byte of the -shm file
    while a WAL connection is open. Do not call it in a process that has the store open itself (closing
    the descriptor used here would drop that process's own SQLite locks)."""
    shm = store_path.with_name(store_path.name + "-shm")
    try:
        fd = os.open(shm, os.O_RDWR)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise BackupError(f"{shm}: cannot check whether the store is in use: {exc.strerror or exc}") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _SHM_DMS_BYTE)
    except OSError:
        return True
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, _SHM_DMS_BYTE)
        return False
    finally:
        os.close(fd)


def _set_aside(store_path: Path, now: float) -> Path | None:
    """Move the store and its -wal (and a -journal) aside and drop its -shm, so none of them can be
    replayed onto the restored file; return where the old store went."""
    stamp = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime(_STAMP)
    previous = store_path.with_name(f"{store_path.name}.pre-restore-{stamp}Z")
    seq = 1
    while previous.exists():
        seq += 1
        previous = store_path.with_name(f"{store_path.name}.pre-restore-{stamp}Z-{seq}")
    moved = False
    if store_path.exists():
        os.replace(store_path, previous)
        moved = True
    for suffix in ("-wal", "-journal"):
        side = store_path.with_name(store_path.name + suffix)
        if side.exists():
            if moved:
                os.replace(side, previous.with_name(previous.name + suffix))
            else:
                side.unlink()
    store_path.with_name(store_path.name + "-shm").unlink(missing_ok=True)
    return previous if moved else None


def _match_owner(tmp: Path, store_path: Path) -> None:
    """Run as root, give the restored file the old store's owner, so the daemon's user can open it."""
    if os.geteuid() != 0:
        return
    try:
        st = store_path.stat()
    except FileNotFoundError:
        st = store_path.parent.stat()
    os.chown(tmp, st.st_uid, st.st_gid)


def _read_header(file: Path, raw: bytes, key: BackupKey) -> _Header:
    if not raw:
        raise BackupError(f"{file}: empty file, not a backup (truncated to nothing?); it is refused")
    if len(raw) < HEADER_BYTES:
        if raw.startswith(MAGIC) or MAGIC.startswith(raw):
            raise BackupError(f"{file}: truncated: {len(raw)} bytes, shorter than a backup header; it is refused")
        raise BackupError(f"{file}: not a cmcd store backup (no {MAGIC.decode()} header)")
    magic, version, compression, log2, zero, created_us, key_id, salt = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise BackupError(f"{file}: not a cmcd store backup (no {MAGIC.decode()} header)")
    if version not in _VERSIONS:
        raise BackupError(
            f"{file}: backup format version {version}; this cmcd reads versions {_VERSIONS[0]} to {_VERSIONS[-1]} "
            "(written by a newer cmcd, or altered)"
        )
    if compression != _ZLIB or log2 not in _SEGMENT_LOG2 or zero != 0:
        raise BackupError(f"{file}: the backup header is damaged or altered; it is refused")
    if not hmac.compare_digest(key_id, key.key_id):
        raise BackupError(
            f"{file}: written with another backup key (key id {key_id.hex()}); backup.key_file has key id "
            f"{key.key_id.hex()}"
        )
    return _Header(
        raw=raw, version=version, created=created_us / 1_000_000, segment_bytes=1 << log2, key_id=key_id, salt=salt
    )


def _unseal(file: Path, key: BackupKey, out: BinaryIO) -> _Header:
    """Authenticate, decrypt and decompress FILE into OUT; raise BackupError at the first thing wrong."""
    try:
        f = file.open("rb")
    except OSError as exc:
        raise BackupError(f"{file}: cannot read the backup: {exc.strerror or exc}") from None
    with f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise BackupError(f"{file}: not a regular file")
        header = _read_header(file, f.read(HEADER_BYTES), key)
        aead = key.file_aead(header.salt)
        sealed_bytes = header.segment_bytes + _TAG_BYTES
        inflate = zlib.decompressobj()
        index, offset = 0, HEADER_BYTES
        chunk = f.read(sealed_bytes)
        while True:
            following = b"" if len(chunk) < sealed_bytes else f.read(sealed_bytes)
            final = not following
            try:
                if len(chunk) < _TAG_BYTES:
                    raise InvalidTag
                plain = aead.decrypt(_nonce(index, final), chunk, header.raw)
            except InvalidTag:
                # a valid file always ends in a sealed last segment (at least its tag), never at a segment boundary
                if not chunk or (len(chunk) == sealed_bytes and _opens(aead, index, chunk, header.raw)):
                    raise BackupError(
                        f"{file}: truncated: it ends at byte {offset + len(chunk)}, before its last segment; "
                        "it is refused"
                    ) from None
                raise BackupError(
                    f"{file}: fails authentication (segment {index} at byte {offset}): the file was altered, "
                    "damaged or cut short; it is refused"
                ) from None
            _inflate(file, inflate, plain, out)
            if final:
                break
            index, offset, chunk = index + 1, offset + len(chunk), following
        try:
            out.write(inflate.flush())
            complete = inflate.eof and not inflate.unused_data
        except zlib.error:
            complete = False
        if not complete:
            raise BackupError(f"{file}: authenticated, but its compressed data is incomplete; it is refused")
    return header


def _peek_version(file: Path) -> int | None:
    """The format version byte of FILE's header, if it has one (_unseal says what is wrong otherwise)."""
    try:
        with file.open("rb") as f:
            raw = f.read(len(MAGIC) + 1)
    except OSError:
        return None
    return raw[len(MAGIC)] if len(raw) > len(MAGIC) and raw.startswith(MAGIC) else None


def _read_manifest(file: Path, key: BackupKey) -> _Manifest | None:
    """The manifest in FILE, authenticated; None for a version 1 file (the whole snapshot, no chunks)."""
    if _peek_version(file) == 1:
        return None
    buf = io.BytesIO()
    header = _unseal(file, key, buf)
    if header.version == 1:
        return None
    data = buf.getvalue()
    try:
        if not data.startswith(_MANIFEST_MAGIC):
            raise ValueError
        line, _, ids = data[len(_MANIFEST_MAGIC) :].partition(b"\n")
        head = json.loads(line)
        n, db_bytes, indexes = int(head["chunks"]), int(head["db_bytes"]), head["indexes"]
        if len(ids) != n * chunks.ID_BYTES or head["chunk_bytes"] != chunks.CHUNK_BYTES:
            raise ValueError
        if not isinstance(indexes, list) or not all(isinstance(x, str) for x in indexes):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise BackupError(
            f"{file}: authenticated, but its manifest is not one this cmcd reads; it is refused"
        ) from None
    step = chunks.ID_BYTES
    return _Manifest(db_bytes, indexes, [ids[i : i + step] for i in range(0, len(ids), step)])


def _unseal_store(file: Path, key: BackupKey, out: BinaryIO) -> tuple[_Header, list[str]]:
    """Write the store of generation FILE, either format, into OUT; return its header and the CREATE INDEX
    statements still to run on it (none for version 1). Every chunk must authenticate and hash right."""
    if _peek_version(file) != 2:
        return _unseal(file, key, out), []
    buf = io.BytesIO()
    header = _unseal(file, key, buf)
    manifest = _read_manifest(file, key)
    assert manifest is not None
    ck = chunks.ChunkKeys.derive(key.key)
    written = 0
    for i, cid in enumerate(manifest.ids):
        plain = chunks.read_chunk(file.parent, ck, cid, file, i)
        out.write(plain)
        written += len(plain)
    if written != manifest.db_bytes:
        raise BackupError(f"{file}: its chunks hold {written} bytes, its manifest says {manifest.db_bytes}; refused")
    return header, manifest.indexes


def _rebuild_indexes(file: Path, db: Path, indexes: list[str]) -> None:
    """Run the CREATE INDEX statements a version 2 generation keeps, on its store decrypted into DB."""
    if not indexes:
        return
    try:
        conn = sqlite3.connect(str(db), isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=OFF")  # a temporary file, fsynced by the caller
            conn.execute("PRAGMA synchronous=OFF")
            conn.execute("BEGIN")
            for sql in indexes:
                conn.execute(sql)
            conn.execute("COMMIT")
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise BackupError(f"{file}: decrypts, but its indexes cannot be built again ({exc}); it is refused") from None


def _opens(aead: AESGCM, index: int, chunk: bytes, aad: bytes) -> bool:
    """Whether CHUNK is a whole segment that is not the last (so the file was cut after it)."""
    try:
        aead.decrypt(_nonce(index, False), chunk, aad)
    except InvalidTag:
        return False
    return True


def _inflate(file: Path, inflate: zlib._Decompress, data: bytes, out: BinaryIO) -> None:
    """Decompress DATA into OUT at most 16 MiB at a time."""
    try:
        while data:
            out.write(inflate.decompress(data, 16 << 20))
            data = inflate.unconsumed_tail
    except zlib.error as exc:
        raise BackupError(f"{file}: authenticated, but its compressed data is damaged ({exc}); it is refused") from None


def _inspect(file: Path, header: _Header, db: Path, data_keys: crypto.DataKeys | None) -> VerifyResult:
    try:
        conn = sqlite3.connect(db.resolve().as_uri() + "?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise BackupError(f"{file}: cannot open the decrypted store: {exc}") from None
    try:
        problems = [str(r[0]) for r in conn.execute("PRAGMA integrity_check(5)")]
        if problems != ["ok"]:
            raise BackupError(f"{file}: SQLite's integrity check fails: {'; '.join(problems)}")
        tables = {str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"meta", "tenants"} <= tables:
            raise BackupError(f"{file}: decrypts, but holds no cmcd store (no meta and tenants tables)")
        rows = {
            t: int(conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]) for t in COUNTED_TABLES if t in tables
        }
        data_key_ok = None if data_keys is None else _key_matches(conn, data_keys)
    except sqlite3.Error as exc:
        raise BackupError(f"{file}: decrypts, but is not a readable SQLite store ({exc}); it is refused") from None
    finally:
        conn.close()
    return VerifyResult(
        name=file.name,
        path=file,
        size_bytes=file.stat().st_size,
        created=header.created,
        db_bytes=db.stat().st_size,
        integrity="ok",
        rows=rows,
        data_key_ok=data_key_ok,
    )


def _key_matches(conn: sqlite3.Connection, keys: crypto.DataKeys) -> bool:
    row = conn.execute("SELECT value FROM meta WHERE key = 'key_check'").fetchone()
    if row is None:
        return False
    try:
        return keys.decrypt(bytes.fromhex(row[0])) == _KEY_CHECK
    except (KeyFileError, ValueError, TypeError):
        return False


# -- small file-system helpers -------------------------------------------------------------


@contextlib.contextmanager
def _io(path: Path, what: str) -> Iterator[None]:
    """Turn an OSError into a BackupError naming PATH and what was being done."""
    try:
        yield
    except BackupError:
        raise
    except OSError as exc:
        raise BackupError(f"{exc.filename or path}: {what}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def _locked(backup_dir: Path) -> Iterator[None]:
    with _io(backup_dir, "cannot lock the backup directory (backup.dir)"):
        fd = os.open(backup_dir / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
