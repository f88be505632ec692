"""The spool's named operations with no daemon: claim_due and apply_results (delivered, deferred, bounced,
the body erased with the last final recipient, outbox rows in the same transaction), idempotency keys."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from cmcd.crypto import DataKeys
from cmcd.errors import NotFound, SpoolError
from cmcd.queue.ids import QueueIdGenerator
from cmcd.queue.requests import ApiRequest
from cmcd.queue.spool import Spool
from cmcd.queue.work import ApplyReport, Job, Result
from cmcd.records import Recipient, RecipientState, SpoolMessage

T0 = 1_794_999_600.0
HOST = "mail.example.test"
BODY = b"From: a@acme.test\r\nTo: r@dst.test\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    s = Spool(tmp_path / "spool", DataKeys(os.urandom(32), os.urandom(32)))
    s.start()
    try:
        yield s
    finally:
        s.stop()


def _rows(spool: Spool, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{spool.path}?mode=ro", uri=True)
    try:
        return [tuple(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()


def _message(ids: QueueIdGenerator, *rcpts: str, sender: str = "a@acme.test", at: float = T0) -> SpoolMessage:
    qid = ids.next(at)
    return SpoolMessage(
        queue_id=qid,
        tenant_id=1,
        user_id=1,
        sender=sender,
        recipients=tuple(Recipient(r, r.rpartition("@")[2]) for r in rcpts),
        body=BODY,
        received_ts=at,
        message_id=f"<{qid}@acme.test>",
    )


async def _queued(spool: Spool, *messages: SpoolMessage) -> None:
    for m in messages:
        await spool.commit(m, "2026-11-18")


def _states(spool: Spool) -> dict[str, str]:
    return {
        qid + ":" + str(rid): state for rid, qid, state in _rows(spool, "SELECT id, queue_id, state FROM recipients")
    }


def _events(spool: Spool) -> list[tuple[str, str]]:
    return [(e, s) for e, s in _rows(spool, "SELECT event, status FROM events ORDER BY id") if e != "accepted"]


async def _apply(
    spool: Spool, ids: QueueIdGenerator, results: list[Result] | Callable[[], list[Result]], now: float = T0 + 60
) -> ApplyReport:
    return await spool.apply_results(results, clock=lambda: now, hostname=HOST, ids=ids, mono=lambda: 42.0)


def _result(job: Job, state: RecipientState, n: int = 0, **kw: Any) -> Result:
    return Result(job, job.recipients[n], state, kw.pop("response", f"250 2.0.0 {state}"), **kw)


# -- claim_due ---------------------------------------------------------------------------------


async def test_claim_due_takes_what_is_due_by_message_and_domain_and_marks_it_inflight(spool: Spool) -> None:
    ids = QueueIdGenerator()
    early = _message(ids, "r1@dst.test", "r2@dst.test", "r3@other.test")
    late = _message(ids, "r4@dst.test", at=T0 + 100)
    await _queued(spool, early, late)
    assert await spool.next_due() == T0
    jobs = await spool.claim_due(T0 + 10, limit=100)
    assert sorted((j.queue_id, j.domain, [d.address for d in j.recipients]) for j in jobs) == [
        (early.queue_id, "dst.test", ["r1@dst.test", "r2@dst.test"]),
        (early.queue_id, "other.test", ["r3@other.test"]),
    ]
    assert all(j.sender == "a@acme.test" and j.body == BODY and j.recipients[0].attempts == 0 for j in jobs)
    assert sorted(_states(spool).values()) == ["inflight", "inflight", "inflight", "queued"]
    assert await spool.claim_due(T0 + 10, limit=100) == []  # inflight is not claimed twice
    assert await spool.next_due() == T0 + 100
    assert [j.queue_id for j in await spool.claim_due(T0 + 100, limit=100)] == [late.queue_id]


async def test_claim_due_takes_at_most_limit_recipients(spool: Spool) -> None:
    ids = QueueIdGenerator()
    await _queued(spool, _message(ids, "r1@dst.test", "r2@dst.test", "r3@dst.test"))
    first = await spool.claim_due(T0, limit=2)
    assert sum(len(j.recipients) for j in first) == 2
    rest = await spool.claim_due(T0, limit=2)
    assert sum(len(j.recipients) for j in rest) == 1


async def test_recover_puts_inflight_back_to_queued(tmp_path: Path) -> None:
    keys = DataKeys(os.urandom(32), os.urandom(32))
    s = Spool(tmp_path / "spool", keys)
    s.start()
    await _queued(s, _message(QueueIdGenerator(), "r1@dst.test", "r2@dst.test"))
    await s.claim_due(T0, limit=1)
    s.stop()
    s = Spool(tmp_path / "spool", keys)
    try:
        assert s.recover().inflight_requeued == 1
        assert sorted(_states(s).values()) == ["queued", "queued"]
    finally:
        s.stop()


# -- apply_results -----------------------------------------------------------------------------


async def test_delivered_to_every_recipient_erases_the_message_with_its_events_in_one_commit(spool: Spool) -> None:
    ids = QueueIdGenerator()
    m = _message(ids, "r1@dst.test", "r2@dst.test")
    await _queued(spool, m)
    (job,) = await spool.claim_due(T0, limit=10)
    report = await _apply(spool, ids, [_result(job, RecipientState.DELIVERED, n, mx="mx.dst.test") for n in (0, 1)])
    assert (report.recorded, report.finished, report.bounces) == (2, 1, 0)
    assert report.committed_at == 42.0 and len(report.results) == 2
    assert _rows(spool, "SELECT COUNT(*) FROM messages") == [(0,)]
    assert _rows(spool, "SELECT COUNT(*) FROM recipients") == [(0,)]
    assert _events(spool) == [("delivered", "delivered"), ("delivered", "delivered")]
    assert await spool.read_body(m.queue_id) is None


async def test_deferred_keeps_the_message_and_sets_the_next_attempt(spool: Spool) -> None:
    ids = QueueIdGenerator()
    m = _message(ids, "r1@dst.test", "r2@dst.test")
    await _queued(spool, m)
    (job,) = await spool.claim_due(T0, limit=10)
    report = await _apply(
        spool,
        ids,
        [
            _result(job, RecipientState.DELIVERED, 0),
            _result(job, RecipientState.DEFERRED, 1, response="451 4.3.0 later", next_attempt=T0 + 600),
        ],
    )
    assert (report.recorded, report.finished, report.bounces) == (2, 0, 0)
    assert _rows(spool, "SELECT state, attempts, next_attempt FROM recipients ORDER BY id") == [
        ("delivered", 1, T0),
        ("deferred", 1, T0 + 600),
    ]
    assert await spool.read_body(m.queue_id) == BODY
    assert (await spool.show(m.queue_id))["recipients"][1]["last_response"] == "451 4.3.0 later"
    assert await spool.next_due() == T0 + 600
    # the deferred recipient, delivered at its next attempt, was the last: the body goes
    (again,) = await spool.claim_due(T0 + 600, limit=10)
    assert again.recipients[0].attempts == 1
    report = await _apply(spool, ids, [_result(again, RecipientState.DELIVERED)])
    assert report.finished == 1 and await spool.read_body(m.queue_id) is None
    assert _events(spool) == [("delivered", "delivered"), ("deferred", "deferred"), ("delivered", "delivered")]


async def test_a_deferral_of_a_held_message_holds_the_recipient(spool: Spool) -> None:
    ids = QueueIdGenerator()
    m = _message(ids, "r1@dst.test")
    await _queued(spool, m)
    (job,) = await spool.claim_due(T0, limit=10)
    assert await spool.hold(queue_id=m.queue_id) == 0  # the inflight attempt goes on
    await _apply(spool, ids, [_result(job, RecipientState.DEFERRED, next_attempt=T0 + 60)])
    assert list(_states(spool).values()) == ["held"]
    assert await spool.release(T0 + 1, queue_id=m.queue_id) == 1
    assert list(_states(spool).values()) == ["queued"]


async def test_bounced_queues_one_dsn_to_the_sender_and_erases_the_original(spool: Spool) -> None:
    ids = QueueIdGenerator()
    m = _message(ids, "r1@dst.test", "r2@dst.test")
    await _queued(spool, m)
    (job,) = await spool.claim_due(T0, limit=10)
    bounced = [_result(job, RecipientState.BOUNCED, n, response="550 5.1.1 no such user") for n in (0, 1)]
    report = await _apply(spool, ids, bounced)
    assert (report.recorded, report.finished, report.bounces) == (2, 1, 1)
    ((qid, sender_enc),) = _rows(spool, "SELECT queue_id, sender_enc FROM messages")
    assert qid != m.queue_id and spool.keys.decrypt(sender_enc) == ""
    dsn = (await spool.show(qid))["recipients"]
    assert [(r["address"], r["state"]) for r in dsn] == [("a@acme.test", "queued")]
    assert b"no such user" in (await spool.read_body(qid) or b"")
    assert _events(spool) == [("bounced", "bounced"), ("bounced", "bounced")]


async def test_a_bounce_of_a_bounce_is_dropped_not_reported(spool: Spool) -> None:
    ids = QueueIdGenerator()
    m = _message(ids, "a@acme.test", sender="")
    await _queued(spool, m)
    (job,) = await spool.claim_due(T0, limit=10)
    report = await _apply(spool, ids, [_result(job, RecipientState.BOUNCED, response="550 5.1.1 gone")])
    assert (report.finished, report.bounces) == (1, 0)
    assert _rows(spool, "SELECT COUNT(*) FROM messages") == [(0,)]


async def test_the_outcome_its_events_and_bounce_are_one_transaction(spool: Spool) -> None:
    class FailingIds(QueueIdGenerator):  # the DSN's queue id is made after the outcome and its event
        def next(self, now_s: float | None = None) -> str:
            raise OSError("no queue id")

    ids = QueueIdGenerator()
    m = _message(ids, "r1@dst.test")
    await _queued(spool, m)
    (job,) = await spool.claim_due(T0, limit=10)
    with pytest.raises(OSError):
        await _apply(spool, FailingIds(), [_result(job, RecipientState.BOUNCED, response="550 5.1.1 gone")])
    assert list(_states(spool).values()) == ["inflight"]  # rolled back: nothing of it happened
    assert _events(spool) == []
    report = await _apply(spool, ids, [_result(job, RecipientState.BOUNCED, response="550 5.1.1 gone")])
    assert (report.recorded, report.bounces) == (1, 1)


async def test_a_result_for_a_message_deleted_meanwhile_is_not_recorded(spool: Spool) -> None:
    ids = QueueIdGenerator()
    m = _message(ids, "r1@dst.test")
    await _queued(spool, m)
    (job,) = await spool.claim_due(T0, limit=10)
    assert await spool.delete(T0 + 1, m.queue_id) == 1
    report = await _apply(spool, ids, [_result(job, RecipientState.DELIVERED)])
    assert (report.recorded, report.finished) == (0, 0)
    assert _events(spool) == [("deleted-by-operator", "deleted")]
    with pytest.raises(NotFound):
        await spool.show(m.queue_id)


async def test_results_given_as_a_function_are_taken_on_the_writer_thread(spool: Spool) -> None:
    ids = QueueIdGenerator()
    await _queued(spool, _message(ids, "r1@dst.test"))
    (job,) = await spool.claim_due(T0, limit=10)
    pending = [_result(job, RecipientState.SUPPRESSED, response="5.7.1 suppressed")]

    def take() -> list[Result]:
        taken, pending[:] = list(pending), []
        return taken

    report = await _apply(spool, ids, take)
    assert report.recorded == 1 and report.results[0].state is RecipientState.SUPPRESSED
    assert _events(spool) == [("suppressed", "suppressed")]
    empty = await _apply(spool, ids, take)
    assert (empty.recorded, empty.results) == (0, ())


# -- idempotency keys --------------------------------------------------------------------------


async def test_an_idempotency_key_is_committed_with_its_messages_or_not_at_all(spool: Spool) -> None:
    ids = QueueIdGenerator()
    request = ApiRequest(1, "order-1", b"h" * 32, 202, '{"id": "x"}')
    assert await spool.find_request(1, "order-1", since=0.0) is None
    await spool.commit_all([_message(ids, "r1@dst.test")], "2026-11-18", request, forget_before=0.0)
    found = await spool.find_request(1, "order-1", since=0.0)
    assert found is not None and (found.request_hash, found.status, found.response) == (b"h" * 32, 202, '{"id": "x"}')
    assert await spool.find_request(2, "order-1", since=0.0) is None  # keys are per tenant
    twice = [_message(ids, "r2@dst.test")]
    with pytest.raises(SpoolError):  # the same key again: neither the key nor the message is written
        await spool.commit_all(twice, "2026-11-18", request, forget_before=0.0)
    assert await spool.read_body(twice[0].queue_id) is None
    assert _rows(spool, "SELECT COUNT(*) FROM messages") == [(1,)]
