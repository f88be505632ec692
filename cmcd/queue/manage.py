"""Queue administration: list, summary, retry, hold, release, delete, a tenant's purge, and the
figures /metrics shows. Never returns a body.

Reads run on a reader connection of the spool, changes on its writer thread; Spool's named
operations run them. Every function can be scoped to one tenant: a queue id of another tenant is
then "not found", exactly like one that does not exist.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmcd.crypto import DataKeys
from cmcd.db import transaction
from cmcd.errors import NotFound, StoreError
from cmcd.queue import counts, outbox
from cmcd.queue.tables import INSERT_EVENT
from cmcd.records import PENDING_STATES, RecipientState

STATES = PENDING_STATES  # what a listing can filter on


def _scope(tenant_id: int | None, alias: str = "m") -> tuple[str, tuple[Any, ...]]:
    return ("", ()) if tenant_id is None else (f" AND {alias}.tenant_id = ?", (tenant_id,))


def list_page(
    conn: sqlite3.Connection,
    keys: DataKeys,
    *,
    tenant_id: int | None = None,
    state: str | None = None,
    domain: str | None = None,
    received_before: float | None = None,
    after: str = "",
    limit: int = 100,
) -> dict[str, Any]:
    """One page of messages in queue-id order (oldest first), after the cursor AFTER.

    Keyset paging on the primary key: page N costs the same as page 1, whatever the queue size.
    """
    where = "m.queue_id > ?"
    args: list[Any] = [after]
    scope, scope_args = _scope(tenant_id)
    where += scope
    args += scope_args
    if received_before is not None:
        where += " AND m.received < ?"
        args.append(received_before)
    if state is not None or domain is not None:
        sub = "SELECT 1 FROM recipients r WHERE r.queue_id = m.queue_id"
        if state is not None:
            sub += " AND r.state = ?"
            args.append(state)
        if domain is not None:
            sub += " AND r.domain = ?"
            args.append(domain.lower())
        where += f" AND EXISTS ({sub})"
    rows = conn.execute(
        "SELECT m.queue_id, m.tenant_id, m.sender_enc, m.size_bytes, m.received, m.held, "
        "(SELECT COUNT(*) FROM recipients r WHERE r.queue_id = m.queue_id), "
        "(SELECT GROUP_CONCAT(DISTINCT r.state) FROM recipients r WHERE r.queue_id = m.queue_id) "
        f"FROM messages m WHERE {where} ORDER BY m.queue_id LIMIT ?",
        (*args, limit),
    ).fetchall()
    items = [
        {
            "queue_id": r[0],
            "tenant_id": r[1],
            "sender": keys.decrypt(bytes(r[2])),
            "size_bytes": r[3],
            "received": r[4],
            "held": bool(r[5]),
            "recipients": r[6],
            "states": sorted((r[7] or "").split(",")) if r[7] else [],
        }
        for r in rows
    ]
    return {"items": items, "next": items[-1]["queue_id"] if len(items) == limit else None}


def show(conn: sqlite3.Connection, keys: DataKeys, queue_id: str, tenant_id: int | None = None) -> dict[str, Any]:
    scope, scope_args = _scope(tenant_id, "messages")
    m = conn.execute(
        "SELECT queue_id, tenant_id, user_id, sender_enc, size_bytes, received, message_id, held FROM messages "
        f"WHERE queue_id = ?{scope}",
        (queue_id, *scope_args),
    ).fetchone()
    if m is None:
        raise NotFound(f"no message {queue_id!r} in the queue")
    rcpts = conn.execute(
        "SELECT rcpt_enc, domain, state, attempts, next_attempt, last_response_enc FROM recipients "
        "WHERE queue_id = ? ORDER BY id",
        (queue_id,),
    ).fetchall()
    return {
        "queue_id": m[0],
        "tenant_id": m[1],
        "user_id": m[2],
        "sender": keys.decrypt(bytes(m[3])),
        "size_bytes": m[4],
        "received": m[5],
        "message_id": m[6],
        "held": bool(m[7]),
        "recipients": [
            {
                "address": keys.decrypt(bytes(r[0])),
                "domain": r[1],
                "state": r[2],
                "attempts": r[3],
                "next_attempt": r[4],
                "last_response": keys.open_text(r[5]),
            }
            for r in rcpts
        ],
    }


def summary(conn: sqlite3.Connection, now: float, tenant_id: int | None = None, top: int = 50) -> dict[str, Any]:
    """Recipients by state, and by destination domain with qshape's age buckets (from the running
    counts: its cost follows the domains and minutes in the queue, not the recipients)."""
    return counts.summary(conn, now, tenant_id, top)


def _message_ids(conn: sqlite3.Connection, queue_id: str | None, tenant_id: int | None) -> list[str]:
    if queue_id is not None:
        scope, scope_args = _scope(tenant_id, "messages")
        row = conn.execute(f"SELECT queue_id FROM messages WHERE queue_id = ?{scope}", (queue_id, *scope_args))
        found = [r[0] for r in row]
        if not found:
            raise NotFound(f"no message {queue_id!r} in the queue")
        return found
    if tenant_id is None:
        raise StoreError("name a queue id or a tenant")
    return [r[0] for r in conn.execute("SELECT queue_id FROM messages WHERE tenant_id = ?", (tenant_id,))]


def _each(conn: sqlite3.Connection, sql: str, qids: list[str], *args: Any) -> int:
    return sum(conn.execute(sql, (*args, q)).rowcount for q in qids)


def retry(
    conn: sqlite3.Connection,
    now: float,
    *,
    queue_id: str | None = None,
    domain: str | None = None,
    everything: bool = False,
    tenant_id: int | None = None,
) -> int:
    """Make deferred (and queued) recipients due now; returns how many."""
    with transaction(conn):
        if queue_id is not None:
            qids = _message_ids(conn, queue_id, tenant_id)
            return _each(
                conn,
                "UPDATE recipients SET next_attempt = ? WHERE state IN ('queued', 'deferred') AND queue_id = ?",
                qids,
                now,
            )
        sql = "UPDATE recipients SET next_attempt = ? WHERE state IN ('queued', 'deferred')"
        args: list[Any] = [now]
        if domain is not None:
            sql += " AND domain = ?"
            args.append(domain.lower())
        elif not everything:
            raise StoreError("queue retry: name a queue id, --domain or --all")
        if tenant_id is not None:
            sql += " AND queue_id IN (SELECT queue_id FROM messages WHERE tenant_id = ?)"
            args.append(tenant_id)
        return conn.execute(sql, args).rowcount


def hold(conn: sqlite3.Connection, *, queue_id: str | None = None, tenant_id: int | None = None) -> int:
    """Hold messages: their waiting recipients are never scheduled until released; an attempt
    already under way finishes, and is held if it is deferred."""
    with transaction(conn):
        qids = _message_ids(conn, queue_id, tenant_id)
        _each(conn, "UPDATE messages SET held = 1 WHERE queue_id = ?", qids)
        return _each(
            conn, "UPDATE recipients SET state = 'held' WHERE state IN ('queued', 'deferred') AND queue_id = ?", qids
        )


def release(conn: sqlite3.Connection, now: float, *, queue_id: str | None = None, tenant_id: int | None = None) -> int:
    with transaction(conn):
        qids = _message_ids(conn, queue_id, tenant_id)
        _each(conn, "UPDATE messages SET held = 0 WHERE queue_id = ?", qids)
        return _each(
            conn,
            "UPDATE recipients SET state = 'queued', next_attempt = ? WHERE state = 'held' AND queue_id = ?",
            qids,
            now,
        )


def delete(conn: sqlite3.Connection, keys: DataKeys, now: float, queue_id: str, tenant_id: int | None = None) -> int:
    """Erase a message: every recipient not yet final is logged deleted-by-operator, then the body
    and rows are deleted (secure_delete overwrites them). Returns the recipients it ended."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        qids = _message_ids(conn, queue_id, tenant_id)
        m = conn.execute(
            "SELECT tenant_id, sender_enc, sender_hmac, size_bytes, received, message_id, stream FROM messages "
            "WHERE queue_id = ?",
            (qids[0],),
        ).fetchone()
        reply = keys.seal_text("deleted by operator")
        rcpts = conn.execute(
            "SELECT id, rcpt_enc, rcpt_hmac, domain, attempts FROM recipients "
            "WHERE queue_id = ? AND state IN ('queued', 'deferred', 'inflight', 'held')",
            (queue_id,),
        ).fetchall()
        conn.executemany(
            INSERT_EVENT,
            [
                (f"{queue_id}:{r[0]}:{r[4]}:deleted", now, m[0], queue_id, "deleted-by-operator", m[1], m[2], r[1],
                 r[2], r[3], RecipientState.DELETED, reply, r[4], "", "", "", max(0.0, now - m[4]), m[3], m[5], 0, m[6])
                for r in rcpts
            ],
        )  # fmt: skip
        conn.execute("DELETE FROM recipients WHERE queue_id = ?", (queue_id,))
        conn.execute("DELETE FROM messages WHERE queue_id = ?", (queue_id,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return len(rcpts)


def purge_tenant(conn: sqlite3.Connection, tenant_id: int, logins: tuple[str, ...] = ()) -> int:
    """Delete every queued message of TENANT_ID with its recipients, its pending mail-log events,
    login and operation-log rows (and failed logins, logged without a tenant, of its LOGINS), its
    daily counts not yet shipped and its API Idempotency-Keys (secure_delete overwrites the pages),
    then checkpoint and vacuum the spool.
    Returns the number of messages removed."""
    with transaction(conn):
        qids = [(r[0],) for r in conn.execute("SELECT queue_id FROM messages WHERE tenant_id = ?", (tenant_id,))]
        conn.executemany("DELETE FROM recipients WHERE queue_id = ?", qids)
        conn.execute("DELETE FROM messages WHERE tenant_id = ?", (tenant_id,))
        conn.execute("DELETE FROM events WHERE tenant_id = ?", (tenant_id,))
        conn.execute("DELETE FROM audit_events WHERE json_extract(record, '$.tenant_id') = ?", (tenant_id,))
        conn.executemany(
            "DELETE FROM audit_events WHERE kind = 'login' AND json_extract(record, '$.tenant_id') IS NULL "
            "AND json_extract(record, '$.login') = ?",
            [(login,) for login in logins],
        )
        conn.execute("DELETE FROM counts_outbox WHERE tenant_id = ?", (tenant_id,))
        # its Idempotency-Keys: a new tenant given the same id must not be answered its responses
        conn.execute("DELETE FROM api_requests WHERE tenant_id = ?", (tenant_id,))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("VACUUM")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return len(qids)


@dataclass(frozen=True)
class QueueFigures:
    recipients: dict[str, int] = field(default_factory=dict)  # state -> rows
    oldest_received: float | None = None  # epoch seconds of the oldest message not held; None: there is none
    spool_bytes: int = 0  # queue.db and its write-ahead log
    outbox: dict[str, int] = field(default_factory=dict)  # kind (mail, login, ops) -> rows not yet in the store


def add_figures(shards: list[QueueFigures]) -> QueueFigures:
    """The figures of several shards as one queue's."""
    recipients: dict[str, int] = {}
    outbox: dict[str, int] = {}
    for f in shards:
        for state, n in f.recipients.items():
            recipients[state] = recipients.get(state, 0) + n
        for kind, n in f.outbox.items():
            outbox[kind] = outbox.get(kind, 0) + n
    oldest = [f.oldest_received for f in shards if f.oldest_received is not None]
    return QueueFigures(
        recipients=recipients, oldest_received=min(oldest) if oldest else None,
        spool_bytes=sum(f.spool_bytes for f in shards), outbox=outbox,
    )  # fmt: skip


def figures(conn: sqlite3.Connection, path: Path) -> QueueFigures:
    """The queue figures: the running counts by state, one index probe for the oldest message, two
    stat calls, the outbox counts."""
    recipients = counts.by_state(conn)
    (oldest,) = conn.execute("SELECT MIN(received) FROM messages WHERE held = 0").fetchone()
    size = 0
    for p in (path, path.with_name(path.name + "-wal")):
        try:
            size += os.stat(p).st_size
        except FileNotFoundError:
            pass
    return QueueFigures(recipients, oldest, size, outbox.backlog(conn))
