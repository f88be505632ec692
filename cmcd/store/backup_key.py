"""The backup key: its file (made 0600, refused when readable by others or when it is the data key)
and the per-file AES-256-GCM keys derived from it; never reads or writes a backup."""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cmcd.errors import BackupError
from cmcd.store.backup_fs import fsync_dir

log = logging.getLogger("cmcd.backup")

_KEY_HEADER = "cmcd-backup-key-v1"
_DATA_KEY_HEADER = "cmcd-data-key-v1"


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
        fsync_dir(path.parent)
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


def load_key(path: Path, create: bool) -> BackupKey:
    """The backup key in PATH; with CREATE, a missing key file is made first (and a warning logged)."""
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
