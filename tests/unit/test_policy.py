"""Pure policy tables: DATA line endings and NUL, dot-unstuffing, slow clients, windows and token buckets on a fake clock."""

from __future__ import annotations

import pytest

from cmcd import policy

BARE = "550 5.6.0 Message contains a bare CR or LF; lines must end with CRLF"
NUL = "550 5.6.0 Message contains a NUL character"


# -- check_data --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "mode", "body", "problem"),
    [
        (b"a\r\nb\r\n", "normalize", b"a\r\nb\r\n", ""),
        (b"a\r\nb\r\n", "reject", b"a\r\nb\r\n", ""),
        (b"", "reject", b"", ""),
        (b"\r\n\r\n", "reject", b"\r\n\r\n", ""),
        (b"a\nb\r\n", "normalize", b"a\r\nb\r\n", ""),
        (b"a\nb\r\n", "reject", None, BARE),
        (b"a\rb\r\n", "normalize", b"a\r\nb\r\n", ""),
        (b"a\rb\r\n", "reject", None, BARE),
        (b"a\n", "normalize", b"a\r\n", ""),
        (b"a\r", "normalize", b"a\r\n", ""),
        (b"a\r\r\nb\r\n", "normalize", b"a\r\n\r\nb\r\n", ""),
        (b"a\n\rb\r\n", "normalize", b"a\r\n\r\nb\r\n", ""),
        (b"x\r\n.\nmore\r\n", "normalize", b"x\r\n.\r\nmore\r\n", ""),
        (b"x\n.\r\nmore\r\n", "reject", None, BARE),
        (b"a\x00b\r\n", "normalize", None, NUL),
        (b"a\x00b\r\n", "reject", None, NUL),
        (b"a\x00\nb", "reject", None, NUL),
    ],
    ids=[
        "crlf-only-normalize",
        "crlf-only-reject",
        "empty",
        "blank-lines",
        "bare-lf-normalized",
        "bare-lf-rejected",
        "bare-cr-normalized",
        "bare-cr-rejected",
        "trailing-bare-lf",
        "trailing-bare-cr",
        "cr-cr-lf",
        "lf-cr",
        "dot-line-with-bare-lf-normalized",
        "smuggled-dot-rejected",
        "nul-normalize",
        "nul-reject",
        "nul-wins-over-bare-lf",
    ],
)
def test_check_data(raw: bytes, mode: str, body: bytes | None, problem: str) -> None:
    assert policy.check_data(raw, mode) == policy.DataVerdict(body, problem)


# -- unstuff -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", b""),
        (b"plain\r\n", b"plain\r\n"),
        (b"..first\r\n", b".first\r\n"),
        (b"a\r\n..b\r\n", b"a\r\n.b\r\n"),
        (b"a\r\n..\r\n", b"a\r\n.\r\n"),
        (b"a\r\n...\r\n", b"a\r\n..\r\n"),
        (b"..\r\n..\r\n..x\r\n", b".\r\n.\r\n.x\r\n"),
        (b"a..b\r\n", b"a..b\r\n"),
        (b"a\r\nb..\r\n", b"a\r\nb..\r\n"),
    ],
    ids=[
        "empty",
        "nothing-to-undo",
        "first-line",
        "later-line",
        "lone-dot-line",
        "three-dots",
        "consecutive-lines",
        "dots-mid-line",
        "dots-at-line-end",
    ],
)
def test_unstuff(raw: bytes, expected: bytes) -> None:
    assert policy.unstuff(raw) == expected


# -- too_slow ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("received", "elapsed", "min_rate", "grace", "expected"),
    [
        (0, 10.0, 1024, 10.0, False),
        (0, 10.001, 1024, 10.0, True),
        (11 * 1024 - 1, 11.0, 1024, 10.0, True),
        (11 * 1024, 11.0, 1024, 10.0, False),
        (0, 1000.0, 0, 10.0, False),
        (0, 1000.0, -5, 10.0, False),
        (5, 0.5, 1024, 0.0, True),
    ],
    ids=[
        "within-grace",
        "just-past-grace",
        "one-byte-short",
        "exactly-the-rate",
        "rate-zero-disables",
        "negative-rate-disables",
        "no-grace",
    ],
)
def test_too_slow(received: int, elapsed: float, min_rate: float, grace: float, expected: bool) -> None:
    assert policy.too_slow(received, elapsed, min_rate, grace) is expected


# -- over_daily_quota --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "limit", "expected"),
    [(0, 3, False), (2, 3, False), (3, 3, True), (4, 3, True), (10**6, 0, False)],
    ids=["none-sent", "below", "at-limit", "above", "zero-is-unlimited"],
)
def test_over_daily_quota(sent: int, limit: int, expected: bool) -> None:
    assert policy.over_daily_quota(sent, limit) is expected


# -- SlidingWindow -----------------------------------------------------------------------------

# Each step: ("add" | "count", key, now, expected result)
WINDOW_CASES = {
    "counts-within-window": [("add", "ip", 0.0, 1), ("add", "ip", 5.0, 2), ("count", "ip", 9.9, 2)],
    "event-leaves-at-exactly-window": [("add", "ip", 0.0, 1), ("add", "ip", 5.0, 2), ("count", "ip", 10.0, 1)],
    "all-expired": [("add", "ip", 0.0, 1), ("add", "ip", 5.0, 2), ("count", "ip", 15.0, 0)],
    "keys-are-separate": [("add", "a", 0.0, 1), ("add", "a", 1.0, 2), ("add", "b", 1.0, 1), ("count", "a", 2.0, 2)],
    "add-after-expiry-restarts": [("add", "ip", 0.0, 1), ("add", "ip", 20.0, 1), ("count", "ip", 21.0, 1)],
    "unknown-key-is-zero": [("count", "nobody", 100.0, 0)],
}


@pytest.mark.parametrize("steps", list(WINDOW_CASES.values()), ids=list(WINDOW_CASES))
def test_sliding_window(steps: list[tuple[str, str, float, int]]) -> None:
    window = policy.SlidingWindow(window_s=10.0)
    for i, (op, key, now, expected) in enumerate(steps):
        got = window.add(key, now) if op == "add" else window.count(key, now)
        assert got == expected, f"step {i}: {op}({key!r}, {now}) = {got}, expected {expected}"


def test_sliding_window_bounds_its_keys() -> None:
    window = policy.SlidingWindow(window_s=10.0, max_keys=2)
    window.add("a", 0.0)
    window.add("b", 0.0)
    window.add("c", 0.0)  # forgets the oldest key, "a"
    assert window.count("c", 1.0) == 1
    assert len(window._events) <= 2
    assert window.count("a", 1.0) == 0


# -- TokenBucket -------------------------------------------------------------------------------

# Each step: (now, expected result of take) for one key at the case's rate
BUCKET_CASES = {
    "rate-2-burst-2": (2.0, [(0.0, True), (0.0, True), (0.0, False), (0.5, True), (0.5, False), (1.5, True)]),
    "rate-1-one-per-second": (1.0, [(0.0, True), (0.5, False), (1.0, True), (1.99, False), (2.0, True)]),
    "rate-half-burst-1": (0.5, [(0.0, True), (1.0, False), (2.0, True), (3.0, False), (4.0, True)]),
    "refill-capped-at-burst": (2.0, [(0.0, True), (100.0, True), (100.0, True), (100.0, False)]),
    "zero-is-unlimited": (0.0, [(0.0, True)] * 50),
    "negative-is-unlimited": (-1.0, [(0.0, True)] * 5),
}


@pytest.mark.parametrize(("rate", "steps"), list(BUCKET_CASES.values()), ids=list(BUCKET_CASES))
def test_token_bucket(rate: float, steps: list[tuple[float, bool]]) -> None:
    bucket = policy.TokenBucket()
    for i, (now, expected) in enumerate(steps):
        assert bucket.take("acme", rate, now) is expected, f"step {i} at t={now}"


def test_token_bucket_keys_are_separate() -> None:
    bucket = policy.TokenBucket()
    assert bucket.take(1, 1.0, 0.0) is True
    assert bucket.take(1, 1.0, 0.0) is False
    assert bucket.take(2, 1.0, 0.0) is True


# (steps of (now, n)) for one key at 2 a second: whether charge admits a request of N messages
CHARGE_CASES = {
    "within-the-burst": [(0.0, 2, True), (1.0, 2, True)],
    "one-token-admits-a-big-request": [(0.0, 10, True), (0.0, 1, False)],
    "debt-is-paid-at-the-rate": [(0.0, 10, True), (4.0, 1, False), (4.5, 1, True)],
    "zero-messages-are-free": [(0.0, 2, True), (0.0, 0, True), (0.0, 1, False)],
}


@pytest.mark.parametrize("steps", list(CHARGE_CASES.values()), ids=list(CHARGE_CASES))
def test_token_bucket_charge(steps: list[tuple[float, int, bool]]) -> None:
    bucket = policy.TokenBucket()
    for i, (now, n, expected) in enumerate(steps):
        assert bucket.charge("acme", 2.0, now, n) is expected, f"step {i}: {n} at t={now}"


# -- Bucket: the one token bucket, as the ready queue's rates use it ----------------------------

# (rate per second, burst or None for max(1, rate), steps of (now, seconds to wait; 0.0 = taken))
WAIT_CASES = {
    "full-at-start-then-waits-for-the-next": (2.0, None, [(0.0, 0.0), (0.0, 0.0), (0.0, 0.5), (0.25, 0.25)]),
    "a-wait-takes-nothing": (1.0, None, [(0.0, 0.0), (0.5, 0.5), (0.5, 0.5), (1.0, 0.0)]),
    "burst-below-the-rate": (10.0, 2.0, [(0.0, 0.0), (0.0, 0.0), (0.0, 0.1), (100.0, 0.0), (100.0, 0.0), (100.0, 0.1)]),
    "burst-above-the-rate": (0.05, 3.0, [(0.0, 0.0)] * 3 + [(0.0, 20.0), (20.0, 0.0)]),
    "burst-below-one-is-one": (0.5, 0.2, [(0.0, 0.0), (0.0, 2.0)]),
    "zero-is-unlimited": (0.0, None, [(0.0, 0.0)] * 10),
}  # fmt: skip


@pytest.mark.parametrize(("rate", "burst", "steps"), list(WAIT_CASES.values()), ids=list(WAIT_CASES))
def test_bucket_take(rate: float, burst: float | None, steps: list[tuple[float, float]]) -> None:
    bucket = policy.Bucket.full(rate, 0.0, burst)
    for i, (now, wait) in enumerate(steps):
        assert bucket.take(rate, now, burst) == pytest.approx(wait), f"step {i} at t={now}"
