"""Idempotency-Keys of the tenant API across worker processes (SO_REUSEPORT spreads connections):
the same keyed POST /v1/emails on new connections, answered by both workers, queues one message
and gets one response; the key with another body is refused by both; concurrent retries on
several connections queue one message.

Which worker answered a keyed request is told by a probe sent just before it on the same
connection: the queue id of the probe's message names the worker's shard.
"""

from __future__ import annotations

import http.client
import json
import threading
from typing import Any

import pytest

from cmcd.queue.ids import shard_of
from tests.conftest import Cmcd

WORKERS = {"server": {"workers": 2}, "api": {"listen": "127.0.0.1:0"}}
BODY = {"from": "alice@acme.test", "to": ["once@dst.test"], "subject": "once", "text": "sent once"}
#: connections to open at most before both workers must have answered (each is one chance in two)
TRIES = 200


@pytest.fixture
def daemon(make_cmcd: Any) -> tuple[Cmcd, str]:
    d = make_cmcd(WORKERS)
    return d, str(d.admin("apikey.add", tenant="acme", login="alice")["token"])


def _post(conn: http.client.HTTPSConnection, token: str, body: Any, key: str | None) -> tuple[int, Any, Any]:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    conn.request("POST", "/v1/emails", json.dumps(body), headers)
    resp = conn.getresponse()
    return resp.status, resp.headers, json.loads(resp.read())


def _on_a_new_connection(d: Cmcd, token: str, body: Any, key: str, n: int) -> tuple[int, tuple[int, Any, Any]]:
    """The keyed request on a connection of its own: (the shard of the worker that answered it, its answer)."""
    conn = http.client.HTTPSConnection("127.0.0.1", d.api_port, context=d.client_context(), timeout=30)
    try:
        probe = dict(BODY, to=[f"probe-{n}@dst.test"], subject="probe")
        status, _, sent = _post(conn, token, probe, None)
        assert status == 202, sent
        sock = conn.sock
        answer = _post(conn, token, body, key)
        assert conn.sock is sock and sock is not None, "the keyed request must use the probe's connection"
    finally:
        conn.close()
    shard = shard_of(sent["id"])
    assert shard is not None
    return shard, answer


def _sent_to(d: Cmcd, address: str) -> list[str]:
    return [qid for qid, m in d.spooled().items() if any(r == address for r, _ in m["recipients"])]


def test_a_keyed_request_is_sent_once_whichever_worker_each_retry_reaches(daemon: tuple[Cmcd, str]) -> None:
    d, token = daemon
    key = "order-7781-confirmation"
    answers: list[tuple[int, tuple[int, Any, Any]]] = []
    for n in range(TRIES):
        answers.append(_on_a_new_connection(d, token, BODY, key, n))
        if len({shard for shard, _ in answers[1:]}) == 2:  # both answered a retry: one of them from the store
            break
    else:
        raise AssertionError(f"{TRIES} connections reached only workers {sorted({s for s, _ in answers})}")
    first = answers[0][1]
    assert first[0] == 202 and first[1].get("Idempotent-Replayed") is None, first
    for shard, (status, headers, reply) in answers[1:]:
        assert (status, reply) == (202, first[2]), shard
        assert headers.get("Idempotent-Replayed") == "true"
    assert _sent_to(d, "once@dst.test") == [first[2]["id"]]
    # the same key for a different request: refused by both workers, nothing queued
    refused: set[int] = set()
    for n in range(TRIES):
        shard, (status, _, problem) = _on_a_new_connection(d, token, dict(BODY, subject="twice"), key, TRIES + n)
        assert status == 422 and problem["type"].endswith("idempotency-key-reused"), problem
        refused.add(shard)
        if refused == {0, 1}:
            break
    assert refused == {0, 1}
    assert _sent_to(d, "once@dst.test") == [first[2]["id"]]


def test_concurrent_retries_on_many_connections_queue_one_message(daemon: tuple[Cmcd, str]) -> None:
    d, token = daemon
    body = dict(BODY, to=["race@dst.test"])
    headers = {"Idempotency-Key": "race-1"}
    answers: list[tuple[int, dict[str, str], Any]] = []
    start = threading.Barrier(8)

    def one() -> None:
        start.wait()
        answers.append(d.http("POST", "/v1/emails", body, token=token, headers=headers))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    accepted = [a for a in answers if a[0] == 202]
    running = [a for a in answers if a[0] != 202]
    assert accepted and len(accepted) + len(running) == 8
    assert len({json.dumps(a[2], sort_keys=True) for a in accepted}) == 1  # one response, replayed
    for status, got, problem in running:  # still running in this worker or the other: retry later
        assert status == 409 and problem["type"].endswith("in-progress"), problem
        assert got.get("Retry-After") == "1"
    assert _sent_to(d, "race@dst.test") == [accepted[0][2]["id"]]
    again = d.http("POST", "/v1/emails", body, token=token, headers=headers)
    assert (again[0], again[2]) == (202, accepted[0][2])
