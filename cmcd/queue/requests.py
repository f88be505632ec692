"""API requests sent with an Idempotency-Key: the key and the response, kept in the spool with the
messages, and claimed in the store so every worker process knows which shard runs a key.

The key is committed in the same transaction as the messages the request queued (Spool.commit_all),
so a retried request that reaches the same process finds either both or neither: it is never
queued twice, and a crash cannot keep the key without its messages or the messages without their
key. The functions taking a connection are the spool's SQL; Spool runs them.

Worker processes share no spool, so a retry that reaches another worker asks the store
(cmcd/store/request_store.py, whose claim_rule() is the rule): Idempotency.begin() claims the key
for this shard before anything is queued, in one short store transaction. A key another worker
has answered is answered from the store; one it is running now gets BUSY. A key this shard holds
goes on as it always did: the spool says whether it was committed. After the spool commit,
answered() writes the response into the store row; refused() lets the claim go. A worker that
died between its spool commit and answered() left a claim without a response: reconcile(), run at
its next start before it serves, copies its spool's responses into the store and drops the claims
of requests that never committed. Never decides what a request means (api/).
"""

from __future__ import annotations

import enum
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cmcd.errors import StoreError
from cmcd.store import AsyncStore
from cmcd.store.request_store import ClaimOutcome, SpoolRequest

if TYPE_CHECKING:  # spool.py imports this module for its SQL
    from cmcd.queue.spool import Spool

log = logging.getLogger("cmcd.api")

#: spool rows copied to the store per store transaction by reconcile()
RECONCILE_BATCH = 500


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


# -- the spool's SQL ---------------------------------------------------------------------------


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


def page(conn: sqlite3.Connection, since: float, after: int, limit: int) -> tuple[int, list[SpoolRequest]]:
    """Up to LIMIT requests committed since SINCE, past row AFTER in row order: (the last row read,
    or AFTER when none; the requests as the store's reconcile takes them)."""
    rows = conn.execute(
        "SELECT rowid, tenant_id, key, request_hash, status, response, created FROM api_requests "
        "WHERE rowid > ? AND created >= ? ORDER BY rowid LIMIT ?",
        (after, since, limit),
    ).fetchall()
    out = [(int(r[1]), str(r[2]), bytes(r[3]), int(r[4]), str(r[5]), float(r[6])) for r in rows]
    return (int(rows[-1][0]) if rows else after), out


# -- across worker processes: the store's claims -----------------------------------------------


class Action(enum.Enum):
    GO = "go"  # queue the request: this shard holds the key's claim
    REPLAY = "replay"  # answer the stored response (Verdict.status, .response)
    REUSED = "reused"  # the key names a different request: refuse
    BUSY = "busy"  # the request with this key is running (here or in another worker): retry later
    UNAVAILABLE = "unavailable"  # the store could not be asked: retry later


@dataclass(frozen=True)
class Verdict:
    action: Action
    status: int = 0
    response: str = ""


class Idempotency:
    """The Idempotency-Keys of one process, which owns spool shard SHARD of WORKERS: the keys it
    runs now (in memory) and its claims in the store. TTL_S gives [api] idempotency_ttl (it may
    change on reload); CLOCK the time."""

    def __init__(
        self,
        spool: Spool,
        astore: AsyncStore,
        shard: int,
        workers: int,
        ttl_s: Callable[[], float],
        clock: Callable[[], float],
    ) -> None:
        self.spool, self.astore, self.shard, self.workers = spool, astore, shard, workers
        self.ttl_s, self.clock = ttl_s, clock
        self._running: set[tuple[int, str]] = set()

    async def begin(self, tenant_id: int, key: str, request_hash: bytes) -> Verdict:
        """What to do with TENANT_ID's request REQUEST_HASH sent with KEY. After GO the caller ends
        it with answered() or refused() (or forget(), cancelled)."""
        slot = (tenant_id, key)
        if slot in self._running:  # taken before any await: no second request slips in between
            return Verdict(Action.BUSY)
        self._running.add(slot)
        verdict = Verdict(Action.BUSY)
        try:
            verdict = await self._claim(tenant_id, key, request_hash)
        finally:
            if verdict.action is not Action.GO:
                self._running.discard(slot)
        return verdict

    async def _claim(self, tenant_id: int, key: str, request_hash: bytes) -> Verdict:
        now = self.clock()
        since = now - self.ttl_s()
        store = self.astore.store
        try:
            claim = await self.astore.call(
                store.idempotency_claim, tenant_id, key, request_hash, self.shard, self.workers, now, since
            )
        except (sqlite3.Error, StoreError) as exc:
            log.warning("event=idempotency_claim_failed tenant_id=%d error=%r", tenant_id, str(exc))
            return Verdict(Action.UNAVAILABLE)
        if claim.outcome is ClaimOutcome.BUSY:
            return Verdict(Action.BUSY)
        if claim.outcome is ClaimOutcome.ANSWERED and not claim.same_request:
            return Verdict(Action.REUSED)
        if claim.outcome is ClaimOutcome.ANSWERED:
            return Verdict(Action.REPLAY, claim.status, claim.response)
        found = await self.spool.find_request(tenant_id, key, since)  # this shard's: the spool knows
        if found is None:
            return Verdict(Action.GO)
        # committed here, but the store was not told (answered() failed, or a request cancelled)
        await self._record(tenant_id, key, found.request_hash, found.status, found.response)
        if found.request_hash != request_hash:
            return Verdict(Action.REUSED)
        return Verdict(Action.REPLAY, found.status, found.response)

    async def answered(self, tenant_id: int, key: str, request_hash: bytes, status: int, response: str) -> None:
        """The request is committed with its messages and answered STATUS, RESPONSE: into the store,
        for the other workers. A store that cannot take it now leaves the claim unanswered (the
        other workers answer BUSY) until this worker sees the key again or restarts."""
        try:
            await self._record(tenant_id, key, request_hash, status, response)
        finally:
            self._running.discard((tenant_id, key))

    async def refused(self, tenant_id: int, key: str) -> None:
        """The request was refused and nothing of it committed: the claim goes, a retry may run anywhere."""
        try:
            await self.astore.call(self.astore.store.idempotency_release, tenant_id, key, self.shard)
        except (sqlite3.Error, StoreError) as exc:  # the claim stays: released at this worker's next start
            log.warning("event=idempotency_release_failed tenant_id=%d error=%r", tenant_id, str(exc))
        finally:
            self._running.discard((tenant_id, key))

    def forget(self, tenant_id: int, key: str) -> None:
        """The request was cancelled and may or may not have committed: only this process forgets
        it runs; the store's claim is settled by the next begin() here or the next start."""
        self._running.discard((tenant_id, key))

    async def _record(self, tenant_id: int, key: str, request_hash: bytes, status: int, response: str) -> None:
        try:
            await self.astore.call(
                self.astore.store.idempotency_answer, tenant_id, key, request_hash, self.shard, status, response,
                self.clock(),
            )  # fmt: skip
        except (sqlite3.Error, StoreError) as exc:
            log.warning("event=idempotency_answer_failed tenant_id=%d error=%r", tenant_id, str(exc))


async def reconcile(spool: Spool, astore: AsyncStore, shard: int, now: float, ttl_s: float) -> tuple[int, int]:
    """At the start of the process owning SHARD, before it serves: the responses of the requests
    its spool committed within TTL_S that the store lacks are copied into it, then the shard's
    claims still without a response (requests that never committed) go. Returns (rows written,
    claims dropped)."""
    written, after = 0, 0
    while True:
        after, rows = await spool.requests_page(now - ttl_s, after, RECONCILE_BATCH)
        if not rows:
            break
        written += await astore.call(astore.store.idempotency_reconcile, shard, rows)
    dropped = await astore.call(astore.store.idempotency_forget_unanswered, shard)
    return written, dropped
