"""Daily message counts per tenant in the store, as every process (and host) shipped them, and the
daily quota the processes have reserved in blocks; never decides whether a message is taken.

A mixin of Store (same connection, same single thread). Counts arrive from a spool's counts outbox
(cmcd/queue/quota.py) as rows (outbox id, tenant id, day, messages). The store remembers, per spool,
the last outbox id it added, in the same transaction as the counts, so a shipment repeated after a
crash adds nothing twice. Those counts are the record of what was accepted.

What limits is quota_reserved: per tenant and day, the messages every process has reserved in
total (cmcd/submit/leases.py holds the rule). quota_reserve() grants a block in one short
transaction and never lets the total pass the quota, nor start under the day's counted messages;
quota_return() takes back what a process did not use. The decision is submit/'s.
"""

from __future__ import annotations

import datetime
import sqlite3

from cmcd.db import lock_wait, transaction

#: reservation rows of a tenant's past days are dropped when its first reservation of a day is
#: made, all but the last KEEP_DAYS days (a process still on yesterday just past midnight may
#: reserve for it)
KEEP_DAYS = 2


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

    # -- the daily quota's reservations (leases) -------------------------------------------------

    def quota_reserve(self, tenant_id: int, day: str, want: int, quota: int) -> tuple[int, int]:
        """Reserve up to WANT messages of TENANT_ID's QUOTA for DAY, in one transaction: the grant is
        min(want, quota - reserved), never below 0. The reserved total starts (and is kept) at least
        at the day's daily_counts row, so it is never under what was accepted and shipped. Returns
        (granted, the reserved total after it); (0, 0) for a tenant that is gone (purged)."""
        c = self.conn.execute
        # a client waits on this (a lease runs out at the end of data): a store another process
        # holds is met with a 451 after db.CLIENT_WAIT_MS, not a wait as long as a client's timeout
        with lock_wait(self.conn), transaction(self.conn):
            if c("SELECT 1 FROM tenants WHERE id = ?", (tenant_id,)).fetchone() is None:
                return 0, 0
            row = c("SELECT reserved FROM quota_reserved WHERE tenant_id = ? AND day = ?", (tenant_id, day)).fetchone()
            counted = c(
                "SELECT messages FROM daily_counts WHERE tenant_id = ? AND day = ?", (tenant_id, day)
            ).fetchone()
            before = 0 if row is None else int(row[0])
            reserved = max(before, 0 if counted is None else int(counted[0]))
            granted = max(0, min(want, quota - reserved))
            reserved += granted
            if row is None:
                keep_from = (datetime.date.fromisoformat(day) - datetime.timedelta(days=KEEP_DAYS)).isoformat()
                c("DELETE FROM quota_reserved WHERE tenant_id = ? AND day < ?", (tenant_id, keep_from))
                c("INSERT INTO quota_reserved(tenant_id, day, reserved) VALUES (?, ?, ?)", (tenant_id, day, reserved))
            elif reserved != before:
                c("UPDATE quota_reserved SET reserved = ? WHERE tenant_id = ? AND day = ?", (reserved, tenant_id, day))
        return granted, reserved

    def quota_return(self, tenant_id: int, day: str, unused: int) -> int:
        """Give back UNUSED messages a process reserved for TENANT_ID on DAY and did not take (its
        clean shutdown); returns the reserved total after it (0 when there is no row)."""
        with transaction(self.conn):
            self.conn.execute(
                "UPDATE quota_reserved SET reserved = max(0, reserved - ?) WHERE tenant_id = ? AND day = ?",
                (unused, tenant_id, day),
            )
            row = self.conn.execute(
                "SELECT reserved FROM quota_reserved WHERE tenant_id = ? AND day = ?", (tenant_id, day)
            ).fetchone()
        return 0 if row is None else int(row[0])

    def quota_reserved(self, tenant_id: int, day: str) -> int:
        """The messages reserved for TENANT_ID on DAY by every process (0: none yet)."""
        row = self.conn.execute(
            "SELECT reserved FROM quota_reserved WHERE tenant_id = ? AND day = ?", (tenant_id, day)
        ).fetchone()
        return 0 if row is None else int(row[0])
