"""The mail, login and operation logs in the store: rows added idempotently by event key, paged
queries for export, retention; never decides what is logged.

A mixin of Store (same connection, same single thread). Rows arrive at least once (from a spool's
outbox, cmcd/queue/events.py and audit.py), so each carries an event key and a row whose key is
present is skipped; a row of a tenant purged meanwhile is dropped. Addresses are stored encrypted
with an HMAC index, and remote replies encrypted too (a reply echoes the address); queries find
rows through the index and return them decrypted. A mail-log row of a hard bounce also puts its
recipient on the suppression list (a block, with its bounce class and its expiry: cmcd/bounces.py), and
an accepted message's tags are kept, in the same transaction.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from cmcd import crypto
from cmcd.bounces import BlockPolicy, parse_tenant_actions
from cmcd.db import transaction
from cmcd.errors import StoreError


def _class_of(row: tuple[Any, ...], n: int) -> str:
    """A mail-log row's bounce class: after its N columns, the suppress flag and the tags."""
    return str(row[n + 2] or "") if len(row) > n + 2 else ""


def _stream_of(row: tuple[Any, ...], n: int) -> str:
    """A mail-log row's stream: after its N columns, the suppress flag, the tags and the bounce class."""
    return str(row[n + 3] or "transactional") if len(row) > n + 3 else "transactional"


def new_event_key() -> str:
    """A unique key for a log row, so a row shipped twice (at-least-once) is stored once."""
    return secrets.token_hex(12)


@dataclass(frozen=True)
class LoginRecord:
    ts: float
    login: str
    client_ip: str
    mechanism: str
    result: str
    tenant_id: int | None = None
    detail: str = ""
    event_key: str = field(default_factory=new_event_key)


@dataclass(frozen=True)
class OpRecord:
    """One operation-log row: who (uid and name), did what, to what, with which result."""

    ts: float
    actor_uid: int | None
    actor: str
    action: str
    target: str
    result: str
    tenant_id: int | None = None
    detail: str = ""
    event_key: str = field(default_factory=new_event_key)


class LogStore:
    """Methods Store gets for the logs; see the module docstring."""

    conn: sqlite3.Connection
    keys: crypto.DataKeys

    # -- logs ------------------------------------------------------------------------------

    def _purged(self, tenant_ids: set[int | None]) -> set[int | None]:
        """Those of TENANT_IDS that name no tenant (any more): their rows were purged with it."""
        named = {t for t in tenant_ids if t is not None}
        if not named:
            return set()
        marks = ",".join("?" * len(named))
        have = {r[0] for r in self.conn.execute(f"SELECT id FROM tenants WHERE id IN ({marks})", tuple(named))}
        return {t for t in named if t not in have}

    def log_logins(self, records: list[LoginRecord]) -> int:
        """Add login-log rows; a row whose event_key is already present (shipped again from the
        spool's outbox) or whose tenant was purged meanwhile is skipped. Returns how many were new."""
        with transaction(self.conn):
            gone = self._purged({r.tenant_id for r in records})
            before = self.conn.total_changes
            self.conn.executemany(
                "INSERT OR IGNORE INTO login_log(ts, tenant_id, login, client_ip, mechanism, result, detail, event_key) "
                "VALUES (?,?,?,?,?,?,?,?)",
                [(r.ts, r.tenant_id, r.login, r.client_ip, r.mechanism, r.result, r.detail, r.event_key)
                 for r in records if r.tenant_id not in gone],
            )  # fmt: skip
            return self.conn.total_changes - before

    def log_ops(self, records: list[OpRecord]) -> int:
        """Add operation-log rows, skipping keys already present and purged tenants' rows, like log_logins."""
        with transaction(self.conn):
            return self._insert_ops(records)

    def _insert_ops(self, records: list[OpRecord]) -> int:
        gone = self._purged({r.tenant_id for r in records})
        before = self.conn.total_changes
        self.conn.executemany(
            "INSERT OR IGNORE INTO ops_log(ts, actor_uid, actor, tenant_id, action, target, result, detail, event_key) "
            "VALUES (?,?,?,?,?,?,?,?,?)",
            [(r.ts, r.actor_uid, r.actor, r.tenant_id, r.action, r.target, r.result, r.detail, r.event_key)
             for r in records if r.tenant_id not in gone],
        )  # fmt: skip
        return self.conn.total_changes - before

    def log_op(
        self,
        *,
        actor_uid: int | None,
        actor: str,
        action: str,
        target: str,
        result: str,
        tenant_id: int | None = None,
        detail: str = "",
    ) -> None:
        """One operation-log row, now (callers that must not lose it when the store cannot be
        written go through cmcd.queue.audit.AuditLog instead)."""
        self.log_ops([OpRecord(time.time(), actor_uid, actor, action, target, result, tenant_id, detail)])

    MAIL_EVENT_COLUMNS = (
        "event_key", "ts", "tenant_id", "queue_id", "event", "sender_enc", "sender_hmac", "rcpt_enc", "rcpt_hmac",
        "rcpt_domain", "status", "response_enc", "attempt", "mx", "ip", "tls", "delay", "size", "message_id",
    )  # fmt: skip

    def insert_mail_events(self, rows: list[tuple[Any, ...]], blocks: BlockPolicy | None = None) -> int:
        """Add mail-log rows (addresses already encrypted, in MAIL_EVENT_COLUMNS order, then a
        suppress flag, the message's tags, the reply's bounce class and the message's stream); a row whose event_key is
        already present is skipped. The reply comes encrypted (bytes or None, from the spool's outbox)
        or as text, encrypted here. A row flagged suppress puts its recipient on the tenant's
        suppression list, and so does the BLOCKS policy's count_threshold-th bounce of a class whose
        action is count within count_window; such a block expires watch_s after it was made, or last
        renewed by another bounce (the tags of an accepted message are kept for filtering too), all in
        the same transaction. Returns how many rows were new."""
        n = len(self.MAIL_EVENT_COLUMNS)
        cols = ", ".join(self.MAIL_EVENT_COLUMNS)
        marks = ", ".join("?" for _ in self.MAIL_EVENT_COLUMNS)
        i = {c: k for k, c in enumerate(self.MAIL_EVENT_COLUMNS)}
        reply = i["response_enc"]
        rows = [
            (*r[:reply], self.keys.seal_text(r[reply]), *r[reply + 1 :]) if isinstance(r[reply], str) else r
            for r in rows
        ]
        with transaction(self.conn):
            # a tenant purged meanwhile gets none of its in-flight events back
            tenants = {r[0] for r in self.conn.execute("SELECT id FROM tenants")}
            rows = [r for r in rows if r[i["tenant_id"]] in tenants]
            before = self.conn.total_changes
            self.conn.executemany(
                f"INSERT OR IGNORE INTO mail_log({cols}, bounce_class, stream) VALUES ({marks}, ?, ?)",
                [(*r[:n], _class_of(r, n), _stream_of(r, n)) for r in rows],
            )
            added = self.conn.total_changes - before
            blocked = [r for r in rows if len(r) > n and r[n]] + self._counted_out(rows, n, i, blocks)
            self.conn.executemany(
                "INSERT INTO suppressions(tenant_id, address_enc, address_hmac, domain, reason, reason_enc, created, "
                "bounce_class, expires) VALUES (?,?,?,?,'',?,?,?,?) ON CONFLICT(tenant_id, address_hmac, stream) DO UPDATE "
                "SET expires = MAX(suppressions.expires, excluded.expires) WHERE suppressions.expires IS NOT NULL",
                [
                    (r[i["tenant_id"]], r[i["rcpt_enc"]], r[i["rcpt_hmac"]], r[i["rcpt_domain"]], r[reply],
                     r[i["ts"]], _class_of(r, n), blocks.expires(r[i["ts"]]) if blocks is not None else None)
                    for r in blocked
                ],
            )  # fmt: skip
            self.conn.executemany(
                "INSERT OR IGNORE INTO message_tags(queue_id, tenant_id, tags, ts) VALUES (?,?,?,?)",
                [
                    (r[i["queue_id"]], r[i["tenant_id"]], r[n + 1], r[i["ts"]])
                    for r in rows
                    if len(r) > n + 1 and r[n + 1]
                ],
            )
            return added

    def _counted_out(
        self, rows: list[tuple[Any, ...]], n: int, i: dict[str, int], blocks: BlockPolicy | None
    ) -> list[tuple[Any, ...]]:
        """Those of ROWS (already in mail_log) whose bounce is the count_threshold-th (or later) of its
        class for its recipient within count_window, when the class's action is count for the row's
        tenant (its own block_actions, read in this transaction, else the host's): one COUNT over the
        recipient's rows (mail_log_rcpt index) per such bounce. A bounce of a bounce (the null sender)
        never counts."""
        if blocks is None:
            return []
        null_sender = self.keys.index("")
        own: dict[int, Mapping[str, str]] | None = None  # read once, at the first bounce with a class
        out = []
        for r in rows:
            cls = _class_of(r, n)
            if not cls or (len(r) > n and r[n]) or r[i["status"]] not in ("bounced", "expired"):
                continue
            if own is None:
                own = {
                    t: parse_tenant_actions(text)
                    for t, text in self.conn.execute("SELECT id, block_actions FROM tenants WHERE block_actions != ''")
                }
            if (
                blocks.action(cls, own.get(r[i["tenant_id"]])) != "count"
                or bytes(r[i["sender_hmac"]] or b"") == null_sender
            ):
                continue
            ts = r[i["ts"]]
            seen = self.conn.execute(
                "SELECT COUNT(DISTINCT queue_id) FROM mail_log WHERE rcpt_hmac = ? AND tenant_id = ? "
                "AND bounce_class = ? AND status IN ('bounced', 'expired') AND ts > ? AND ts <= ? AND sender_hmac != ?",
                (r[i["rcpt_hmac"]], r[i["tenant_id"]], cls, ts - blocks.count_window_s, ts, null_sender),
            ).fetchone()[0]
            if seen >= blocks.count_threshold:
                out.append(r)
        return out

    # -- log queries (paged by id, so an export of any size never sits in memory) ---------------

    _LOG_QUERIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
        "mail": (
            "mail_log",
            "SELECT x.id, x.ts, t.name, x.queue_id, x.event, x.sender_enc, x.rcpt_enc, x.rcpt_domain, x.status, "
            "x.response_enc, x.attempt, x.mx, x.ip, x.tls, x.delay, x.size, x.message_id, x.bounce_class, x.stream "
            "FROM mail_log x LEFT JOIN tenants t ON t.id = x.tenant_id",
            ("id", "ts", "tenant", "queue_id", "event", "sender", "rcpt", "rcpt_domain", "status", "response",
             "attempt", "mx", "ip", "tls", "delay", "size", "message_id", "bounce_class", "stream"),
        ),
        "login": (
            "login_log",
            "SELECT x.id, x.ts, t.name, x.login, x.client_ip, x.mechanism, x.result, x.detail FROM login_log x "
            "LEFT JOIN tenants t ON t.id = x.tenant_id",
            ("id", "ts", "tenant", "login", "client_ip", "mechanism", "result", "detail"),
        ),
        "ops": (
            "ops_log",
            "SELECT x.id, x.ts, t.name, x.actor_uid, x.actor, x.action, x.target, x.result, x.detail FROM ops_log x "
            "LEFT JOIN tenants t ON t.id = x.tenant_id",
            ("id", "ts", "tenant", "actor_uid", "actor", "action", "target", "result", "detail"),
        ),
    }  # fmt: skip

    def log_page(
        self,
        kind: str,
        *,
        tenant_id: int | None = None,
        since: float | None = None,
        until: float | None = None,
        rcpt: str | None = None,
        sender: str | None = None,
        queue_id: str | None = None,
        status: str | None = None,
        events: tuple[str, ...] | None = None,
        tag: str | None = None,
        stream: str | None = None,
        after: int = 0,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        """One page of log rows in id (time) order after id AFTER; addresses found through their
        HMAC index and returned decrypted. TAG and STREAM filter mail-log rows only."""
        table, select, keys = self._LOG_QUERIES[kind]
        if since is not None and after == 0:  # start at the first row of the window (ts index), not at row 1
            first = self.conn.execute(f"SELECT MIN(id) FROM {table} WHERE ts >= ?", (since,)).fetchone()[0]
            if first is None:
                return []
            after = first - 1
        where: list[str] = ["x.id > ?"]
        args: list[Any] = [after]
        for column, value in (("x.tenant_id", tenant_id), ("x.queue_id", queue_id)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if since is not None:
            where.append("x.ts >= ?")
            args.append(since)
        if until is not None:
            where.append("x.ts < ?")
            args.append(until)
        if rcpt is not None:
            where.append("x.rcpt_hmac = ?")
            args.append(self.keys.index(rcpt))
        if sender is not None:
            where.append("x.sender_hmac = ?")
            args.append(self.keys.index(sender))
        if status is not None:
            where.append("(x.event = ? OR x.status = ?)" if kind == "mail" else "x.result = ?")
            args += [status, status] if kind == "mail" else [status]
        if events is not None and kind == "mail":
            where.append(f"x.event IN ({','.join('?' * len(events))})")
            args += events
        if stream is not None and kind == "mail":
            where.append("x.stream = ?")
            args.append(stream)
        if tag is not None and kind == "mail":
            where.append(
                "x.queue_id IN (SELECT queue_id FROM message_tags WHERE tenant_id = x.tenant_id "
                "AND ',' || tags || ',' LIKE ? ESCAPE '\\')"
            )
            args.append("%," + tag.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + ",%")
        sql = f"{select} WHERE {' AND '.join(where)} ORDER BY x.id LIMIT ?"
        out = []
        for r in self.conn.execute(sql, (*args, limit)):
            row = dict(zip(keys, r))
            if kind == "mail":
                row["sender"] = self.keys.decrypt(bytes(r[5])) if r[5] is not None else ""
                row["rcpt"] = self.keys.decrypt(bytes(r[6])) if r[6] is not None else ""
                row["response"] = self.keys.open_text(r[9])
            out.append(row)
        return out

    def ops_page_by_action(
        self,
        action_prefix: str,
        *,
        tenant_id: int,
        since: float | None = None,
        until: float | None = None,
        status: str | None = None,
        after: int = 0,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        """log_page("ops", ...) of TENANT_ID's rows whose action starts with ACTION_PREFIX
        ("console.", "api.users"): the same rows and keys, in id order after id AFTER."""
        _, select, keys = self._LOG_QUERIES["ops"]
        if since is not None and after == 0:  # start at the first row of the window (ts index)
            first = self.conn.execute("SELECT MIN(id) FROM ops_log WHERE ts >= ?", (since,)).fetchone()[0]
            if first is None:
                return []
            after = first - 1
        where = ["x.id > ?", "x.tenant_id = ?", "x.action LIKE ? ESCAPE '\\'"]
        escaped = action_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        args: list[Any] = [after, tenant_id, escaped + "%"]
        for clause, value in (("x.ts >= ?", since), ("x.ts < ?", until), ("x.result = ?", status)):
            if value is not None:
                where.append(clause)
                args.append(value)
        sql = f"{select} WHERE {' AND '.join(where)} ORDER BY x.id LIMIT ?"
        return [dict(zip(keys, r)) for r in self.conn.execute(sql, (*args, limit))]

    def ops_log(self, limit: int = 100) -> Iterator[dict[str, Any]]:
        cur = self.conn.execute(
            "SELECT o.ts, o.actor_uid, o.actor, t.name, o.action, o.target, o.result, o.detail FROM ops_log o "
            "LEFT JOIN tenants t ON t.id = o.tenant_id ORDER BY o.id DESC LIMIT ?",
            (limit,),
        )
        keys = ("ts", "actor_uid", "actor", "tenant", "action", "target", "result", "detail")
        return (dict(zip(keys, r)) for r in cur)

    # -- retention ---------------------------------------------------------------------------

    def expire_rows(self, table: str, cutoff: float, batch: int = 5000) -> int:
        """Delete up to BATCH rows of TABLE older than CUTOFF in one transaction (secure_delete is on);
        the caller repeats until it returns less than BATCH, so no transaction holds the store long."""
        if table not in ("mail_log", "login_log", "ops_log", "message_tags"):
            raise StoreError(f"no log table {table!r}")
        with transaction(self.conn):
            cur = self.conn.execute(
                f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} WHERE ts < ? ORDER BY ts LIMIT ?)",
                (cutoff, batch),
            )
        return cur.rowcount
