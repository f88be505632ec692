"""Encrypted backups of the store: take, list, verify, restore and purge a tenant from them; never the spool
or a message body.

This module is the interface (the calls cmcctl, the daemon's backup timer, tests and benches use); the
work is in one module per idea: backup_key (the backup key file), backup_file (one sealed generation
file, its format and manifest), backup_chunks (the deduplicated chunk store), backup_take (taking a
backup, pruning, listing), backup_restore (verifying and restoring) and backup_purge (a tenant out of
every kept generation). Everything blocks: callers on the event loop run it in a thread.
"""

from __future__ import annotations

from cmcd.store.backup_file import FORMAT_VERSION, HEADER_BYTES, MAGIC, SEGMENT_BYTES
from cmcd.store.backup_key import BackupKey, generate_backup_key_file, read_backup_key
from cmcd.store.backup_purge import PurgeResult, purge_tenant
from cmcd.store.backup_restore import (
    COUNTED_TABLES,
    RestoreResult,
    VerifyResult,
    restore_backup,
    store_in_use,
    verify_backup,
)
from cmcd.store.backup_take import BackupInfo, list_backups, take_backup

__all__ = [
    "COUNTED_TABLES",
    "FORMAT_VERSION",
    "HEADER_BYTES",
    "MAGIC",
    "SEGMENT_BYTES",
    "BackupInfo",
    "BackupKey",
    "PurgeResult",
    "RestoreResult",
    "VerifyResult",
    "generate_backup_key_file",
    "list_backups",
    "purge_tenant",
    "read_backup_key",
    "restore_backup",
    "store_in_use",
    "take_backup",
    "verify_backup",
]
