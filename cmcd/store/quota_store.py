"""Daily message counts per tenant in the store, as every process (and host) shipped them; never decides a limit.

A mixin of Store (same connection, same single thread). Counts arrive from a spool's counts outbox
(cmcd/queue/quota.py) as rows (outbox id, tenant id, day, messages). The store remembers, per spool,
the last outbox id it added, in the same transaction as the counts, so a shipment repeated after a
crash adds nothing twice. The quota decision is submit/'s.
"""

from __future__ import annotations

import sqlite3

from cmcd.db import transaction


class QuotaStore:
    conn: sqlite3.Connection

    def daily_counts(self, day: str, spool_id: str) -> tuple[dict[int, int], int]:
        """Messages each tenant had accepted on DAY, and the last outbox id of spool SPOOL_ID that
        is in them (0: none); the store's one thread reads both with nothing written between."""
        rows = self.conn.execute("SELECT tenant_id, messages FROM daily_counts WHERE day = ?", (day,))
        counts = {int(t): int(n) for t, n in rows}
        row = self.conn.execute("SELECT up_to FROM daily_counts_shipped WHERE spool_id = ?", (spool_id,)).fetchone()
        return counts, 0 if row is None else int(row[0])

    def add_daily_counts(self, spool_id: str, rows: list[tuple[int, int, str, int]]) -> int:
        """Add the counts of ROWS (outbox id, tenant id, day, messages) of spool SPOOL_ID past the last
        id added from it, in one transaction that also records the new last id; a row of a tenant
        purged meanwhile is skipped. Returns how many rows were new."""
        with transaction(self.conn):
            row = self.conn.execute("SELECT up_to FROM daily_counts_shipped WHERE spool_id = ?", (spool_id,)).fetchone()
            up_to = 0 if row is None else int(row[0])
            tenants = {r[0] for r in self.conn.execute("SELECT id FROM tenants")}
            new = [r for r in rows if r[0] > up_to]
            if not new:
                return 0
            self.conn.executemany(
                "INSERT INTO daily_counts(tenant_id, day, messages) VALUES (?,?,?) "
                "ON CONFLICT(tenant_id, day) DO UPDATE SET messages = messages + excluded.messages",
                [(tenant_id, day, n) for _, tenant_id, day, n in new if tenant_id in tenants],
            )
            self.conn.execute(
                "INSERT INTO daily_counts_shipped(spool_id, up_to) VALUES (?, ?) "
                "ON CONFLICT(spool_id) DO UPDATE SET up_to = excluded.up_to",
                (spool_id, max(r[0] for r in new)),
            )
        return len(new)
