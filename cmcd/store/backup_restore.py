"""Reading a backup back: verifying a generation (authentication, SQLite's integrity check, row counts,
the data key) and restoring it over the store of a stopped cmcd; never writes a generation.

Everything here blocks: callers on the event loop run it in a thread.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cmcd import crypto
from cmcd.errors import BackupError, KeyFileError
from cmcd.store.backup_file import Header, unseal_store
from cmcd.store.backup_fs import as_backup_error, fsync_dir
from cmcd.store.backup_key import read_backup_key
from cmcd.store.backup_take import STAMP
from cmcd.store.store import KEY_CHECK

#: tables whose rows verify and restore count, when the backup has them
COUNTED_TABLES = ("tenants", "users", "domains", "dkim_keys", "suppressions", "mail_log", "login_log", "ops_log")
# SQLite's unix VFS holds a shared lock on this byte of the -shm file for as long as a connection is open
_SHM_DMS_BYTE = 128


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


def verify_backup(
    file: Path, key_file: Path, *, data_keys: crypto.DataKeys | None = None, work_dir: Path | None = None
) -> VerifyResult:
    """Authenticate and decrypt FILE into a private temporary directory in WORK_DIR, run SQLite's integrity
    check on it and count its rows; raise BackupError (saying what is wrong) for a file that fails any step.
    With DATA_KEYS, also report whether they are the data key the backed-up store was written with."""
    key = read_backup_key(key_file)
    with as_backup_error(work_dir or Path(tempfile.gettempdir()), "cannot make a temporary directory to verify in"):
        tmp = tempfile.TemporaryDirectory(prefix=".cmcd-verify-", dir=work_dir)
    with tmp as directory:
        db = Path(directory) / "store.db"
        with as_backup_error(db, "cannot write the decrypted backup"), db.open("wb") as out:
            header, indexes = unseal_store(file, key, out)
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
    with as_backup_error(directory, "cannot write the restored store next to store.path"):
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".cmcd-restore-", suffix=".db", dir=directory)
    tmp = Path(tmp_name)
    renamed = False
    try:
        with as_backup_error(tmp, "cannot write the restored store"), os.fdopen(fd, "wb") as out:
            header, indexes = unseal_store(file, key, out)
        _rebuild_indexes(file, tmp, indexes)
        with as_backup_error(tmp, "cannot write the restored store"), tmp.open("rb+") as f:
            os.fsync(f.fileno())
        verified = _inspect(file, header, tmp, data_keys)
        if verified.data_key_ok is False:
            raise BackupError(
                f"{file}: the store in this backup was written with another data key than {data_key_file} "
                "(store.key_file); put the data key file that was in use when it was taken there, then restore again"
            )
        with as_backup_error(store_path, "cannot replace the store"):
            _match_owner(tmp, store_path)
            previous = _set_aside(store_path, now)
            os.replace(tmp, store_path)
            renamed = True
            fsync_dir(directory)
    finally:
        if not renamed:
            tmp.unlink(missing_ok=True)
    return RestoreResult(verified=verified, store_path=store_path, previous=previous)


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
    stamp = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime(STAMP)
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


def _inspect(file: Path, header: Header, db: Path, data_keys: crypto.DataKeys | None) -> VerifyResult:
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
        return keys.decrypt(bytes.fromhex(row[0])) == KEY_CHECK
    except (KeyFileError, ValueError, TypeError):
        return False
