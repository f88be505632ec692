"""Claims of API Idempotency-Keys in the store, shared by every worker process: which shard runs
the request a key names, and the response it got; never decides what a request means (api/), and
never reads the spool (queue/requests.py holds the protocol around both).

A mixin of Store (same connection, same single thread). The spool of the shard that ran a request
keeps its key with its messages (committed together); the store row is how the other workers learn
of it. A worker claims (tenant, key) before it queues anything, in one short transaction, by the
rule in claim_rule(); after the spool commit it writes the response into its row (answer()), and
when the request was refused it lets the claim go (release()). A worker that died between its
spool commit and answer() leaves a claim without a response: at its next start reconcile() copies
the responses its spool holds and forget_unanswered() drops the claims of requests that never
committed.

Neither the key nor the response is kept in the clear (the store is backed up; a key or a
Message-ID may hold an address): the key and the request's fingerprint as HMACs under the data
key's index key, the response encrypted with the data key. Rows older than [api]
idempotency_ttl are dropped by the next claim (as the spool drops its own on each commit).
"""

from __future__ import annotations

import enum
import hmac
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from cmcd import crypto
from cmcd.db import transaction


class ClaimOutcome(enum.Enum):
    #: the key is this shard's to run: no row, an unanswered row of this shard (its request is not
    #: running: the process keeps the keys it runs in memory), or of a shard no worker runs
    TAKEN = "taken"
    #: a response is stored: answer it (or refuse a different request with the same key)
    ANSWERED = "answered"
    #: another worker runs the request with this key now (or died running it and is restarting)
    BUSY = "busy"


def claim_rule(row_shard: int | None, answered: bool, shard: int, workers: int) -> ClaimOutcome:
    """What a claim by SHARD (one of WORKERS) finds, given the key's row: its shard (None: no row)
    and whether it holds a response. Pure: the table of tests/unit/test_request_store.py."""
    if row_shard is None:
        return ClaimOutcome.TAKEN
    if answered:
        return ClaimOutcome.ANSWERED
    if row_shard == shard or row_shard >= workers:
        return ClaimOutcome.TAKEN
    return ClaimOutcome.BUSY


@dataclass(frozen=True)
class Claim:
    """What claiming a key found: the outcome, the shard whose request the row names (this shard's
    when TAKEN), whether the stored request is this one (same fingerprint), and its response."""

    outcome: ClaimOutcome
    shard: int
    same_request: bool
    status: int = 0
    response: str = ""


#: reconcile() rows: (tenant id, key, request fingerprint, status, response, created)
SpoolRequest = tuple[int, str, bytes, int, str, float]


class RequestStore:
    """Methods Store gets for Idempotency-Key claims; see the module docstring."""

    conn: sqlite3.Connection
    keys: crypto.DataKeys

    def _key_hmac(self, key: str) -> bytes:
        return hmac.digest(self.keys.index_key, b"idempotency-key\0" + key.encode(), "sha256")[:16]

    def _fingerprint(self, request_hash: bytes) -> bytes:
        return hmac.digest(self.keys.index_key, b"idempotency-request\0" + request_hash, "sha256")[:16]

    def idempotency_claim(
        self, tenant_id: int, key: str, request_hash: bytes, shard: int, workers: int, now: float, forget_before: float
    ) -> Claim:
        """Claim TENANT_ID's KEY for the request REQUEST_HASH on SHARD (one of WORKERS), in one
        transaction that first drops every row created before FORGET_BEFORE. A TAKEN claim holds
        this request's fingerprint and no response, created NOW."""
        kh, fp = self._key_hmac(key), self._fingerprint(request_hash)
        c = self.conn.execute
        with transaction(self.conn):
            c("DELETE FROM idempotency_keys WHERE created < ?", (forget_before,))
            row = c(
                "SELECT shard, fingerprint, status, response_enc FROM idempotency_keys WHERE tenant_id = ? AND key_hmac = ?",
                (tenant_id, kh),
            ).fetchone()
            outcome = claim_rule(None if row is None else int(row[0]), row is not None and row[3] is not None,
                                 shard, workers)  # fmt: skip
            if outcome is ClaimOutcome.TAKEN:
                c(
                    "INSERT INTO idempotency_keys(tenant_id, key_hmac, fingerprint, shard, created) VALUES (?,?,?,?,?) "
                    "ON CONFLICT(tenant_id, key_hmac) DO UPDATE SET fingerprint = excluded.fingerprint, "
                    "shard = excluded.shard, created = excluded.created, status = 0, response_enc = NULL",
                    (tenant_id, kh, fp, shard, now),
                )
                return Claim(outcome, shard, True)
        assert row is not None
        same = hmac.compare_digest(bytes(row[1]), fp)
        if outcome is ClaimOutcome.BUSY:
            return Claim(outcome, int(row[0]), same)
        return Claim(outcome, int(row[0]), same, int(row[2]), self.keys.decrypt(bytes(row[3])))

    def idempotency_answer(
        self, tenant_id: int, key: str, request_hash: bytes, shard: int, status: int, response: str, now: float
    ) -> bool:
        """The request REQUEST_HASH with KEY, run on SHARD, was committed and answered STATUS and
        RESPONSE: kept in SHARD's row (made if it is missing, as long as the tenant exists), created
        NOW. False when the row is another shard's (left as it is)."""
        kh = self._key_hmac(key)
        with transaction(self.conn):
            cur = self.conn.execute(
                "INSERT INTO idempotency_keys(tenant_id, key_hmac, fingerprint, shard, created, status, response_enc) "
                "SELECT ?,?,?,?,?,?,? WHERE EXISTS (SELECT 1 FROM tenants WHERE id = ?) "
                "ON CONFLICT(tenant_id, key_hmac) DO UPDATE SET fingerprint = excluded.fingerprint, "
                "created = excluded.created, status = excluded.status, response_enc = excluded.response_enc "
                "WHERE idempotency_keys.shard = excluded.shard",
                (tenant_id, kh, self._fingerprint(request_hash), shard, now, status, self.keys.encrypt(response),
                 tenant_id),
            )  # fmt: skip
        return cur.rowcount == 1

    def idempotency_release(self, tenant_id: int, key: str, shard: int) -> bool:
        """SHARD's request with KEY was refused (nothing committed): its claim goes, so a retry may
        run anywhere. A row with a response, or another shard's, stays."""
        with transaction(self.conn):
            cur = self.conn.execute(
                "DELETE FROM idempotency_keys WHERE tenant_id = ? AND key_hmac = ? AND shard = ? "
                "AND response_enc IS NULL",
                (tenant_id, self._key_hmac(key), shard),
            )
        return cur.rowcount == 1

    def idempotency_reconcile(self, shard: int, requests: Sequence[SpoolRequest]) -> int:
        """At SHARD's start, before it serves: REQUESTS its spool committed (within the ttl) get
        their response into the store where it lacks it (no row, or SHARD's row without one), in one
        transaction. Returns how many rows were written."""
        written = 0
        with transaction(self.conn):
            for tenant_id, key, request_hash, status, response, created in requests:
                cur = self.conn.execute(
                    "INSERT INTO idempotency_keys(tenant_id, key_hmac, fingerprint, shard, created, status, "
                    "response_enc) SELECT ?,?,?,?,?,?,? WHERE EXISTS (SELECT 1 FROM tenants WHERE id = ?) "
                    "ON CONFLICT(tenant_id, key_hmac) DO UPDATE SET fingerprint = excluded.fingerprint, "
                    "created = excluded.created, status = excluded.status, response_enc = excluded.response_enc "
                    "WHERE idempotency_keys.shard = excluded.shard AND idempotency_keys.response_enc IS NULL",
                    (tenant_id, self._key_hmac(key), self._fingerprint(request_hash), shard, created, status,
                     self.keys.encrypt(response), tenant_id),
                )  # fmt: skip
                written += cur.rowcount
        return written

    def idempotency_forget_unanswered(self, shard: int) -> int:
        """At SHARD's start, after reconcile(): its claims still without a response name requests
        that never committed (the process that ran them is gone): they go. Returns how many."""
        with transaction(self.conn):
            return self.conn.execute(
                "DELETE FROM idempotency_keys WHERE shard = ? AND response_enc IS NULL", (shard,)
            ).rowcount
