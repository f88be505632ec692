"""File-system helpers of the backup modules: an OSError as a BackupError that names the path, the
backup directory's lock, a directory's fsync; nothing about what a backup holds."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from cmcd.errors import BackupError

_LOCK_NAME = ".cmcd-backup.lock"


@contextlib.contextmanager
def as_backup_error(path: Path, what: str) -> Iterator[None]:
    """Turn an OSError into a BackupError naming PATH and what was being done."""
    try:
        yield
    except BackupError:
        raise
    except OSError as exc:
        raise BackupError(f"{exc.filename or path}: {what}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def locked(backup_dir: Path) -> Iterator[None]:
    """Hold BACKUP_DIR's lock (a lock file in it): one backup or purge at a time, a second one waits."""
    with as_backup_error(backup_dir, "cannot lock the backup directory (backup.dir)"):
        fd = os.open(backup_dir / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the names created, renamed or removed in directory PATH durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
