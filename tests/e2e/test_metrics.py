"""Prometheus metrics end to end: the real daemon with [metrics] listen on a loopback port, scraped
over HTTP and parsed with prometheus_client's own parser after real submissions and deliveries."""

from __future__ import annotations

import ast
import http.client
import smtplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from cmcd import policy, stats
from cmcd.submit import auth, refusals, service
from cmcd.tenancy.refusals import Reason, Refusal
from cmcd.tenancy.rules import address_refusal
from tests.conftest import Cmcd, message
from tests.e2e.test_delivery import FAST, final, submit
from tests.peers import DnsServer, Sink, free_port


class Scrape:
    """One parsed /metrics answer."""

    def __init__(self, text: str):
        self.text = text
        self.families: dict[str, Metric] = {f.name: f for f in text_string_to_metric_families(text)}

    def value(self, sample: str, **labels: str) -> float:
        """The value of the one sample named SAMPLE with exactly LABELS."""
        family = sample.removesuffix("_total").removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
        found = [
            s.value for s in self.families[family].samples if s.name == sample and s.labels == labels
        ]  # fmt: skip
        assert len(found) == 1, (sample, labels, self.families[family].samples)
        return found[0]

    def labelled(self, family: str, label: str) -> dict[str, float]:
        return {s.labels[label]: s.value for s in self.families[family].samples}


def get(port: int, path: str = "/metrics", method: str = "GET", **headers: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def scrape(port: int) -> Scrape:
    status, headers, body = get(port)
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4"), (status, headers)
    return Scrape(body.decode())


def scrape_until(port: int, done: Any, timeout: float = 15) -> Scrape:
    deadline = time.monotonic() + timeout
    while True:
        got = scrape(port)
        if done(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer() as server:
        server.add("acme.test", "MX", "10 mx.acme.test.")
        server.add("mx.acme.test", "A", "127.0.0.9")
        server.add("dst.test", "MX", "10 mx1.dst.test.")
        server.add("mx1.dst.test", "A", "127.0.0.2")
        yield server


def start(make_cmcd: Any, **overrides: Any) -> tuple[Cmcd, int]:
    port = free_port()
    d = make_cmcd({"metrics": {"listen": f"127.0.0.1:{port}"}} | overrides)
    return d, port


def test_a_scrape_after_a_delivery_counts_what_happened(make_cmcd: Any, dns: DnsServer) -> None:
    sink_port = free_port()
    with Sink("127.0.0.2", sink_port) as sink:
        d, port = start(
            make_cmcd,
            dns={"nameservers": [f"127.0.0.1:{dns.port}"], "timeout": "2s"},
            delivery=FAST | {"port": sink_port},
        )
        before = scrape(port)
        assert before.value("cmcd_smtp_connections_total") == 0
        assert before.labelled("cmcd_deliveries", "result") == dict.fromkeys(
            ("delivered", "deferred", "bounced", "expired", "suppressed"), 0
        )
        assert before.value("cmcd_queue_oldest_seconds") == 0
        assert before.families["cmcd_delivery_seconds"].type == "histogram"

        # one failed login, one refused sender, one message delivered: three connections, two good logins
        with d.smtp(login=None) as c:
            c.user, c.password = "alice", "wrong password"
            with pytest.raises(smtplib.SMTPAuthenticationError, match="535"):
                c.auth("PLAIN", c.auth_plain)  # one attempt (login() would try LOGIN next)
        with d.smtp() as c:
            assert c.mail("alice@beta.test")[0] == 553
        qid = submit(d, ["rcpt@dst.test"], message(to="rcpt@dst.test"))
        sink.wait_for(1)
        d.wait_mail_log(lambda rows: final(rows, 1), qid)

        after = scrape_until(port, lambda s: s.value("cmcd_queue_recipients", state="inflight") == 0)
    assert after.value("cmcd_smtp_connections_total") == 3
    assert after.labelled("cmcd_smtp_auth", "result") == {"ok": 2, "failed": 1, "throttled": 0}
    assert after.labelled("cmcd_messages_accepted", "tenant") == {"acme": 1}
    rejected = after.labelled("cmcd_messages_rejected", "reason")
    assert rejected["sender_domain"] == 1 and sum(rejected.values()) == 1
    assert after.labelled("cmcd_deliveries", "result") == {
        "delivered": 1, "deferred": 0, "bounced": 0, "expired": 0, "suppressed": 0,
    }  # fmt: skip
    assert after.value("cmcd_delivery_seconds_count") == 1
    assert after.value("cmcd_delivery_seconds_bucket", le="+Inf") == 1
    assert 0 < after.value("cmcd_delivery_seconds_sum") < 30
    assert after.value("cmcd_delivery_seconds_bucket", le="30.0") == 1
    assert after.labelled("cmcd_queue_recipients", "state") == {"queued": 0, "deferred": 0, "inflight": 0, "held": 0}
    assert after.value("cmcd_queue_oldest_seconds") == 0
    assert after.value("cmcd_spool_bytes") > 0
    assert after.value("cmcd_store_write_seconds_count") > before.value("cmcd_store_write_seconds_count") > 0
    assert after.value("cmcd_scheduler_inflight_recipients") == 0
    assert "cmcd_backup_last_success_timestamp_seconds" in after.families
    assert after.families["cmcd_destination_connections"].type == "gauge"


def test_queue_gauges_and_the_http_surface(make_cmcd: Any) -> None:
    d, port = start(make_cmcd)  # delivery off: what is submitted stays queued
    submit(d, ["a@dst.test", "b@dst.test"])
    submit(d, ["c@dst.test"])
    got = scrape_until(port, lambda s: s.value("cmcd_queue_recipients", state="queued") == 3)
    assert got.labelled("cmcd_queue_recipients", "state") == {"queued": 3, "deferred": 0, "inflight": 0, "held": 0}
    assert 0 < got.value("cmcd_queue_oldest_seconds") < 60
    assert got.labelled("cmcd_messages_accepted", "tenant") == {"acme": 2}

    status, headers, body = get(port, method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    status, headers, body = get(port, Accept="application/openmetrics-text; version=1.0.0")
    assert status == 200 and headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    assert get(port, "/nothing")[0] == 404
    assert get(port, method="POST")[0] == 405
    # a header line past 4 KiB is refused before the handler (aiohttp's default would take 8 KiB
    # lines, 128 of them); a normal scrape is served again after it
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n")
        assert sock.recv(64).split(b" ", 2)[1] in (b"400", b"431")
    assert get(port)[0] == 200


# -- the reason labels (no sockets; here beside the metric they label) --------------------------


def _refusals(module: ModuleType) -> list[str]:
    """Every string (or f-string's fixed text) in MODULE's source that reads as a 4xx/5xx reply."""
    tree = ast.parse(Path(str(module.__file__)).read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
        else:
            continue
        if text[:1] in "45" and text[1:3].isdigit() and text[3:4] == " ":
            found.append(text)
    return found


AUTH_REASONS = (Reason.AUTH_INVALID, Reason.AUTH_THROTTLED)
#: every refusal submit makes, those with a number in them made with one (AUTH's are counted in
#: cmcd_smtp_auth_total instead)
MESSAGE_REFUSALS = [
    *(v for v in vars(refusals).values() if isinstance(v, Refusal) and v.reason not in AUTH_REASONS),
    refusals.daily_quota(5),
    refusals.daily_quota(5, would_exceed=True),
    refusals.rate_limit(2.5),
    refusals.too_many_recipients(3),
    refusals.mail_loop(30),
    refusals.bad_stream("bulk"),
    refusals.bad_content(policy.check_data(b"\r\na\x00b\r\n", "reject").problem),
    *(r for r in map(address_refusal, ("no-at-sign", "sp ace@a.test", "\u00e9@a.test")) if r is not None),
]


def test_every_refusal_the_service_makes_has_a_reason_of_its_own() -> None:
    assert _refusals(service) + _refusals(auth) == []  # every refusal they make is a typed one (refusals.py)
    assert len(MESSAGE_REFUSALS) >= 10
    counted = stats.IntakeStats()
    for refusal in MESSAGE_REFUSALS:
        counted.refused(refusal)
    assert {k for k, v in counted.rejected.items() if not v} == {"other"}  # each label but "other" is one's own


class _Checks:
    """A check that returns what it is given, counted as SubmitService's are."""

    def __init__(self) -> None:
        self.stats = stats.IntakeStats()

    @refusals.counted
    def check(self, result: Refusal | refusals.Accepted | None) -> Refusal | refusals.Accepted | None:
        return result


@pytest.mark.parametrize(
    ("result", "reason"),
    [
        (refusals.TOO_BIG, "too_big"),
        (refusals.DATA_BUSY, "busy"),
        (refusals.bad_content(policy.check_data(b"\r\na\x00b\r\n", "reject").problem), "bad_content"),
        (refusals.SUPPRESSED, "suppressed"),
        (refusals.Accepted("X"), None),
        (None, None),
        (Refusal(Reason.OTHER, 554, "5.0.0", "something new"), "other"),
        (Refusal(Reason.CONFLICT, 550, "5.7.1", "no message's reason"), "other"),
    ],
    ids=["size", "memory", "nul-byte", "suppressed", "accepted-is-no-refusal", "go-on", "unknown", "not-a-message"],
)
def test_refusal_reasons(result: Refusal | refusals.Accepted | None, reason: str | None) -> None:
    checks = _Checks()
    assert checks.check(result) is result
    assert {k: v for k, v in checks.stats.rejected.items() if v} == ({reason: 1} if reason else {})
    assert set(checks.stats.rejected) == set(stats.REJECT_REASONS)
