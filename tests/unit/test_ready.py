"""The per-site ready queue as tables on a fake clock: window, room, dead sites and their backoff, rates, joining."""

from __future__ import annotations

import pytest

from cmcd import policy
from cmcd.deliver.ready import ReadyQueue
from cmcd.deliver.routing import Host, Route
from cmcd.queue.work import Due, Job

ROUTE = Route("mx.dst.test", ((Host("mx.dst.test", ("192.0.2.1",), 25),),))
REFUSED = policy.network_fault("connect to mx.dst.test[192.0.2.1]:25: Connection refused")
T0 = 1000.0  # monotonic seconds; never 0.0, which a ready queue reads as "not dead"


def site(
    limit: int = 10,
    initial: int = 3,
    *,
    message_rate: tuple[float, float] = (0.0, 0.0),
    connect_rate: float = 0.0,
    now: float = T0,
) -> ReadyQueue:
    return ReadyQueue.new(
        "mx.dst.test", ROUTE, limit=limit, initial_concurrency=initial,
        message_rate=message_rate, connect_rate_per_s=connect_rate, now=now,
    )  # fmt: skip


def job(queue_id: str, recipients: int = 1, domain: str = "dst.test") -> Job:
    dues = [Due(i, f"r{i}@{domain}", 0) for i in range(recipients)]
    return Job(queue_id, 1, "alice@acme.test", domain, T0, 100, "<m@acme.test>", dues)


# -- the window --------------------------------------------------------------------------------

# (limit, initial_concurrency, events, window after them); "ok" a delivered transaction, "fail" a
# failed session while another connection is still open (so the site never dies here)
WINDOW_CASES = {
    "starts-at-initial-concurrency": (10, 3, [], 3.0),
    "initial-is-capped-at-the-limit": (2, 5, [], 2.0),
    "rises-by-one-per-delivery": (10, 3, ["ok", "ok"], 5.0),
    "rise-stops-at-the-limit": (4, 3, ["ok", "ok", "ok"], 4.0),
    "falls-by-one-per-failed-session": (10, 3, ["fail"], 2.0),
    "falls-below-zero-while-others-are-open": (10, 1, ["fail", "fail"], -1.0),
    "rises-again-after-a-failure": (10, 3, ["fail", "fail", "ok"], 2.0),
}


@pytest.mark.parametrize(("limit", "initial", "events", "window"), list(WINDOW_CASES.values()), ids=list(WINDOW_CASES))
def test_window(limit: int, initial: int, events: list[str], window: float) -> None:
    s = site(limit, initial)
    s.active = 2
    for event in events:
        if event == "ok":
            s.succeeded()
        else:
            assert s.failed(REFUSED, T0, 60.0) is None
    assert s.window == window
    assert s.delivered == events.count("ok")
    assert not s.dead(T0)


# (limit, window, active connections, room for more)
ROOM_CASES = {
    "window-below-limit": (10, 3.0, 0, 3),
    "limit-below-window": (2, 5.0, 0, 2),
    "open-connections-count-against-it": (10, 3.0, 2, 1),
    "full": (10, 3.0, 3, 0),
    "a-fraction-rounds-down": (10, 2.9, 0, 2),
    "one-connection-even-at-window-zero": (10, 0.0, 0, 1),
    "over-full-after-the-limit-was-lowered": (2, 5.0, 4, -2),
}


@pytest.mark.parametrize(("limit", "window", "active", "room"), list(ROOM_CASES.values()), ids=list(ROOM_CASES))
def test_room(limit: int, window: float, active: int, room: int) -> None:
    s = site(limit)
    s.window, s.active = window, active
    assert s.room() == room


# (queued jobs, connections starting, window, active connections, whether to open one more)
WANTS_CASES = {
    "a-job-and-room": (1, 0, 3.0, 0, True),
    "no-job": (0, 0, 3.0, 0, False),
    "the-job-has-a-connection-on-its-way": (1, 1, 3.0, 1, False),
    "more-jobs-than-starting-connections": (3, 1, 3.0, 1, True),
    "no-room": (5, 0, 3.0, 3, False),
}


@pytest.mark.parametrize(
    ("queued", "starting", "window", "active", "wants"), list(WANTS_CASES.values()), ids=list(WANTS_CASES)
)
def test_wants_connection(queued: int, starting: int, window: float, active: int, wants: bool) -> None:
    s = site()
    for i in range(queued):
        s.push(job(f"q{i}"), join=True, max_recipients=50)
    s.window, s.active, s.starting = window, active, starting
    assert s.wants_connection() is wants


def test_opening_and_opened() -> None:
    s = site(limit=2, initial=2)
    s.opening()
    assert (s.active, s.starting) == (1, 1)
    s.window = 5.0  # raised before the limit was lowered by a reload
    s.opened(False)  # a failed connection leaves the window to failed()
    assert (s.starting, s.window) == (0, 5.0)
    s.opening()
    s.opened(True)  # a ready one brings the window back under the limit
    assert (s.active, s.starting, s.window) == (2, 0, 2.0)
    s.closed()
    assert s.active == 1


# -- dead sites ---------------------------------------------------------------------------------

# (initial window, other connections open, backoff_s, steps); each step is
# ("fail", now, expected dead-until or None), ("admit", now, expected admit and window after it),
# ("dead", now, expected) or ("revive", now, None)
DEAD_CASES = {
    "dead-when-the-last-connection-fails": (
        1, 0, 60.0, [("fail", T0, T0 + 60), ("dead", T0, True), ("admit", T0 + 59.9, (False, 0.0))]
    ),
    "alive-again-after-the-backoff-with-one-probe": (
        1, 0, 60.0, [("fail", T0, T0 + 60), ("admit", T0 + 60, (True, 1.0)), ("dead", T0 + 60, False)]
    ),
    "each-failure-steps-down-first": (
        3, 0, 60.0,
        [("fail", T0, None), ("fail", T0 + 1, None), ("dead", T0 + 1, False), ("fail", T0 + 2, T0 + 62)],
    ),
    "not-dead-while-another-connection-is-open": (
        1, 1, 60.0, [("fail", T0, None), ("dead", T0, False), ("admit", T0, (True, 0.0))]
    ),
    "dies-when-the-other-connection-fails-too": (
        1, 1, 60.0, [("fail", T0, None), ("close", T0, None), ("fail", T0 + 1, T0 + 61)]
    ),
    "a-probe-that-fails-kills-it-again": (
        1, 0, 60.0, [("fail", T0, T0 + 60), ("admit", T0 + 60, (True, 1.0)), ("fail", T0 + 61, T0 + 121)]
    ),
    "backoff-zero-declares-and-revives-at-once": (
        1, 0, 0.0, [("fail", T0, T0), ("dead", T0, False), ("admit", T0, (True, 1.0))]
    ),
    "an-operators-retry-revives-it": (
        1, 0, 60.0, [("fail", T0, T0 + 60), ("revive", T0 + 1, None), ("dead", T0 + 1, False), ("admit", T0 + 1, (True, 1.0))]
    ),
    "revive-leaves-a-live-site-alone": (3, 0, 60.0, [("revive", T0, None), ("admit", T0, (True, 3.0))]),
}  # fmt: skip


@pytest.mark.parametrize(("initial", "others", "backoff", "steps"), list(DEAD_CASES.values()), ids=list(DEAD_CASES))
def test_dead_site(initial: int, others: int, backoff: float, steps: list[tuple[str, float, object]]) -> None:
    s = site(10, initial)
    s.active = 1 + others  # the failing connection is open until failed() has judged it
    for i, (op, now, expected) in enumerate(steps):
        if op == "fail":
            got: object = s.failed(REFUSED, now, backoff)
        elif op == "admit":
            got = (s.admit(now), s.window)
        elif op == "dead":
            got = s.dead(now)
        elif op == "close":
            got = s.closed()
        else:
            got = s.revive()
        assert got == expected, f"step {i}: {op} at {now} = {got}, expected {expected}"
    if any(op == "fail" for op, _, _ in steps):
        assert s.last_failure == REFUSED


# -- rates ----------------------------------------------------------------------------------------

# (connect_rate_limit per second, steps of (now, seconds to wait: 0.0 = connect now))
CONNECT_CASES = {
    "burst-of-the-rate-then-one-per-interval": (
        5.0,
        [(T0, 0.0)] * 5 + [(T0, 0.2), (T0 + 0.1, 0.1), (T0 + 0.2, 0.0), (T0 + 0.2, 0.2)],
    ),
    "below-one-a-second-burst-is-one": (0.5, [(T0, 0.0), (T0, 2.0), (T0 + 1, 1.0), (T0 + 2, 0.0)]),
    "refill-capped-at-the-burst": (2.0, [(T0 + 100, 0.0), (T0 + 100, 0.0), (T0 + 100, 0.5)]),
    "zero-is-unlimited": (0.0, [(T0, 0.0)] * 20),
}


@pytest.mark.parametrize(("rate", "steps"), list(CONNECT_CASES.values()), ids=list(CONNECT_CASES))
def test_connect_rate(rate: float, steps: list[tuple[float, float]]) -> None:
    s = site(connect_rate=rate)
    for i, (now, wait) in enumerate(steps):
        assert s.connect_wait(now, rate) == pytest.approx(wait), f"step {i} at {now}"


def test_connect_rate_follows_a_reload() -> None:
    s = site(connect_rate=1.0)
    assert s.connect_wait(T0, 1.0) == 0.0
    assert s.connect_wait(T0, 1.0) == pytest.approx(1.0)
    assert s.connect_wait(T0 + 0.5, 4.0) == 0.0  # 0.5 s at the new rate of 4/s is two tokens


# (delivery.domains.*.rate as (messages, per seconds), steps of (now, seconds to wait))
MESSAGE_CASES = {
    "unlimited": ((0.0, 0.0), [(T0, 0.0)] * 20),
    "three-a-minute-burst-three": (
        (3.0, 60.0),
        [(T0, 0.0), (T0, 0.0), (T0, 0.0), (T0, 20.0), (T0 + 10, 10.0), (T0 + 20, 0.0)],
    ),
    "one-per-ten-seconds": ((1.0, 10.0), [(T0, 0.0), (T0, 10.0), (T0 + 5, 5.0), (T0 + 10, 0.0), (T0 + 10, 10.0)]),
    "fifty-a-second": ((50.0, 1.0), [(T0, 0.0)] * 50 + [(T0, 0.02)]),
}


@pytest.mark.parametrize(("rate", "steps"), list(MESSAGE_CASES.values()), ids=list(MESSAGE_CASES))
def test_message_rate(rate: tuple[float, float], steps: list[tuple[float, float]]) -> None:
    s = site(message_rate=rate)
    for i, (now, wait) in enumerate(steps):
        assert s.message_wait(now) == pytest.approx(wait), f"step {i} at {now}"


# -- joining the same message's jobs ------------------------------------------------------------

# (jobs pushed as (queue id, recipients, join), max_recipients, expected push results, recipients per queued job)
JOIN_CASES = {
    "same-message-joins": ([("q1", 2, True), ("q1", 1, True)], 10, [True, False], [3]),
    "join-stops-at-recipients-per-transaction": ([("q1", 2, True), ("q1", 1, True)], 2, [True, True], [2, 1]),
    "later-jobs-join-the-newest": (
        [("q1", 2, True), ("q1", 1, True), ("q1", 1, True)], 2, [True, True, False], [2, 2]
    ),
    "a-domain-with-its-own-policy-never-joins": ([("q1", 2, True), ("q1", 1, False)], 10, [True, True], [2, 1]),
    "other-messages-queue-apart": ([("q1", 1, True), ("q2", 1, True)], 10, [True, True], [1, 1]),
}  # fmt: skip


@pytest.mark.parametrize(("pushes", "max_rcpt", "results", "sizes"), list(JOIN_CASES.values()), ids=list(JOIN_CASES))
def test_join(pushes: list[tuple[str, int, bool]], max_rcpt: int, results: list[bool], sizes: list[int]) -> None:
    s = site()
    got = [s.push(job(qid, n), join=join, max_recipients=max_rcpt) for qid, n, join in pushes]
    assert got == results
    assert [len(j.recipients) for j in s.queue] == sizes


def test_a_job_taken_by_a_connection_is_joined_no_more() -> None:
    s = site()
    first = job("q1", 1)
    assert s.push(first, join=True, max_recipients=10)
    assert s.pop() is first
    assert s.open_jobs == {}
    assert s.push(job("q1", 1), join=True, max_recipients=10)
    assert len(first.recipients) == 1
