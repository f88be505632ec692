"""Purging a tenant from the kept backups, so a purge holds for them too: each generation that has the
tenant is decrypted, its rows deleted and written again; never touches the live store.

Everything here blocks: callers on the event loop run it in a thread.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cmcd.errors import BackupError
from cmcd.store.backup_file import SEGMENT_BYTES, unseal_store
from cmcd.store.backup_fs import as_backup_error, locked
from cmcd.store.backup_key import read_backup_key
from cmcd.store.backup_take import (
    SNAPSHOT_PREFIX,
    collect_chunks,
    list_backups,
    remove_partials,
    strip_indexes,
    write_generation,
)
from cmcd.store.purge_store import delete_tenant_rows

log = logging.getLogger("cmcd.backup")


@dataclass(frozen=True)
class PurgeResult:
    """A tenant removed from the kept backups: generations looked at and rewritten, chunks erased."""

    generations: int
    rewritten: list[str]
    tenant_ids: list[int]
    rows: dict[str, int]
    chunks_removed: int


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
    with locked(backup_dir):
        remove_partials(backup_dir, work_dir)
        generations = list_backups(backup_dir)
        for g in generations:
            with as_backup_error(work_dir, "cannot write a generation to purge"):
                fd, tmp_name = tempfile.mkstemp(prefix=SNAPSHOT_PREFIX, suffix=".db", dir=work_dir)
            tmp = Path(tmp_name)
            try:
                with as_backup_error(tmp, "cannot write a generation to purge"), os.fdopen(fd, "wb") as out:
                    header, indexes = unseal_store(g.path, key, out)
                found = _delete_tenant(g.path, tmp, name)
                if found is None:
                    continue
                tenant_ids.add(found[0])
                for table, n in found[1].items():
                    rows[table] = rows.get(table, 0) + n
                if header.version == 1:
                    indexes = strip_indexes(tmp)
                with as_backup_error(g.path, "cannot rewrite the generation"), g.path.open("r+b") as old:
                    write_generation(tmp, indexes, backup_dir, key, header.created, g.path, segment_bytes)
                    if header.version == 1:  # the whole old snapshot was in it
                        old.write(bytes(os.fstat(old.fileno()).st_size))
                        old.flush()
                        os.fsync(old.fileno())
                rewritten.append(g.name)
                log.info("event=backup_tenant_purged file=%s tenant_id=%d", g.path, found[0])
            finally:
                tmp.unlink(missing_ok=True)
                tmp.with_name(tmp.name + "-journal").unlink(missing_ok=True)
        removed = collect_chunks(backup_dir, key, overwrite=True)
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
