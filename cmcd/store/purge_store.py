"""Purging a tenant from the store and erasing what it leaves: the purge mark, the one-transaction
delete of every row of the tenant, the checkpoint and VACUUM after it; never touches the queue.

A mixin of Store (same connection, same single thread). A purge is begun (a mark committed before
the tenant's queue is emptied), done (the rows and the mark go in one transaction, which also marks
the store for erasure) and erased (checkpoint and VACUUM, so no page of the file or its WAL keeps
the deleted rows); a crash between the steps is finished at the next start. delete_tenant_rows also
serves the purge of a tenant from backups (cmcd.store.backup_purge).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from cmcd.db import transaction
from cmcd.records import Tenant
from cmcd.store.log_store import OpRecord


def delete_tenant_rows(conn: sqlite3.Connection, tenant_id: int) -> dict[str, int]:
    """Delete tenant TENANT_ID and every row of it (users, IP credentials, domains and their keys,
    suppressions, API keys, webhooks, daily counts and quota reservations, Idempotency-Key claims,
    mail, login and operation log rows, and failed logins with one of its login names) inside the
    caller's transaction; tables an older schema lacks are skipped.
    Used by tenant_purge() on the store and by the purge of a tenant from backups."""
    present = {str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    logins = [r[0] for r in conn.execute("SELECT login FROM users WHERE tenant_id = ?", (tenant_id,))]
    counts: dict[str, int] = {}
    c = conn.execute
    if {"dkim_keys", "domains"} <= present:
        counts["dkim_keys"] = c(
            "DELETE FROM dkim_keys WHERE domain_id IN (SELECT id FROM domains WHERE tenant_id = ?)", (tenant_id,)
        ).rowcount
    for table in ("api_keys", "otp", "api_sessions", "message_tags", "webhooks", "ip_credentials", "users", "domains",
                  "suppressions", "daily_counts", "quota_reserved", "idempotency_keys", "mail_log", "login_log",
                  "ops_log"):  # fmt: skip
        if table in present:
            counts[table] = c(f"DELETE FROM {table} WHERE tenant_id = ?", (tenant_id,)).rowcount
    # failed logins with one of its login names were logged without a tenant
    counts["login_log"] = counts.get("login_log", 0) + sum(
        c("DELETE FROM login_log WHERE tenant_id IS NULL AND login = ?", (login,)).rowcount for login in logins
    )
    c("DELETE FROM tenants WHERE id = ?", (tenant_id,))
    return counts


class PurgeStore:
    """Methods Store gets for a tenant's purge and erasure; see the module docstring."""

    conn: sqlite3.Connection

    # provided by Store
    def tenant(self, name: str) -> Tenant:  # pragma: no cover - Store's
        raise NotImplementedError

    if TYPE_CHECKING:  # LogStore's (no stub at run time, which could shadow it in Store's bases)

        def _insert_ops(self, records: list[OpRecord]) -> int: ...

    # -- tenant purge --------------------------------------------------------------------------

    def purge_begin(self, name: str, actor: str, actor_uid: int | None) -> Tenant:
        """Mark TENANT as being purged (committed before its queue is touched), so a purge cut
        short by a crash is found by purges_pending() and finished at the next start."""
        t = self.tenant(name)
        value = json.dumps({"name": t.name, "actor": actor, "actor_uid": actor_uid})
        with transaction(self.conn):
            self.conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (f"purge:{t.id}", value))
        return t

    def purges_pending(self) -> list[dict[str, Any]]:
        """Purges begun and not committed: [{"tenant_id", "name", "actor", "actor_uid"}]."""
        rows = self.conn.execute("SELECT key, value FROM meta WHERE key LIKE 'purge:%' ORDER BY key")
        return [{"tenant_id": int(k.partition(":")[2])} | json.loads(v) for k, v in rows]

    def tenant_purge(self, name: str, op: OpRecord | None = None) -> dict[str, int]:
        """Delete TENANT and everything of it: users, IP credentials, domains and their keys,
        suppression list, mail, login and operation log rows. One transaction, which also clears
        the purge_begin() mark, writes OP (its detail followed by the counts) and marks the store
        for finish_erase(), which the caller runs next (and the next start, after a crash)."""
        t = self.tenant(name)
        with transaction(self.conn):
            counts = delete_tenant_rows(self.conn, t.id)
            c = self.conn.execute
            c("DELETE FROM meta WHERE key = ?", (f"purge:{t.id}",))
            c("INSERT OR REPLACE INTO meta(key, value) VALUES ('erase_pending', '1')")
            if op is not None:
                detail = " ".join([op.detail, *(f"{k}={v}" for k, v in counts.items())]).strip()
                self._insert_ops([replace(op, detail=detail)])
        return counts

    def finish_erase(self) -> bool:
        """After a purge: checkpoint and vacuum, so no page of the file or its WAL keeps the deleted
        rows, then clear the mark tenant_purge() set. False when no erase was pending."""
        if self.conn.execute("SELECT 1 FROM meta WHERE key = 'erase_pending'").fetchone() is None:
            return False
        self.checkpoint(vacuum=True)
        with transaction(self.conn):
            self.conn.execute("DELETE FROM meta WHERE key = 'erase_pending'")
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return True

    def checkpoint(self, vacuum: bool = False) -> None:
        """Move the WAL into the database and truncate it (and rewrite the file, with VACUUM), so no
        page of either still holds deleted rows."""
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if vacuum:
            self.conn.execute("VACUUM")
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
