"""What start-up needs from the store about a spool: which spool it was last started with, and the
accepted recipients the mail log has no final state for (written "lost" when a spool is gone).

Blocking: run on the store's thread or before the event loop starts."""

from __future__ import annotations

from dataclasses import dataclass

from cmcd.db import transaction
from cmcd.records import FINAL_STATES as RECIPIENT_FINAL_STATES
from cmcd.store.store import Store

#: mail-log states after which a recipient needs nothing more
FINAL_STATES = tuple(s.value for s in RECIPIENT_FINAL_STATES)


def _key(shard: int) -> str:
    return "spool_id" if shard == 0 else f"spool_id.{shard}"


def spool_id(store: Store, shard: int = 0) -> str | None:
    """The id of spool shard SHARD this store was last started with, or None (a new store or shard,
    or one from before ids)."""
    row = store.conn.execute("SELECT value FROM meta WHERE key = ?", (_key(shard),)).fetchone()
    return None if row is None else str(row[0])


def set_spool_id(store: Store, value: str, shard: int = 0) -> None:
    with transaction(store.conn):
        store.conn.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (_key(shard), value),
        )


@dataclass(frozen=True)
class Unfinished:
    """An accepted recipient the mail log has no final state for (addresses as stored: encrypted)."""

    tenant_id: int
    tenant: str
    queue_id: str
    accepted_ts: float
    sender_enc: bytes
    sender_hmac: bytes
    rcpt_enc: bytes
    rcpt_hmac: bytes
    rcpt_domain: str
    size_bytes: int
    message_id: str
    stream: str = "transactional"


def unfinished(store: Store) -> list[Unfinished]:
    """Every recipient with an "accepted" row in the mail log and no final one, oldest first.

    Blocking; reads every accepted row of the mail log (run only when a spool is found lost)."""
    finals = ",".join("?" * len(FINAL_STATES))
    rows = store.conn.execute(
        "SELECT a.tenant_id, COALESCE(t.name, ''), a.queue_id, a.ts, a.sender_enc, a.sender_hmac, a.rcpt_enc, "
        "a.rcpt_hmac, a.rcpt_domain, a.size, a.message_id, a.stream FROM mail_log a LEFT JOIN tenants t ON t.id = a.tenant_id "
        "WHERE a.event = 'accepted' AND NOT EXISTS (SELECT 1 FROM mail_log f WHERE f.queue_id = a.queue_id "
        f"AND f.rcpt_hmac = a.rcpt_hmac AND f.status IN ({finals})) ORDER BY a.id",
        FINAL_STATES,
    )
    out: dict[tuple[str, bytes], Unfinished] = {}
    for r in rows:
        sender_enc, sender_hmac, rcpt_enc, rcpt_hmac = (bytes(b or b"") for b in r[4:8])
        u = Unfinished(
            r[0], r[1], r[2], r[3], sender_enc, sender_hmac, rcpt_enc, rcpt_hmac, r[8] or "", r[9], r[10] or "", r[11]
        )
        out.setdefault((u.queue_id, u.rcpt_hmac), u)
    return list(out.values())


def record_lost(store: Store, recipients: list[Unfinished], now: float, response: str) -> int:
    """Write a "lost" mail-log row (a final state) for each of RECIPIENTS, in one transaction; returns
    how many were new (a row already written by an earlier, interrupted start counts once)."""
    rows = [
        (f"{u.queue_id}:{u.rcpt_hmac.hex()}:lost", now, u.tenant_id, u.queue_id, "lost", u.sender_enc, u.sender_hmac,
         u.rcpt_enc, u.rcpt_hmac, u.rcpt_domain, "lost", response, 0, "", "", "", max(0.0, now - u.accepted_ts),
         u.size_bytes, u.message_id, 0, "", "", u.stream)
        for u in recipients
    ]  # fmt: skip
    return store.insert_mail_events(rows)
