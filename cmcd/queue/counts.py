"""The queue's running counts, kept by SQLite triggers on the recipients table, and the summary and
figures read from them; never scans the recipients but once, when a spool without the counts opens.

Three small tables, changed in the same transaction as the rows they count, whoever writes them
(intake, delivery, the operator's verbs, recovery, an sqlite3 shell):

- queue_counts: recipients by state, destination domain and tenant (every state);
- queue_ages: recipients not yet final by destination domain, minute received and tenant;
- queue_minutes: recipients not yet final by minute received and tenant.

A minute of reception never changes, so the age buckets (qshape's, in minutes) are computed when
the summary is read: a minute that lies wholly inside a bucket counts from the tables, and the at
most nine minutes a bucket's edge falls inside are read row by row (index on messages.received),
so the summary is exactly what a scan of every row would give. Its cost follows the number of
domains, tenants and minutes in the last day, not the number of recipients.

A recipient's counts are keyed by its message's tenant and reception time, looked up when the
trigger fires: a message's recipients go before the message (deleting a message deletes what is
left of them first), and the columns the counts are keyed by never change (a trigger refuses it).
"""

from __future__ import annotations

import contextlib
import sqlite3
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cmcd.db import transaction
from cmcd.records import PENDING_STATES

#: qshape's age buckets, in minutes: a message counts in the first bucket its age is under
AGE_BUCKETS_MIN = (5, 10, 20, 40, 80, 160, 320, 640, 1280)
#: meta key and value of the counts' current form; a spool without it gets them built on opening
VERSION_KEY, VERSION = "queue_counts", "1"

_PENDING = "('queued', 'deferred', 'inflight', 'held')"  # for queries; triggers use _pending()
_MINUTE = "CAST(received AS INTEGER) / 60"  # a message's minute of reception, in its row

TABLES = """
CREATE TABLE queue_counts (
    -- recipients by state, domain and tenant (every state)
    state TEXT NOT NULL,
    domain TEXT NOT NULL,
    tenant_id INTEGER NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (state, domain, tenant_id)
) WITHOUT ROWID;
CREATE TABLE queue_ages (
    -- recipients not yet final by domain, minute received (epoch seconds // 60) and tenant
    domain TEXT NOT NULL,
    minute INTEGER NOT NULL,
    tenant_id INTEGER NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (domain, minute, tenant_id)
) WITHOUT ROWID;
CREATE TABLE queue_minutes (
    -- recipients not yet final by minute received and tenant
    minute INTEGER NOT NULL,
    tenant_id INTEGER NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (minute, tenant_id)
) WITHOUT ROWID;
"""


def _up(table: str, columns: str, values: str, r: str, where: str = "") -> str:
    """A statement adding one to TABLE's row at VALUES, looked up through recipient row R's message."""
    key = columns.rsplit(", n", 1)[0]
    return f"""
    INSERT INTO {table}({columns}) SELECT {values}, 1 FROM messages WHERE queue_id = {r}.queue_id{where}
        ON CONFLICT({key}) DO UPDATE SET n = n + 1;"""


def _down(table: str, key: str, values: str, r: str) -> str:
    """Statements taking one off TABLE's row at KEY = VALUES (looked up through recipient row R's
    message), the row going when it reaches zero."""
    where = f"({key}) = (SELECT {values} FROM messages WHERE queue_id = {r}.queue_id)"
    return f"""
    DELETE FROM {table} WHERE {where} AND n = 1;
    UPDATE {table} SET n = n - 1 WHERE {where};"""


def _count_in(r: str, state: str) -> str:
    return _up("queue_counts", "state, domain, tenant_id, n", f"{state}, {r}.domain, tenant_id", r)


def _count_out(r: str, state: str) -> str:
    return _down("queue_counts", "state, domain, tenant_id", f"{state}, {r}.domain, tenant_id", r)


def _age_in(r: str, where: str = "") -> str:
    return _up("queue_ages", "domain, minute, tenant_id, n", f"{r}.domain, {_MINUTE}, tenant_id", r, where) + _up(
        "queue_minutes", "minute, tenant_id, n", f"{_MINUTE}, tenant_id", r, where
    )


def _age_out(r: str) -> str:
    return _down("queue_ages", "domain, minute, tenant_id", f"{r}.domain, {_MINUTE}, tenant_id", r) + _down(
        "queue_minutes", "minute, tenant_id", f"{_MINUTE}, tenant_id", r
    )


def _pending(r: str) -> str:
    """R's state is not final (an OR chain: an IN list costs a temporary table at every firing)."""
    return "(" + " OR ".join(f"{r}.state = '{s}'" for s in PENDING_STATES) + ")"


_WAS, _IS = _pending("OLD"), _pending("NEW")
TRIGGERS = {
    "recipients_count_insert": (
        f"AFTER INSERT ON recipients BEGIN {_count_in('NEW', 'NEW.state')}{_age_in('NEW', f' AND {_IS}')} END"
    ),
    "recipients_count_delete": f"AFTER DELETE ON recipients BEGIN {_count_out('OLD', 'OLD.state')} END",
    "recipients_count_delete_pending": f"AFTER DELETE ON recipients WHEN {_WAS} BEGIN {_age_out('OLD')} END",
    "recipients_count_state": (
        "AFTER UPDATE OF state ON recipients WHEN OLD.state IS NOT NEW.state "
        f"BEGIN {_count_out('NEW', 'OLD.state')}{_count_in('NEW', 'NEW.state')} END"
    ),
    "recipients_count_final": (
        f"AFTER UPDATE OF state ON recipients WHEN {_WAS} AND NOT {_IS} BEGIN {_age_out('NEW')} END"
    ),
    "recipients_count_unfinal": (
        f"AFTER UPDATE OF state ON recipients WHEN NOT {_WAS} AND {_IS} BEGIN {_age_in('NEW')} END"
    ),
    "recipients_count_keys": (
        "BEFORE UPDATE OF queue_id, domain ON recipients "
        "WHEN OLD.queue_id IS NOT NEW.queue_id OR OLD.domain IS NOT NEW.domain "
        "BEGIN SELECT RAISE(ABORT, 'a recipient''s queue_id and domain never change: the queue counts are keyed "
        "by them'); END"
    ),
    "messages_count_keys": (
        "BEFORE UPDATE OF queue_id, tenant_id, received ON messages "
        "WHEN OLD.queue_id IS NOT NEW.queue_id OR OLD.tenant_id IS NOT NEW.tenant_id "
        "OR OLD.received IS NOT NEW.received "
        "BEGIN SELECT RAISE(ABORT, 'a message''s queue_id, tenant_id and received never change: "
        "the queue counts are keyed by them'); END"
    ),
    # a message deleted before its recipients would leave them uncountable: they go first
    "messages_count_cascade": (
        "BEFORE DELETE ON messages BEGIN DELETE FROM recipients WHERE queue_id = OLD.queue_id; END"
    ),
}

_BUILD = f"""
INSERT INTO queue_counts(state, domain, tenant_id, n)
    SELECT r.state, r.domain, m.tenant_id, COUNT(*) FROM recipients r JOIN messages m ON m.queue_id = r.queue_id
    GROUP BY 1, 2, 3;
INSERT INTO queue_ages(domain, minute, tenant_id, n)
    SELECT r.domain, CAST(m.received AS INTEGER) / 60, m.tenant_id, COUNT(*)
    FROM recipients r JOIN messages m ON m.queue_id = r.queue_id WHERE r.state IN {_PENDING}
    GROUP BY 1, 2, 3;
INSERT INTO queue_minutes(minute, tenant_id, n)
    SELECT minute, tenant_id, SUM(n) FROM queue_ages GROUP BY minute, tenant_id;
"""


def install(conn: sqlite3.Connection) -> bool:
    """Build the counts and their triggers on a spool that lacks them (or has an older form), in one
    transaction: a scan of every recipient, once. Returns whether it built them."""
    with transaction(conn):
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (VERSION_KEY,)).fetchone()
        if row is not None and row[0] == VERSION:
            return False
        for name in TRIGGERS:
            conn.execute(f"DROP TRIGGER IF EXISTS {name}")
        for table in ("queue_counts", "queue_ages", "queue_minutes"):
            conn.execute(f"DROP TABLE IF EXISTS {table}")
        for statement in (TABLES + _BUILD).split(";"):
            if statement.strip():
                conn.execute(statement)
        for name, body in TRIGGERS.items():
            conn.execute(f"CREATE TRIGGER {name} {body}")
        conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (VERSION_KEY, VERSION))
    return True


@contextlib.contextmanager
def _snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """Every read inside sees the same committed state (one read transaction)."""
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.execute("COMMIT")


def _scope(tenant_id: int | None, alias: str = "") -> tuple[str, tuple[Any, ...]]:
    return ("", ()) if tenant_id is None else (f" AND {alias}tenant_id = ?", (tenant_id,))


def _bucket(received: float, cuts: list[float]) -> int:
    return next((i for i, cut in enumerate(cuts) if received > cut), len(cuts))


def summary(conn: sqlite3.Connection, now: float, tenant_id: int | None = None, top: int = 50) -> dict[str, Any]:
    """Recipients not yet final by state, and by destination domain in qshape's age buckets at NOW:
    for each domain (the TOP largest) and in total, [all, under 5 minutes, ..., under 1280, older]."""
    scope, args = _scope(tenant_id)
    nb = len(AGE_BUCKETS_MIN)
    cuts = [now - b * 60 for b in AGE_BUCKETS_MIN]  # received after cuts[i]: younger than bucket i
    edges = {int(c) // 60 for c in cuts}  # the minutes a cut falls inside: read row by row
    first = int(cuts[-1]) // 60  # minutes before it are older than the last bucket
    # a whole minute k lies after cut c when 60 k > c: its bucket is the first such cut
    where = {k: next(i for i, c in enumerate(cuts) if 60 * k > c) for k in range(first + 1, int(now) // 60 + 1)}
    with _snapshot(conn):
        by_state = dict.fromkeys(PENDING_STATES, 0)
        domains: dict[str, int] = {}
        for state, domain, n in conn.execute(
            f"SELECT state, domain, SUM(n) FROM queue_counts WHERE state IN {_PENDING}{scope} GROUP BY state, domain",
            args,
        ):
            by_state[state] += n
            domains[domain] = domains.get(domain, 0) + n
        ranked = sorted(domains.items(), key=lambda dn: (-dn[1], dn[0]))
        shown = {d: [n] + [0] * (nb + 1) for d, n in ranked[:top]}
        total = [sum(by_state.values())] + [0] * (nb + 1)
        for minute, n in conn.execute(
            f"SELECT minute, SUM(n) FROM queue_minutes WHERE minute > ?{scope} GROUP BY minute", (first, *args)
        ):
            if minute not in edges:
                total[1 + where.get(minute, 0)] += n
        for chunk in _chunks(list(shown)):
            for domain, minute, n in conn.execute(
                f"SELECT domain, minute, SUM(n) FROM queue_ages WHERE domain IN ({','.join('?' * len(chunk))}) "
                f"AND minute > ?{scope} GROUP BY domain, minute",
                (*chunk, first, *args),
            ):
                if minute not in edges:
                    shown[domain][1 + where.get(minute, 0)] += n
        mscope, margs = _scope(tenant_id, "m.")
        for minute in sorted(edges):
            for domain, received in conn.execute(
                "SELECT r.domain, m.received FROM messages m JOIN recipients r ON r.queue_id = m.queue_id "
                f"WHERE m.held IN (0, 1) AND m.received >= ? AND m.received < ? AND r.state IN {_PENDING}{mscope}",
                (60 * minute, 60 * minute + 60, *margs),
            ):
                i = _bucket(received, cuts)
                if i < nb:
                    total[1 + i] += 1
                    if domain in shown:
                        shown[domain][1 + i] += 1
    for row in [total, *shown.values()]:  # older than the last bucket: what the others leave
        row[-1] = row[0] - sum(row[1:-1])
    return {
        "states": by_state,
        "buckets_min": list(AGE_BUCKETS_MIN),
        "total": total,
        "domains": [{"domain": d, "counts": c} for d, c in shown.items()],
        "more_domains": max(0, len(ranked) - top),
    }


def _chunks(items: list[str], n: int = 400) -> Iterator[list[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def by_state(conn: sqlite3.Connection) -> dict[str, int]:
    """Recipients by state, every state present (the /metrics gauge)."""
    return {state: n for state, n in conn.execute("SELECT state, SUM(n) FROM queue_counts GROUP BY state")}


def tenant_pending(shards: Iterable[Path], tenant_id: int) -> dict[str, int]:
    """TENANT_ID's recipients not yet final by state (every state of PENDING_STATES, 0 when none),
    summed over the spool shard files SHARDS (every worker's), each opened read-only for this one
    read: WAL lets it run beside the worker that writes the shard, and the running counts make it a
    read of a few rows, not of the recipients. A file that is not there (a worker not started yet)
    counts nothing; one that cannot be read raises sqlite3.Error. Blocking: call it off the event loop."""
    out = {str(state): 0 for state in PENDING_STATES}
    for path in shards:
        if not path.exists():
            continue
        conn = sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?mode=ro", uri=True, timeout=5.0)
        try:
            for state, n in conn.execute(
                f"SELECT state, SUM(n) FROM queue_counts WHERE tenant_id = ? AND state IN {_PENDING} GROUP BY state",
                (tenant_id,),
            ):
                out[state] += int(n)
        finally:
            conn.close()
    return out
