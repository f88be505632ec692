"""The SQL of the spool's outboxes: mail-log events, login and operation-log rows, daily counts.

Rows go in with the queue changes they describe (or, for login and operation rows, when the store
could not take them) and are taken oldest first, then deleted once the store has them. Functions
take the spool's connection; Spool runs them on its threads. Never talks to the store itself.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from cmcd.db import transaction
from cmcd.queue.tables import EVENT_LIST
from cmcd.store.log_store import LoginRecord, OpRecord

KINDS = ("login", "ops")

AuditRecord = LoginRecord | OpRecord
_TYPES: dict[str, type[LoginRecord] | type[OpRecord]] = {"login": LoginRecord, "ops": OpRecord}


def take_events(conn: sqlite3.Connection, limit: int) -> list[tuple[Any, ...]]:
    """The oldest mail-log events, in the store's column order with the tags, the bounce class and the
    stream, and the outbox id last."""
    return conn.execute(
        f"SELECT {EVENT_LIST}, tags, bounce_class, stream, id FROM events ORDER BY id LIMIT ?", (limit,)
    ).fetchall()


def drop_events(conn: sqlite3.Connection, up_to_id: int) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM events WHERE id <= ?", (up_to_id,))


def put_audit(conn: sqlite3.Connection, kind: str, records: Sequence[AuditRecord]) -> None:
    with transaction(conn):
        conn.executemany(
            "INSERT INTO audit_events(kind, event_key, record) VALUES (?,?,?)",
            [(kind, r.event_key, json.dumps(dataclasses.asdict(r))) for r in records],
        )


def take_audit(conn: sqlite3.Connection, limit: int) -> list[tuple[int, str, AuditRecord]]:
    """The oldest login and operation rows: (outbox id, kind, record)."""
    rows = conn.execute("SELECT id, kind, record FROM audit_events ORDER BY id LIMIT ?", (limit,)).fetchall()
    return [(i, kind, _TYPES[kind](**json.loads(text))) for i, kind, text in rows]


def drop_audit(conn: sqlite3.Connection, up_to_id: int) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM audit_events WHERE id <= ?", (up_to_id,))


def backlog(conn: sqlite3.Connection) -> dict[str, int]:
    """Rows waiting in the outbox by kind: mail (mail-log events), login, ops."""
    counts = {"mail": conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]} | dict.fromkeys(KINDS, 0)
    for kind, n in conn.execute("SELECT kind, COUNT(*) FROM audit_events GROUP BY kind"):
        counts[kind] = n
    return counts


def take_counts(conn: sqlite3.Connection, limit: int) -> list[tuple[int, int, str, int]]:
    """The oldest daily counts not yet shipped: (outbox id, tenant id, day, messages)."""
    return conn.execute(
        "SELECT id, tenant_id, day, messages FROM counts_outbox ORDER BY id LIMIT ?", (limit,)
    ).fetchall()


def unshipped_counts(conn: sqlite3.Connection, day: str, after_id: int) -> dict[int, int]:
    """Messages per tenant counted against DAY in outbox rows past AFTER_ID (what the store has not added)."""
    rows = conn.execute(
        "SELECT tenant_id, SUM(messages) FROM counts_outbox WHERE day = ? AND id > ? GROUP BY tenant_id",
        (day, after_id),
    )
    return {int(t): int(n) for t, n in rows}


def drop_counts(conn: sqlite3.Connection, up_to_id: int) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM counts_outbox WHERE id <= ?", (up_to_id,))
