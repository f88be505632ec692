"""Reply classification, the retry schedule and expiry: pure functions, table-tested."""

from __future__ import annotations

import pytest

from cmcd import policy


@pytest.mark.parametrize(
    ("code", "text", "verdict", "enhanced", "hard"),
    [
        (250, "2.0.0 Ok: queued as 123", "delivered", "2.0.0", False),
        (251, "User not local; will forward", "delivered", "", False),
        (421, "4.7.0 Too many connections, closing", "deferred", "4.7.0", False),
        (450, "4.2.1 Mailbox busy", "deferred", "4.2.1", False),
        (451, "4.3.0 Temporary lookup failure", "deferred", "4.3.0", False),
        (452, "4.2.2 Mailbox full", "deferred", "4.2.2", False),
        (452, "4.5.3 Too many recipients", "deferred", "4.5.3", False),
        (454, "4.7.0 TLS not available", "deferred", "4.7.0", False),
        (550, "5.1.1 <x@y>: Recipient address rejected: User unknown", "bounced", "5.1.1", True),
        (550, "5.1.10 null MX", "bounced", "5.1.10", True),
        (551, "5.1.6 User has moved", "bounced", "5.1.6", True),
        (552, "5.2.2 Mailbox full", "bounced", "5.2.2", False),
        (553, "5.7.1 Sender address rejected", "bounced", "5.7.1", False),
        (554, "5.7.1 Message rejected as spam", "bounced", "5.7.1", False),
        (550, "Requested action not taken: mailbox unavailable", "bounced", "", False),
        # an enhanced code of the wrong class is ignored: the basic code decides (RFC 3463)
        (550, "4.2.2 confused server", "bounced", "", False),
        (450, "5.1.1 confused server", "deferred", "", False),
        # outside 2xx-5xx: a protocol error, deferred rather than lost
        (354, "End data with <CR><LF>.<CR><LF>", "deferred", "", False),
        (999, "nonsense", "deferred", "", False),
    ],
)
def test_classify(code: int, text: str, verdict: str, enhanced: str, hard: bool) -> None:
    out = policy.classify(code, text)
    assert (out.verdict, out.enhanced, out.hard) == (verdict, enhanced, hard)
    assert out.text == f"{code} {text}"


def test_classify_unfolds_multiline_text() -> None:
    assert policy.classify(550, "5.1.1 first line\r\n  second line").text == "550 5.1.1 first line second line"


@pytest.mark.parametrize(
    ("reason", "enhanced"),
    [("connection refused", "4.4.1"), ("timed out waiting for a reply", "4.4.2"), ("TLS handshake failed", "4.7.5")],
)
def test_network_faults_are_always_deferred(reason: str, enhanced: str) -> None:
    out = policy.network_fault(reason, enhanced)
    assert (out.verdict, out.code, out.enhanced, out.hard) == ("deferred", 0, enhanced, False)
    assert out.text == f"{enhanced} {reason}"


def test_permanent_failure_without_a_reply_bounces() -> None:
    out = policy.permanent_failure("5.1.10", "domain accepts no mail (null MX)")
    assert (out.verdict, out.hard) == ("bounced", True)


DEFAULT = (300.0, 600.0, 1200.0, 2400.0, 4800.0, 7200.0)


@pytest.mark.parametrize(
    ("attempts", "expected"),
    [(0, 300), (1, 300), (2, 600), (3, 1200), (4, 2400), (5, 4800), (6, 7200), (7, 7200), (100, 7200)],
)
def test_retry_schedule_without_jitter(attempts: int, expected: float) -> None:
    assert policy.retry_delay(attempts, DEFAULT, 0.0, 0.5) == expected


@pytest.mark.parametrize(("rand", "factor"), [(0.0, 0.9), (0.5, 1.0), (0.999999, 1.1)])
def test_retry_jitter_spreads_by_the_fraction(rand: float, factor: float) -> None:
    assert policy.retry_delay(2, DEFAULT, 0.1, rand) == pytest.approx(600 * factor, rel=1e-4)


def test_retry_schedule_must_not_be_empty() -> None:
    with pytest.raises(ValueError):
        policy.retry_delay(1, (), 0.0, 0.0)


@pytest.mark.parametrize(("age", "expired"), [(0, False), (5 * 86400 - 1, False), (5 * 86400, True), (6 * 86400, True)])
def test_expiry(age: float, expired: bool) -> None:
    assert policy.expired(1_000_000.0, 1_000_000.0 + age, 5 * 86400) is expired
