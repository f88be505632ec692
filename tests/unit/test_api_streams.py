"""The API's `stream` field as the message builder reads it (each endpoint's default, the values it
takes, a broadcast's one recipient, no X-Cmcd-Stream through `headers`), and the per-stream event
counts behind cmcd_stream_events; no I/O."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from cmcd.api.compose import ComposeError, compose_bulk, compose_one
from cmcd.stats import STREAM_EVENTS, StreamStats

NOW = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
MAX = 1_000_000


def one(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"from": "news@acme.test", "to": ["bob@example.test"], "subject": "Hi", "text": "hello"}
    return {k: v for k, v in (base | over).items() if v is not None}


def bulk(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "from": "news@acme.test",
        "subject": "Hi {{name}}",
        "text": "hello",
        "recipients": [
            {"to": "a@example.test", "merge": {"name": "A"}},
            {"to": "b@example.test", "merge": {"name": "B"}},
        ],
    }
    return {k: v for k, v in (base | over).items() if v is not None}


@pytest.mark.parametrize(
    ("stream", "expected"),
    [(None, "transactional"), ("transactional", "transactional"), ("broadcast", "broadcast")],
    ids=["default-transactional", "transactional", "broadcast-one-recipient"],
)
def test_one_message_stream(stream: str | None, expected: str) -> None:
    assert compose_one(one(stream=stream), max_size=MAX, now=NOW).stream == expected


@pytest.mark.parametrize(
    ("stream", "expected"),
    [(None, "broadcast"), ("broadcast", "broadcast"), ("transactional", "transactional")],
    ids=["default-broadcast", "broadcast", "transactional"],
)
def test_bulk_stream_is_every_message_s(stream: str | None, expected: str) -> None:
    messages = compose_bulk(bulk(stream=stream), max_size=MAX, now=NOW)
    assert [m.stream for m in messages] == [expected, expected]


@pytest.mark.parametrize(
    ("request_", "field", "words"),
    [
        (one(stream="newsletter"), "stream", "'newsletter' is not a stream"),
        (one(stream="Broadcast"), "stream", "expected one of transactional, broadcast"),
        (one(stream=1), "stream", "1 is not a stream"),
        (one(stream=""), "stream", "'' is not a stream"),
        (bulk(stream="marketing"), "stream", "'marketing' is not a stream"),
        (one(stream="broadcast", to=["a@example.test", "b@example.test"]), "to", "/v1/emails/bulk"),
        (one(stream="broadcast", cc=["c@example.test"]), "to", "one recipient"),
        (one(stream="broadcast", bcc=["c@example.test"]), "to", "one recipient"),
        (one(headers={"X-Cmcd-Stream": "broadcast"}), "headers.X-Cmcd-Stream", "the request's 'stream' field"),
        (one(headers={"x-cmcd-stream": "broadcast"}), "headers.x-cmcd-stream", "'stream' field"),
        (bulk(headers={"X-CMCD-STREAM": "transactional"}), "headers.X-CMCD-STREAM", "'stream' field"),
    ],
    ids=[
        "unknown-name", "case-matters", "not-a-string", "empty", "bulk-unknown", "broadcast-two-to",
        "broadcast-to-and-cc", "broadcast-to-and-bcc", "header-instead-of-field", "header-lower-case",
        "bulk-header",
    ],
)  # fmt: skip
def test_refused_with_the_field_named(request_: dict[str, Any], field: str, words: str) -> None:
    build = compose_bulk if "recipients" in request_ else compose_one
    with pytest.raises(ComposeError) as caught:
        build(request_, max_size=MAX, now=NOW)
    assert caught.value.field == field and words in caught.value.detail


def test_broadcast_to_one_address_written_twice_is_one_recipient() -> None:
    """to+cc+bcc are deduplicated case-insensitively before they are counted."""
    composed = compose_one(one(stream="broadcast", to=["bob@example.test"], cc=["BOB@example.test"]),
                           max_size=MAX, now=NOW)  # fmt: skip
    assert composed.rcpts == ["bob@example.test"] and composed.stream == "broadcast"


def test_transactional_keeps_many_recipients() -> None:
    composed = compose_one(one(to=["a@example.test", "b@example.test"], cc=["c@example.test"]), max_size=MAX, now=NOW)
    assert composed.stream == "transactional" and len(composed.rcpts) == 3


def test_stream_counts_take_known_streams_and_events_only() -> None:
    stats = StreamStats()
    assert set(stats.events) == {(s, e) for s in ("transactional", "broadcast") for e in STREAM_EVENTS}
    assert not any(stats.events.values())
    seen = [("broadcast", "accepted"), ("broadcast", "delivered"), ("broadcast", "accepted"),
            ("transactional", "bounced"), ("transactional", "deleted"), ("other", "accepted")]  # fmt: skip
    for stream, event in seen:
        stats.count(stream, event)
    assert {k: n for k, n in stats.events.items() if n} == {
        ("broadcast", "accepted"): 2,
        ("broadcast", "delivered"): 1,
        ("transactional", "bounced"): 1,
    }
