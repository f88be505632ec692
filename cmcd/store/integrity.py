"""Start-up checks of a SQLite file, the spool id the store keeps, and the recipients it knows are unfinished.

check_database() says whether a file is a whole SQLite database (not empty, a SQLite header,
`PRAGMA quick_check` clean) and raises UntrustedFileError, one line naming the file and the way
out, when it is not. The store remembers the id of the spool it was used with (meta `spool_id`),
and from its mail log which accepted recipients have no final state yet: what a lost spool took
with it. Never repairs a file, never deletes one.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cmcd.db import transaction
from cmcd.errors import UntrustedFileError
from cmcd.records import FINAL_STATES as RECIPIENT_FINAL_STATES

if TYPE_CHECKING:  # store.py calls check_database() when it opens a store
    from cmcd.store.store import Store

SQLITE_HEADER = b"SQLite format 3\x00"
#: the way out for a store that cannot be trusted: --accept-loss has nothing safe to start from
RESTORE_STORE = (
    "restore the store from a backup with `cmcd restore BACKUP` (cmcd serve --accept-loss cannot replace a store)"
)
#: mail-log states after which a recipient needs nothing more
FINAL_STATES = tuple(s.value for s in RECIPIENT_FINAL_STATES)


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def database_problem(path: Path, what: str) -> str:
    """What is wrong with PATH (which exists) as a SQLite database, or "" when it is whole; WHAT
    names it ("store", "spool"). A file that cannot be read at all raises UntrustedFileError.
    Blocking: quick_check reads every page."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except OSError as exc:  # not a damaged file: a backup is not the answer
        raise UntrustedFileError(
            f"{path}: cannot read the {what}: {exc.strerror or exc}; check the path, its owner and mode"
        ) from None
    if size == 0:
        return f"the {what} is empty (0 bytes)"
    if head != SQLITE_HEADER:
        return f"the {what} is not a SQLite database (its header is garbled)"
    try:
        conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=30)
    except sqlite3.Error as exc:
        return f"cannot open the {what} ({_one_line(str(exc))})"
    try:
        rows = conn.execute("PRAGMA quick_check").fetchall()
    except sqlite3.Error as exc:
        return f"the {what} fails SQLite's quick_check ({_one_line(str(exc))})"
    finally:
        conn.close()
    if [r[0] for r in rows] != ["ok"]:
        return f"the {what} fails SQLite's quick_check ({_one_line('; '.join(str(r[0]) for r in rows[:3]))})"
    return ""


def check_database(path: Path, what: str, way_out: str) -> None:
    """Raise UntrustedFileError ("PATH: what is wrong; WAY_OUT") unless PATH is a whole SQLite database."""
    problem = database_problem(path, what)
    if problem:
        raise UntrustedFileError(f"{path}: {problem}; {way_out}")


def spool_id(store: Store) -> str | None:
    """The id of the spool this store was last started with, or None (a new store, or one from before ids)."""
    row = store.conn.execute("SELECT value FROM meta WHERE key = 'spool_id'").fetchone()
    return None if row is None else str(row[0])


def set_spool_id(store: Store, value: str) -> None:
    with transaction(store.conn):
        store.conn.execute(
            "INSERT INTO meta(key, value) VALUES ('spool_id', ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (value,),
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


def unfinished(store: Store) -> list[Unfinished]:
    """Every recipient with an "accepted" row in the mail log and no final one, oldest first.

    Blocking; reads every accepted row of the mail log (run only when a spool is found lost)."""
    finals = ",".join("?" * len(FINAL_STATES))
    rows = store.conn.execute(
        "SELECT a.tenant_id, COALESCE(t.name, ''), a.queue_id, a.ts, a.sender_enc, a.sender_hmac, a.rcpt_enc, "
        "a.rcpt_hmac, a.rcpt_domain, a.size, a.message_id FROM mail_log a LEFT JOIN tenants t ON t.id = a.tenant_id "
        "WHERE a.event = 'accepted' AND NOT EXISTS (SELECT 1 FROM mail_log f WHERE f.queue_id = a.queue_id "
        f"AND f.rcpt_hmac = a.rcpt_hmac AND f.status IN ({finals})) ORDER BY a.id",
        FINAL_STATES,
    )
    out: dict[tuple[str, bytes], Unfinished] = {}
    for r in rows:
        sender_enc, sender_hmac, rcpt_enc, rcpt_hmac = (bytes(b or b"") for b in r[4:8])
        u = Unfinished(
            r[0], r[1], r[2], r[3], sender_enc, sender_hmac, rcpt_enc, rcpt_hmac, r[8] or "", r[9], r[10] or ""
        )
        out.setdefault((u.queue_id, u.rcpt_hmac), u)
    return list(out.values())


def record_lost(store: Store, recipients: list[Unfinished], now: float, response: str) -> int:
    """Write a "lost" mail-log row (a final state) for each of RECIPIENTS, in one transaction; returns
    how many were new (a row already written by an earlier, interrupted start counts once)."""
    rows = [
        (f"{u.queue_id}:{u.rcpt_hmac.hex()}:lost", now, u.tenant_id, u.queue_id, "lost", u.sender_enc, u.sender_hmac,
         u.rcpt_enc, u.rcpt_hmac, u.rcpt_domain, "lost", response, 0, "", "", "", max(0.0, now - u.accepted_ts),
         u.size_bytes, u.message_id)
        for u in recipients
    ]  # fmt: skip
    return store.insert_mail_events(rows)
