"""API requests sent with an Idempotency-Key: the key and the response, kept in the spool with the messages.

The key is committed in the same transaction as the messages the request queued (Spool.commit_all),
so a retried request finds either both or neither: it is never queued twice, and a crash cannot
keep the key without its messages or the messages without their key. Functions take the spool's
connection; Spool runs them. Never decides what a request means (api/).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass


@dataclass(frozen=True)
class ApiRequest:
    """An API request's Idempotency-Key and the response it produced, committed with its messages."""

    tenant_id: int
    key: str
    request_hash: bytes
    status: int
    response: str


@dataclass(frozen=True)
class StoredResponse:
    """What an earlier request with the same key was answered."""

    request_hash: bytes
    status: int
    response: str


def find(conn: sqlite3.Connection, tenant_id: int, key: str, since: float) -> StoredResponse | None:
    row = conn.execute(
        "SELECT request_hash, status, response FROM api_requests WHERE tenant_id = ? AND key = ? AND created >= ?",
        (tenant_id, key, since),
    ).fetchone()
    return None if row is None else StoredResponse(bytes(row[0]), int(row[1]), str(row[2]))


def insert(conn: sqlite3.Connection, request: ApiRequest, now: float, forget_before: float) -> None:
    """Keep REQUEST (inside the caller's transaction), forgetting requests older than FORGET_BEFORE."""
    conn.execute("DELETE FROM api_requests WHERE created < ?", (forget_before,))
    conn.execute(
        "INSERT INTO api_requests(tenant_id, key, request_hash, status, response, created) VALUES (?,?,?,?,?,?)",
        (request.tenant_id, request.key, request.request_hash, request.status, request.response, now),
    )
