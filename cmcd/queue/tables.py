"""The spool's tables, their upgrade from older spools, and the inserts every part of the queue shares.

Functions here take a connection and run on the spool's writer thread inside the caller's
transaction (cmcd/queue/spool.py); none opens a connection or commits on its own, but for the
upgrade, which runs once as the spool opens.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from cmcd.crypto import DataKeys
from cmcd.db import transaction
from cmcd.queue import counts
from cmcd.records import RecipientState, SpoolMessage

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    queue_id TEXT PRIMARY KEY,
    tenant_id INTEGER NOT NULL,
    user_id INTEGER NOT NULL,
    sender_enc BLOB NOT NULL,
    sender_hmac BLOB NOT NULL,
    size_bytes INTEGER NOT NULL,
    received REAL NOT NULL,
    body BLOB NOT NULL,  -- AES-256-GCM under the data key, the queue id as associated data
    message_id TEXT NOT NULL DEFAULT '',
    held INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS recipients (
    id INTEGER PRIMARY KEY,
    queue_id TEXT NOT NULL REFERENCES messages(queue_id),
    rcpt_enc BLOB NOT NULL,
    rcpt_hmac BLOB NOT NULL,
    domain TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_response TEXT NOT NULL DEFAULT '',  -- always empty: the reply is in last_response_enc
    last_mx TEXT NOT NULL DEFAULT '',
    notify INTEGER NOT NULL DEFAULT 0,  -- 1: bounced or expired, and the sender's DSN is still to be queued
    last_response_enc BLOB  -- the last reply, AES-256-GCM under the data key (it echoes the address)
);
CREATE INDEX IF NOT EXISTS recipients_queue ON recipients(queue_id);
CREATE INDEX IF NOT EXISTS recipients_due ON recipients(next_attempt) WHERE state IN ('queued', 'deferred');
CREATE INDEX IF NOT EXISTS recipients_inflight ON recipients(state) WHERE state = 'inflight';
CREATE TABLE IF NOT EXISTS events (
    -- outbox of mail-log events, committed with the queue changes they describe and shipped to the store
    id INTEGER PRIMARY KEY,
    event_key TEXT NOT NULL,
    ts REAL NOT NULL,
    tenant_id INTEGER NOT NULL,
    queue_id TEXT NOT NULL,
    event TEXT NOT NULL,
    sender_enc BLOB NOT NULL,
    sender_hmac BLOB NOT NULL,
    rcpt_enc BLOB NOT NULL,
    rcpt_hmac BLOB NOT NULL,
    rcpt_domain TEXT NOT NULL,
    status TEXT NOT NULL,
    response TEXT NOT NULL,  -- always empty: the reply is in response_enc
    attempt INTEGER NOT NULL DEFAULT 0,
    mx TEXT NOT NULL DEFAULT '',
    ip TEXT NOT NULL DEFAULT '',
    tls TEXT NOT NULL DEFAULT '',
    delay REAL NOT NULL DEFAULT 0,
    size INTEGER NOT NULL DEFAULT 0,
    message_id TEXT NOT NULL DEFAULT '',
    suppress INTEGER NOT NULL DEFAULT 0,  -- 1: the store adds the recipient to the tenant's suppression list
    response_enc BLOB  -- the reply, encrypted like last_response_enc; shipped to the store as it is
);
CREATE TABLE IF NOT EXISTS audit_events (
    -- outbox of login and operation-log rows the store could not take when they happened (cmcd/queue/audit.py)
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,  -- 'login' or 'ops'
    event_key TEXT NOT NULL,
    record TEXT NOT NULL  -- the row as a JSON object
);
CREATE TABLE IF NOT EXISTS counts_outbox (
    -- outbox of messages accepted per tenant and day, committed with the messages and shipped to the
    -- store's daily counts (cmcd/queue/quota.py); the store skips an id it has already added, so an id
    -- is never given twice (AUTOINCREMENT, even once every row is shipped and deleted)
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id INTEGER NOT NULL,
    day TEXT NOT NULL,
    messages INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS api_requests (
    -- API requests sent with an Idempotency-Key, committed with the messages they queued
    tenant_id INTEGER NOT NULL,
    key TEXT NOT NULL,
    request_hash BLOB NOT NULL,
    status INTEGER NOT NULL,
    response TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (tenant_id, key)
);
CREATE INDEX IF NOT EXISTS api_requests_created ON api_requests(created);
CREATE INDEX IF NOT EXISTS messages_tenant ON messages(tenant_id);
CREATE TABLE IF NOT EXISTS meta (
    -- spool_id: this spool's identity, also kept in the store, which refuses a spool not its own (queue/startup.py)
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

#: columns added after the first release, for a spool written by an older cmcd
_ADDED_COLUMNS = {
    "messages": (
        "message_id TEXT NOT NULL DEFAULT ''", "held INTEGER NOT NULL DEFAULT 0",
        "stream TEXT NOT NULL DEFAULT 'transactional'",
    ),
    "recipients": (
        "last_mx TEXT NOT NULL DEFAULT ''", "notify INTEGER NOT NULL DEFAULT 0", "last_response_enc BLOB",
        "last_class TEXT NOT NULL DEFAULT ''",
    ),
    "events": (
        "attempt INTEGER NOT NULL DEFAULT 0", "mx TEXT NOT NULL DEFAULT ''", "ip TEXT NOT NULL DEFAULT ''",
        "tls TEXT NOT NULL DEFAULT ''", "delay REAL NOT NULL DEFAULT 0", "size INTEGER NOT NULL DEFAULT 0",
        "message_id TEXT NOT NULL DEFAULT ''", "suppress INTEGER NOT NULL DEFAULT 0", "tags TEXT NOT NULL DEFAULT ''",
        "response_enc BLOB", "bounce_class TEXT NOT NULL DEFAULT ''", "stream TEXT NOT NULL DEFAULT 'transactional'",
    ),
}  # fmt: skip

EVENT_COLUMNS = (
    "event_key", "ts", "tenant_id", "queue_id", "event", "sender_enc", "sender_hmac", "rcpt_enc", "rcpt_hmac",
    "rcpt_domain", "status", "response_enc", "attempt", "mx", "ip", "tls", "delay", "size", "message_id", "suppress",
)  # fmt: skip
EVENT_LIST = ", ".join(EVENT_COLUMNS)
_EVENT_MARKS = ", ".join("?" * len(EVENT_COLUMNS))
# the plaintext response column of older spools has no default: it is written empty
#: an event: the columns, then the message's stream
INSERT_EVENT = f"INSERT INTO events({EVENT_LIST}, stream, response) VALUES ({_EVENT_MARKS}, ?, '')"
#: a delivery attempt's event: the columns, then the reply's bounce class (cmcd/bounces.py) and the message's stream
INSERT_RESULT_EVENT = (
    f"INSERT INTO events({EVENT_LIST}, bounce_class, stream, response) VALUES ({_EVENT_MARKS}, ?, ?, '')"
)


def create(conn: sqlite3.Connection, keys: DataKeys) -> None:
    """Create the tables a new spool lacks and bring an older spool's up to date."""
    conn.executescript(SCHEMA)
    for table, columns in _ADDED_COLUMNS.items():
        have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        for column in columns:
            if column.split()[0] not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
    # the oldest message not held (/metrics), and the rows of one minute's messages (the queue summary)
    conn.execute("CREATE INDEX IF NOT EXISTS messages_received ON messages(held, received)")
    counts.install(conn)  # the queue's running counts: built from a scan once, kept by triggers since
    _counts_to_outbox(conn)
    if _seal_replies(conn, keys):
        # secure_delete zeroed the old values in the file; their old pages in the WAL go too
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("VACUUM")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _counts_to_outbox(conn: sqlite3.Connection) -> None:
    """A spool of an older cmcd kept the daily counts itself (daily_counts): they go to the store now,
    through the outbox like every count since (one transaction)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'daily_counts'").fetchone() is None:
        return
    with transaction(conn):
        conn.execute(
            "INSERT INTO counts_outbox(tenant_id, day, messages) SELECT tenant_id, day, messages FROM daily_counts "
            "ORDER BY day, tenant_id"
        )
        conn.execute("DROP TABLE daily_counts")


def _seal_replies(conn: sqlite3.Connection, keys: DataKeys) -> int:
    """Encrypt the plaintext replies a spool written by an older cmcd holds (one transaction, once:
    meta replies_sealed marks a spool whose replies are all encrypted)."""
    rewritten = 0
    with transaction(conn):
        if conn.execute("SELECT 1 FROM meta WHERE key = 'replies_sealed'").fetchone() is not None:
            return 0
        conn.execute("INSERT INTO meta(key, value) VALUES ('replies_sealed', '1')")
        for table, plain, sealed in (("recipients", "last_response", "last_response_enc"),
                                     ("events", "response", "response_enc")):  # fmt: skip
            rows = conn.execute(f"SELECT id, {plain} FROM {table} WHERE {plain} != ''").fetchall()
            conn.executemany(
                f"UPDATE {table} SET {sealed} = ?, {plain} = '' WHERE id = ?",
                [(keys.seal_text(str(text)), row_id) for row_id, text in rows],
            )
            rewritten += len(rows)
    return rewritten


def insert_messages(conn: sqlite3.Connection, k: DataKeys, messages: list[SpoolMessage]) -> None:
    """Add MESSAGES, their recipient rows and their "accepted" events, inside the caller's transaction."""
    msgs: list[tuple[Any, ...]] = []
    rcpts: list[tuple[Any, ...]] = []
    events: list[tuple[Any, ...]] = []
    for m in messages:
        sender_enc, sender_hmac = k.encrypt(m.sender), k.index(m.sender)
        msgs.append(
            (m.queue_id, m.tenant_id, m.user_id, sender_enc, sender_hmac, len(m.body), m.received_ts,
             k.encrypt_bytes(m.body, m.queue_id.encode()), m.message_id, m.stream)
        )  # fmt: skip
        for n, r in enumerate(m.recipients):
            rcpt_enc, rcpt_hmac = k.encrypt(r.address), k.index(r.address)
            rcpts.append((m.queue_id, rcpt_enc, rcpt_hmac, r.domain, m.received_ts))
            events.append(
                (f"{m.queue_id}:{n}:accepted", m.received_ts, m.tenant_id, m.queue_id, "accepted", sender_enc,
                 sender_hmac, rcpt_enc, rcpt_hmac, r.domain, RecipientState.QUEUED, None, 0, "", "", "", 0.0,
                 len(m.body), m.message_id, 0, ",".join(m.tags), m.stream)
            )  # fmt: skip
    conn.executemany(
        "INSERT INTO messages(queue_id, tenant_id, user_id, sender_enc, sender_hmac, size_bytes, received, body, "
        "message_id, stream) VALUES (?,?,?,?,?,?,?,?,?,?)",
        msgs,
    )
    conn.executemany(
        "INSERT INTO recipients(queue_id, rcpt_enc, rcpt_hmac, domain, next_attempt) VALUES (?,?,?,?,?)", rcpts
    )
    conn.executemany(
        f"INSERT INTO events({EVENT_LIST}, tags, stream, response) VALUES ({_EVENT_MARKS}, ?, ?, '')", events
    )


def count_messages(conn: sqlite3.Connection, messages: list[SpoolMessage], days: list[str]) -> None:
    """Add MESSAGES, each counted against its day in DAYS, to the counts outbox (the caller's transaction)."""
    counts: dict[tuple[int, str], int] = {}
    for m, day in zip(messages, days, strict=True):
        counts[(m.tenant_id, day)] = counts.get((m.tenant_id, day), 0) + 1
    conn.executemany(
        "INSERT INTO counts_outbox(tenant_id, day, messages) VALUES (?,?,?)",
        [(t, d, n) for (t, d), n in counts.items()],
    )
