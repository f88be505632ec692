"""Tenants' webhook endpoints in the store: the endpoint rows, their delivery state, and the
mail-log batches the dispatcher posts; never does HTTP.

A mixin of Store (same connection, same single thread). The signing secret is stored encrypted
with the data key (AAD "webhook:<tenant id>:<url>"), shown to the operator once at add. An
endpoint's cursor is a mail_log id: everything at or below it was posted (or dropped, or did not
match its events); a new endpoint starts at the current newest row, so it gets events from then on.
There is no retry queue of payloads: a batch is rebuilt from the mail log (replies decrypted) at
every attempt, so nothing a payload holds is at rest outside the encrypted mail log.
"""

from __future__ import annotations

import datetime
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

from cmcd import crypto
from cmcd.db import transaction
from cmcd.errors import NotFound, StoreError
from cmcd.records import Tenant

#: mail-log events a webhook may subscribe to ("unsubscribed": a recipient's one-click unsubscribe,
#: cmcd/api/unsubscribe.py; its queue_id, sender and message_id are empty: it follows no one message)
WEBHOOK_EVENTS = ("delivered", "deferred", "bounced", "expired", "suppressed", "unsubscribed")
#: most mail-log ids one batch query looks through (so an endpoint of a quiet tenant never scans
#: the whole log of the busy ones in one statement)
SCAN_IDS = 10_000


@dataclass(frozen=True)
class Webhook:
    """One endpoint with its delivery state, as the dispatcher needs it (secret decrypted)."""

    id: int
    tenant_id: int
    tenant: str
    url: str
    events: tuple[str, ...]
    secret: bytes = field(repr=False)
    cursor: int = 0
    attempts: int = 0
    failing_since: float | None = None
    next_attempt: float = 0.0
    last_error: str = ""
    last_success: float | None = None
    sent: int = 0
    dropped: int = 0


@dataclass(frozen=True)
class Batch:
    """Mail-log rows after a cursor: the matching events (ready to post) and the id the cursor
    moves to once they are posted; MORE when rows past END are waiting already."""

    events: list[dict[str, Any]]
    end: int
    more: bool
    oldest: float = 0.0  # time of the first event (0.0 when there is none)


def parse_events(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Events named like "delivered,bounced" (or a list) -> a tuple in WEBHOOK_EVENTS order; None means all of them."""
    if value is None:
        return WEBHOOK_EVENTS
    names = value.split(",") if isinstance(value, str) else list(value)
    wanted = {n.strip().lower() for n in names if n.strip()}
    unknown = sorted(wanted - set(WEBHOOK_EVENTS))
    if unknown:
        raise StoreError(f"unknown webhook event {unknown[0]!r}: expected some of {', '.join(WEBHOOK_EVENTS)}")
    if not wanted:
        raise StoreError(f"a webhook needs at least one event of {', '.join(WEBHOOK_EVENTS)}")
    return tuple(e for e in WEBHOOK_EVENTS if e in wanted)


#: endpoints one tenant may have (each costs a store scan a second and a request per batch)
MAX_PER_TENANT = 10


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_COLUMNS = (
    "w.id, w.tenant_id, t.name, w.url, w.events, w.secret_enc, w.cursor, w.attempts, w.failing_since, "
    "w.next_attempt, w.last_error, w.last_success, w.sent, w.dropped, w.created"
)


class WebhookStore:
    """Methods Store gets for webhooks; see the module docstring."""

    conn: sqlite3.Connection
    keys: crypto.DataKeys

    # provided by Store
    def tenant(self, name: str) -> Tenant:  # pragma: no cover - Store's
        raise NotImplementedError

    @staticmethod
    def _webhook_aad(tenant_id: int, url: str) -> bytes:
        return f"webhook:{tenant_id}:{url}".encode()

    def _webhook_rows(self, where: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        sql = f"SELECT {_COLUMNS} FROM webhooks w JOIN tenants t ON t.id = w.tenant_id WHERE {where} ORDER BY w.id"
        return self.conn.execute(sql, args).fetchall()

    @staticmethod
    def _webhook_info(r: tuple[Any, ...]) -> dict[str, Any]:
        """The operator's view of a row: never the secret."""
        return {
            "id": r[0], "tenant": r[2], "url": r[3], "events": r[4].split(","), "created": r[14],
            "last_success": r[11], "sent": r[12], "dropped": r[13], "attempts": r[7], "failing_since": r[8],
            "next_attempt": r[9] or None, "last_error": r[10], "cursor": r[6],
        }  # fmt: skip

    # -- the operator's verbs ------------------------------------------------------------------

    def webhook_add(self, tenant: str, url: str, events: tuple[str, ...], secret: bytes) -> dict[str, Any]:
        """A new endpoint of TENANT for EVENTS, starting after the newest mail-log row."""
        t = self.tenant(tenant)
        events = parse_events(list(events))
        secret_enc = self.keys.encrypt_bytes(secret, self._webhook_aad(t.id, url))
        with transaction(self.conn):
            have = self.conn.execute("SELECT COUNT(*) FROM webhooks WHERE tenant_id = ?", (t.id,)).fetchone()[0]
            if have >= MAX_PER_TENANT:
                raise StoreError(f"tenant {tenant!r} has {have} webhooks, the most allowed; delete one first")
            cursor = self.conn.execute("SELECT COALESCE(MAX(id), 0) FROM mail_log").fetchone()[0]
            cur = self.conn.execute(
                "INSERT INTO webhooks(tenant_id, url, events, secret_enc, created, cursor) VALUES (?,?,?,?,?,?)",
                (t.id, url, ",".join(events), secret_enc, time.time(), cursor),
            )
        return self.webhook(tenant, int(cur.lastrowid or 0))

    def webhook(self, tenant: str, webhook_id: int) -> dict[str, Any]:
        """TENANT's endpoint WEBHOOK_ID; another tenant's is "not found" like a missing one."""
        t = self.tenant(tenant)
        rows = self._webhook_rows("w.id = ? AND w.tenant_id = ?", (webhook_id, t.id))
        if not rows:
            raise NotFound(f"tenant {tenant!r} has no webhook {webhook_id}")
        return self._webhook_info(rows[0])

    def webhooks(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """Every endpoint (of TENANT), with its delivery state; never the secrets."""
        if tenant is None:
            return [self._webhook_info(r) for r in self._webhook_rows("1", ())]
        t = self.tenant(tenant)
        return [self._webhook_info(r) for r in self._webhook_rows("w.tenant_id = ?", (t.id,))]

    def webhook_delete(self, tenant: str, webhook_id: int) -> None:
        t = self.tenant(tenant)
        with transaction(self.conn):
            cur = self.conn.execute("DELETE FROM webhooks WHERE id = ? AND tenant_id = ?", (webhook_id, t.id))
        if cur.rowcount == 0:
            raise NotFound(f"tenant {tenant!r} has no webhook {webhook_id}")

    # -- the dispatcher's ----------------------------------------------------------------------

    def webhook_endpoints(self) -> list[Webhook]:
        """Every endpoint with its state and decrypted secret, for the dispatcher."""
        out = []
        for r in self._webhook_rows("1", ()):
            secret = self.keys.decrypt_bytes(bytes(r[5]), self._webhook_aad(r[1], r[3]))
            out.append(
                Webhook(
                    id=r[0], tenant_id=r[1], tenant=r[2], url=r[3], events=tuple(r[4].split(",")), secret=secret,
                    cursor=r[6], attempts=r[7], failing_since=r[8], next_attempt=r[9], last_error=r[10],
                    last_success=r[11], sent=r[12], dropped=r[13],
                )
            )  # fmt: skip
        return out

    def webhook_batch(self, tenant_id: int, cursor: int, events: tuple[str, ...], limit: int = 100) -> Batch:
        """Up to LIMIT of the tenant's mail-log rows of EVENTS after CURSOR, as webhook events
        (addresses and replies decrypted, tags attached; built at each attempt, never stored). END is past every row looked at, wanted or not."""
        newest = self.conn.execute("SELECT COALESCE(MAX(id), 0) FROM mail_log").fetchone()[0]
        high = min(newest, cursor + SCAN_IDS)
        marks = ",".join("?" * len(events))
        # NOT INDEXED: walk the rowid range, never the (tenant, ts) index over the tenant's history
        rows = self.conn.execute(
            "SELECT id, ts, queue_id, event, sender_enc, rcpt_enc, status, response_enc, attempt, mx, message_id, "
            "bounce_class, stream "
            f"FROM mail_log NOT INDEXED WHERE id > ? AND id <= ? AND tenant_id = ? AND event IN ({marks}) "
            "ORDER BY id LIMIT ?",
            (cursor, high, tenant_id, *events, limit),
        ).fetchall()
        full = len(rows) == limit
        end = rows[-1][0] if full else high
        tags = self.message_tags(sorted({r[2] for r in rows})) if rows else {}
        out = [
            {
                "id": r[0], "time": iso(r[1]), "queue_id": r[2], "event": r[3],
                "sender": self.keys.decrypt(bytes(r[4])) if r[4] is not None else "",
                "recipient": self.keys.decrypt(bytes(r[5])) if r[5] is not None else "",
                "status": r[6], "response": self.keys.open_text(r[7]), "bounce_class": r[11], "attempt": r[8], "mx": r[9],
                "message_id": r[10],
                "tags": tags.get(r[2], []),
                "stream": r[12],
            }
            for r in rows
        ]  # fmt: skip
        return Batch(out, end, full or high < newest, rows[0][1] if rows else 0.0)

    def message_tags(self, queue_ids: list[str]) -> dict[str, list[str]]:  # pragma: no cover - ApiStore's
        raise NotImplementedError

    def webhook_record(
        self,
        webhook_id: int,
        *,
        cursor: int,
        attempts: int,
        failing_since: float | None,
        next_attempt: float,
        last_error: str | None = None,
        success_at: float | None = None,
        sent: int = 0,
        dropped: int = 0,
    ) -> None:
        """Write an endpoint's state after an attempt (a deleted endpoint is left deleted)."""
        with transaction(self.conn):
            self.conn.execute(
                "UPDATE webhooks SET cursor = MAX(cursor, ?), attempts = ?, failing_since = ?, next_attempt = ?, "
                "last_error = COALESCE(?, last_error), last_success = COALESCE(?, last_success), "
                "sent = sent + ?, dropped = dropped + ? WHERE id = ?",
                (cursor, attempts, failing_since, next_attempt, last_error, success_at, sent, dropped, webhook_id),
            )

    def webhook_advance(self, webhook_id: int, cursor: int) -> None:
        """Move the cursor past rows the endpoint does not want (nothing was posted)."""
        with transaction(self.conn):
            self.conn.execute("UPDATE webhooks SET cursor = MAX(cursor, ?) WHERE id = ?", (cursor, webhook_id))
