"""The delivery side of the spool: claiming due recipients, recording outcomes, erasing finished messages.

Every function here takes the writer connection and runs on the spool's writer thread
(Spool.claim_due, Spool.apply_results), so a claim, a batch of outcomes, the bounces they cause
and the erasure of a finished body are each one transaction. A remote reply is encrypted once here and
the same ciphertext kept on the recipient row and in its outbox event (a reply echoes the address).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cmcd import intl
from cmcd.crypto import DataKeys
from cmcd.db import transaction
from cmcd.queue import dsn
from cmcd.queue.ids import QueueIdGenerator
from cmcd.queue.tables import INSERT_RESULT_EVENT, insert_messages
from cmcd.records import Recipient, RecipientState, SpoolMessage, Stream

log = logging.getLogger("cmcd.queue")

#: bodies up to this size travel with the claim; larger ones are read just before sending
INLINE_BODY = 256 * 1024
_CHUNK = 500  # SQLite's host parameters per IN (...) list
#: final states the sender is told about in a delivery status notification
_REPORTED = (RecipientState.BOUNCED, RecipientState.EXPIRED)


def _chunks(items: list[Any], n: int = _CHUNK) -> Iterable[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _marks(n: int) -> str:
    return ",".join("?" * n)


@dataclass(frozen=True)
class Due:
    rid: int
    address: str
    attempts: int  # failed attempts so far
    enc: bytes = b""  # the address as stored (encrypted) and its index, reused for mail-log events
    hmac: bytes = b""
    domain: str = ""


@dataclass
class Job:
    """One message to one destination: the recipients that go in one SMTP transaction (one domain's,
    or several domains' when they share a next hop)."""

    queue_id: str
    tenant_id: int
    sender: str
    domain: str
    received: float
    size: int
    message_id: str
    recipients: list[Due] = field(default_factory=list)
    body: bytes | None = None  # None: read it from the spool before sending
    sender_enc: bytes = b""
    sender_hmac: bytes = b""
    moved: int = 0  # times it was put back for another connection (a stale one failed before sending)
    stream: str = Stream.TRANSACTIONAL  # a broadcast is held back from an address that unsubscribed


@dataclass(frozen=True)
class Result:
    """What happened to one recipient in one attempt."""

    job: Job
    due: Due
    state: RecipientState  # one of RESULT_STATES
    response: str
    next_attempt: float = 0.0
    mx: str = ""
    ip: str = ""
    tls: str = ""
    suppress: bool = False  # a hard bounce: add to the tenant's suppression list
    bounce_class: str = ""  # what kind of failure the reply reports (cmcd/bounces.py); "" for a delivery
    #: False for a deferral that was no attempt (a shaping suspension held it): attempts stay as they were
    counts_attempt: bool = True


@dataclass(frozen=True)
class ApplyReport:
    recorded: int
    finished: int  # messages whose body was erased
    bounces: int  # DSN messages queued
    results: tuple[Result, ...] = ()  # what was applied (Spool.apply_results takes them on the writer thread)
    committed_at: float = 0.0  # when the commit returned (the outcomes are durable from then), on the caller's clock


def next_due(conn: sqlite3.Connection) -> float | None:
    """The earliest next_attempt of a schedulable recipient (one index probe)."""
    row = conn.execute("SELECT MIN(next_attempt) FROM recipients WHERE state IN ('queued', 'deferred')").fetchone()
    return None if row is None or row[0] is None else float(row[0])


def claim_due(conn: sqlite3.Connection, keys: DataKeys, now: float, limit: int) -> list[Job]:
    """Mark up to LIMIT due recipients inflight and return them grouped by message and domain.

    Walks the partial index on next_attempt, so the cost is proportional to what is due, not
    to the queue's size. The claim is not fsynced on its own: after a crash an unsynced claim
    is simply still queued, and recover() turns any inflight row back into queued anyway.
    """
    rows = conn.execute(
        "SELECT id, queue_id, domain, rcpt_enc, attempts, rcpt_hmac FROM recipients "
        "WHERE state IN ('queued', 'deferred') AND next_attempt <= ? ORDER BY next_attempt LIMIT ?",
        (now, limit),
    ).fetchall()
    if not rows:
        return []
    conn.execute("PRAGMA synchronous=NORMAL")
    try:
        with transaction(conn):
            conn.executemany("UPDATE recipients SET state = 'inflight' WHERE id = ?", [(r[0],) for r in rows])
    finally:
        conn.execute("PRAGMA synchronous=FULL")
    qids = list({r[1] for r in rows})
    envelopes: dict[str, tuple[Any, ...]] = {}
    for chunk in _chunks(qids):
        for m in conn.execute(
            "SELECT queue_id, tenant_id, sender_enc, size_bytes, received, message_id, "
            f"CASE WHEN size_bytes <= {INLINE_BODY} THEN body END, sender_hmac, stream "
            f"FROM messages WHERE queue_id IN ({_marks(len(chunk))})",
            chunk,
        ):
            envelopes[m[0]] = m
    jobs: dict[tuple[str, str], Job] = {}
    for rid, qid, domain, rcpt_enc, attempts, rcpt_hmac in rows:
        m = envelopes.get(qid)
        if m is None:  # cannot happen inside one transaction; never deliver without an envelope
            log.error("event=orphan_recipient queue_id=%s", qid)
            continue
        job = jobs.get((qid, domain))
        if job is None:
            body = keys.decrypt_bytes(bytes(m[6]), qid.encode()) if m[6] is not None else None
            job = jobs[(qid, domain)] = Job(
                qid,
                m[1],
                keys.decrypt(m[2]),
                domain,
                m[4],
                m[3],
                m[5],
                [],
                body,
                bytes(m[2]),
                bytes(m[7]),
                stream=m[8],
            )
        job.recipients.append(Due(rid, keys.decrypt(rcpt_enc), attempts, bytes(rcpt_enc), bytes(rcpt_hmac), domain))
    return list(jobs.values())


def read_body(conn: sqlite3.Connection, keys: DataKeys, queue_id: str) -> bytes | None:
    row = conn.execute("SELECT body FROM messages WHERE queue_id = ?", (queue_id,)).fetchone()
    return None if row is None else keys.decrypt_bytes(bytes(row[0]), queue_id.encode())


def apply_results(
    conn: sqlite3.Connection,
    keys: DataKeys,
    results: list[Result],
    *,
    now: float,
    hostname: str,
    ids: QueueIdGenerator,
    dsn_off: frozenset[int] = frozenset(),
) -> ApplyReport:
    """Record RESULTS, queue the bounces they cause and erase every message that is now finished.

    One transaction: a bounce exists exactly when its recipients' final state does, and a body
    is deleted (secure_delete overwrites its pages) in the same commit that makes the last
    recipient final. A result for a row that is no longer inflight (an operator deleted the
    message meanwhile) is not recorded again.
    """
    recorded = 0
    touched: set[str] = set()
    events: list[tuple[Any, ...]] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for r in results:
            job, due = r.job, r.due
            attempt = due.attempts + (0 if r.state == RecipientState.SUPPRESSED or not r.counts_attempt else 1)
            # a held recipient's row in the mail log is one per holding, not per attempt (none was made)
            key = f"{job.queue_id}:{due.rid}:{attempt}:{r.state}" + ("" if r.counts_attempt else f":held@{now:.6f}")
            reply = keys.seal_text(r.response)
            if r.state == RecipientState.DEFERRED:
                cur = conn.execute(
                    "UPDATE recipients SET state = CASE WHEN (SELECT held FROM messages WHERE queue_id = ?) "
                    "THEN 'held' ELSE 'deferred' END, attempts = ?, next_attempt = ?, last_response_enc = ?, "
                    "last_mx = ?, last_class = ? WHERE id = ? AND state = 'inflight'",
                    (job.queue_id, attempt, r.next_attempt, reply, r.mx, r.bounce_class, due.rid),
                )
            else:
                # a bounce is reported to a real sender (not for a bounce itself: those are dropped and logged)
                notify = int(r.state in _REPORTED and bool(job.sender) and job.tenant_id not in dsn_off)
                if r.state in _REPORTED and not job.sender:
                    log.warning("event=bounce_dropped queue_id=%s response=%r", job.queue_id, r.response)
                cur = conn.execute(
                    "UPDATE recipients SET state = ?, attempts = ?, last_response_enc = ?, last_mx = ?, notify = ?, "
                    "last_class = ? WHERE id = ? AND state = 'inflight'",
                    (r.state, attempt, reply, r.mx, notify, r.bounce_class, due.rid),
                )
            if cur.rowcount != 1:
                log.warning("event=result_dropped queue_id=%s state=%s reason=not_inflight", job.queue_id, r.state)
                continue
            recorded += 1
            touched.add(job.queue_id)
            events.append(
                (key, now, job.tenant_id, job.queue_id, r.state,
                 job.sender_enc or keys.encrypt(job.sender), job.sender_hmac or keys.index(job.sender),
                 due.enc or keys.encrypt(due.address), due.hmac or keys.index(due.address),
                 due.domain or job.domain, r.state, reply, attempt, r.mx, r.ip, r.tls, max(0.0, now - job.received), job.size,
                 job.message_id, 1 if r.suppress else 0, r.bounce_class, job.stream)
            )  # fmt: skip
        conn.executemany(INSERT_RESULT_EVENT, events)
        qids = sorted(touched)
        bounces = _queue_bounces(conn, keys, qids, now, hostname, ids)
        finished = _erase_finished(conn, qids)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return ApplyReport(recorded, finished, bounces)


def _queue_bounces(
    conn: sqlite3.Connection, keys: DataKeys, qids: list[str], now: float, hostname: str, ids: QueueIdGenerator
) -> int:
    """One DSN per message for its recipients waiting to be reported, once none of its recipients
    is still being attempted (so recipients that fail together are reported together)."""
    # One query per chunk, not one per message: most messages were delivered and have no such row.
    waiting: dict[str, list[Any]] = {}
    for chunk in _chunks(qids):
        for r in conn.execute(
            "SELECT queue_id, id, rcpt_enc, state, last_response_enc, last_mx, last_class FROM recipients "
            f"WHERE queue_id IN ({_marks(len(chunk))}) AND (notify = 1 OR state = 'inflight') ORDER BY id",
            chunk,
        ):
            waiting.setdefault(r[0], []).append(r[1:])
    messages = []
    for qid in qids:
        rows = waiting.get(qid)
        if not rows or any(r[2] == RecipientState.INFLIGHT for r in rows):
            continue
        m = conn.execute(
            "SELECT tenant_id, user_id, sender_enc, received, body FROM messages WHERE queue_id = ?", (qid,)
        ).fetchone()
        sender = keys.decrypt(bytes(m[2]))
        report = dsn.build(
            hostname=hostname,
            queue_id=qid,
            sender=sender,
            arrival=m[3],
            now=now,
            recipients=[
                dsn.failed(keys.decrypt(bytes(r[1])), keys.open_text(r[3]), r[4], r[2] == RecipientState.EXPIRED, r[5])
                for r in rows
            ],
            headers=dsn.original_headers(keys.decrypt_bytes(bytes(m[4]), qid.encode())),
        )
        conn.executemany("UPDATE recipients SET notify = 0 WHERE id = ?", [(r[0],) for r in rows])
        bounce_id = ids.next(now)
        messages.append(
            SpoolMessage(
                queue_id=bounce_id,
                tenant_id=m[0],
                user_id=m[1],
                sender="",
                recipients=(Recipient(sender, intl.domain_key(sender)),),  # routed by its A-label domain
                body=report,
                received_ts=now,
                message_id=f"<{bounce_id}.dsn@{hostname}>",
            )
        )
        log.info("event=bounce_queued queue_id=%s bounce_id=%s recipients=%d", qid, bounce_id, len(rows))
    insert_messages(conn, keys, messages)
    return len(messages)


def _erase_finished(conn: sqlite3.Connection, qids: list[str]) -> int:
    """Delete every message among QIDS with no pending recipient left, with its rows."""
    done = []
    for chunk in _chunks(qids):
        pending = {
            r[0]
            for r in conn.execute(
                f"SELECT DISTINCT queue_id FROM recipients WHERE queue_id IN ({_marks(len(chunk))}) "
                "AND state IN ('queued', 'deferred', 'inflight', 'held')",
                chunk,
            )
        }
        done += [(q,) for q in chunk if q not in pending]
    conn.executemany("DELETE FROM recipients WHERE queue_id = ?", done)
    conn.executemany("DELETE FROM messages WHERE queue_id = ?", done)
    return len(done)


def checkpoint(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """Copy the WAL into the database and truncate it, so erased pages leave the WAL file too."""
    row = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    return (int(row[0]), int(row[1]), int(row[2]))
