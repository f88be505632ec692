"""Provider shaping end to end: the real daemon, MX records from a DNS server on loopback, sinks on
127.0.0.x. Two domains whose MX hosts end in one provider's suffix share the provider's connection
limit at a sink that counts concurrent connections (a domain of no provider gets more); a sink that
answers "421 4.7.0 Try again later, closing connection" trips a rule that lowers the limit, shown by
cmcctl, in the operation log and /metrics, until the rule's duration ends by itself; a suspension
defers without counting an attempt and never expires or bounces what it holds."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cmcd, message, wait_until
from tests.e2e.test_delivery import FAST, final, submit
from tests.e2e.test_metrics import scrape_until
from tests.e2e.test_replies_at_rest import cmcctl
from tests.peers import DnsServer, Sink, free_port

TRY_AGAIN = "421 4.7.0 Try again later, closing connection"
PROVIDER = '[provider.test]\nsuffixes = ["mx.provider.test"]\nconnection_limit = {limit}\n'


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    """one.test and two.test at the provider (two MX host names, one sink address), control.test
    at a host of no provider, acme.test (the senders' domain, where bounces would go)."""
    with DnsServer() as server:
        for domain, mx, ip in (
            ("one.test", "mx1.mx.provider.test", "127.0.0.2"),
            ("two.test", "mx2.mx.provider.test", "127.0.0.2"),
            ("control.test", "mx.control.test", "127.0.0.3"),
            ("acme.test", "mx.acme.test", "127.0.0.9"),
        ):
            server.add(domain, "MX", f"10 {mx}.")
            server.add(mx, "A", ip)
        yield server


def start(make_cmcd: Any, dns: DnsServer, port: int, shaping: Path, **extra: Any) -> Cmcd:
    delivery = FAST | {"port": port, "connection_limit": 10, "initial_concurrency": 10} | extra.pop("delivery", {})
    return make_cmcd(
        {
            "server": {"workers": 1},  # one worker: the provider's whole limit, and one automation state
            "dns": {"nameservers": [dns.address], "timeout": "2s"},
            "delivery": delivery,
            "shaping": {"override_file": str(shaping)},
        }
        | extra
    )


def status(d: Cmcd) -> dict[str, Any]:
    """`cmcctl --json shaping status` of the one worker."""
    (worker,) = json.loads(cmcctl(d, "--json", "shaping", "status"))["workers"]
    return dict(worker)


def site(d: Cmcd, name: str = "provider:test") -> dict[str, Any] | None:
    return next((s for s in status(d)["sites"] if s["site"] == name), None)


def most_at_once(sinks: list[Sink], done: Any, timeout: float = 30) -> list[int]:
    """Each sink's most connections open at once, watched until DONE() holds."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert done(), [len(s.messages) for s in sinks]
    return [s.peak for s in sinks]


def test_two_domains_of_one_provider_share_its_connection_limit(make_cmcd: Any, dns: DnsServer, tmp_path: Path) -> None:
    shaping = tmp_path / "shaping.toml"
    shaping.write_text(PROVIDER.format(limit=2))
    port = free_port("127.0.0.2")
    with Sink("127.0.0.2", port, data_delay=0.3) as provider, Sink("127.0.0.3", port, data_delay=1.0) as control:
        d = start(make_cmcd, dns, port, shaping)
        d.wait_log(r"event=shaping_loaded providers=\d+ rules=\d+ files=" + str(shaping))
        with d.smtp() as c:
            for n in range(8):
                for domain in ("one.test", "two.test", "control.test"):
                    c.sendmail("alice@acme.test", [f"r{n}@{domain}"], message(to=f"r{n}@{domain}"))
        peaks = most_at_once([provider, control], lambda: len(provider.messages) == 16 and len(control.messages) == 8)
        # both domains' mail went through the provider's two connections; the control domain, with the
        # same mail and [delivery] connection_limit = 10, got more at once
        assert peaks[0] <= 2 and peaks[1] >= 3, peaks
        assert {r for m in provider.messages for r in m.rcpt_tos} == {
            f"r{n}@{domain}" for n in range(8) for domain in ("one.test", "two.test")
        }
        shaped = site(d)
        assert shaped is not None
        assert (shaped["provider"], shaped["connection_limit"], shaped["domains"]) == ("test", 2, 2)
        assert site(d, "mx.control.test") is None  # no provider's and never changed: not a shaped site
        rows = d.wait_mail_log(lambda rows: final(rows, 24))
        assert sum(r["event"] == "delivered" for r in rows) == 24

        # queue summary lists the shaped site with its limit
        summary = json.loads(cmcctl(d, "--json", "queue", "summary"))
        assert [s["site"] for s in summary["sites"]] == ["provider:test"]
        assert summary["sites"][0]["connection_limit"] == 2


def test_421_replies_trip_a_rule_that_lowers_the_limit_until_its_time_is_up(
    make_cmcd: Any, dns: DnsServer, tmp_path: Path
) -> None:
    shaping = tmp_path / "shaping.toml"
    shaping.write_text(
        PROVIDER.format(limit=4)
        + '[[automation]]\nname = "slow-down"\nproviders = ["test"]\ncodes = [421]\n'
        + 'text = "Try again later, closing connection"\ncount = 3\nperiod = "1m"\naction = "limit"\n'
        + 'connection_limit = 1\nduration = "4s"\n'
    )
    port = free_port("127.0.0.2")
    refusals = [TRY_AGAIN] * 3
    lock = threading.Lock()

    def mail_reply(sender: str) -> str | None:
        with lock:
            return refusals.pop(0) if refusals else None

    metrics = free_port("127.0.0.1")
    with Sink("127.0.0.2", port, mail_reply=mail_reply) as provider:
        d = start(make_cmcd, dns, port, shaping, metrics={"listen": f"127.0.0.1:{metrics}"})
        before = site(d)
        assert before is None  # no mail yet: the site is made with its first message
        qids = [submit(d, [f"r{n}@{domain}"]) for n, domain in enumerate(("one.test", "two.test", "one.test"))]

        # three 421s at the provider's site (from both domains) fire the rule: the limit is 1
        line = d.wait_log("event=shaping_change", timeout=20)
        assert "site=provider:test" in line and "rule=slow-down" in line and "action=limit" in line
        shaped = site(d)
        assert shaped is not None and (shaped["connection_limit"], shaped["configured_connection_limit"]) == (1, 4)
        (change,) = status(d)["changes"]
        assert (change["rule"], change["action"], change["connection_limit"], change["reply"]) == (
            "slow-down", "limit", 1, "421 4.7.0",
        )  # fmt: skip
        assert 0 < change["ends_in_s"] <= 4
        text = cmcctl(d, "shaping", "status")
        assert "slow-down" in text and "provider:test" in text

        # it ends by itself: the configured limit is back, with no operator's help
        wait_until(lambda: not status(d)["changes"], "the rule's change ended", timeout=15)
        shaped = site(d)
        assert shaped is not None and shaped["connection_limit"] == 4
        d.wait_log("event=shaping_restored site=provider:test")

        ops = [(o["action"], o["target"], o["actor"]) for o in d.ops_log() if o["action"].startswith("shaping.")]
        assert ops == [("shaping.limit", "provider:test", "cmcd"), ("shaping.restore", "provider:test", "cmcd")]
        assert "rule=slow-down" in next(o["detail"] for o in d.ops_log() if o["action"] == "shaping.limit")
        scraped = scrape_until(
            metrics, lambda m: m.labelled("cmcd_shaping_actions", "action") == {"limit": 1.0, "restore": 1.0}
        )
        labels = {"provider": "test", "rule": "slow-down"}
        assert scraped.value("cmcd_shaping_actions_total", **labels, action="limit") == 1
        assert scraped.value("cmcd_shaping_actions_total", **labels, action="restore") == 1
        assert scraped.value("cmcd_shaping_connection_limit", site="provider:test") == 4

        # the 421s were tempfails: every message is delivered by a retry, none bounced
        for qid in qids:
            rows = d.wait_mail_log(lambda rows: final(rows, 1), qid)
            assert [r["event"] for r in rows if r["event"] != "accepted"][-1] == "delivered"
        assert len(provider.messages) == 3


def test_a_suspension_defers_without_an_attempt_and_never_expires_or_bounces(
    make_cmcd: Any, dns: DnsServer, tmp_path: Path
) -> None:
    shaping = tmp_path / "shaping.toml"
    shaping.write_text(
        PROVIDER.format(limit=4)
        + '[[automation]]\nname = "hold"\nproviders = ["test"]\ncodes = [421]\n'
        + 'text = "Try again later"\naction = "suspend"\nduration = "6s"\n'
    )
    port = free_port("127.0.0.2")
    refusals = [TRY_AGAIN]
    lock = threading.Lock()

    def mail_reply(sender: str) -> str | None:
        with lock:
            return refusals.pop(0) if refusals else None

    with Sink("127.0.0.2", port, mail_reply=mail_reply) as provider, Sink("127.0.0.9", port) as bounces:
        # a lifetime shorter than the hold: were a hold an attempt, the mail it holds would expire
        d = start(make_cmcd, dns, port, shaping, delivery={"max_lifetime": "2s"})
        first = submit(d, ["a@one.test"])  # its 421 starts the suspension
        d.wait_log("event=shaping_change site=provider:test provider=test rule=hold action=suspend")
        accepted = time.time()
        second = submit(d, ["b@two.test"])  # another domain of the provider: held too
        d.wait_mail_log(lambda rows: any(r["event"] == "deferred" for r in rows), second)
        (change,) = status(d)["changes"]
        assert change["action"] == "suspend"

        # past max_lifetime, an operator's retry brings both back while the site is still held
        wait_until(lambda: time.time() - accepted > 2.2, "the held message is older than max_lifetime")
        assert status(d)["changes"], "the suspension is still in force"
        cmcctl(d, "queue", "retry", "--all")
        d.wait_mail_log(lambda rows: sum(r["event"] == "deferred" for r in rows) >= 2, second)

        for qid, address, attempts in ((first, "a@one.test", 1), (second, "b@two.test", 0)):
            rows = d.wait_mail_log(lambda rows: final(rows, 1), qid, timeout=30)
            assert {r["rcpt"] for r in rows} == {address}
            events = [(r["event"], r["attempt"]) for r in rows if r["event"] != "accepted"]
            assert events[-1][0] == "delivered", events
            assert not any(e in ("expired", "bounced") for e, _ in events), events
            held = [r for r in rows if r["event"] == "deferred" and "held until" in r["response"]]
            assert held and all(r["attempt"] == attempts for r in held), events  # a hold is no attempt
        assert sorted(r for m in provider.messages for r in m.rcpt_tos) == ["a@one.test", "b@two.test"]
        assert bounces.messages == []  # no delivery status notification: nothing failed
        actions = [o["action"] for o in d.ops_log() if o["action"].startswith("shaping.")]
        assert actions == ["shaping.suspend", "shaping.restore"]


def test_check_config_and_start_up_refuse_a_bad_shaping_file_by_name(make_cmcd: Any, tmp_path: Path) -> None:
    bad = tmp_path / "ops-shaping.toml"
    bad.write_text('[[automation]]\nname = "broken"\ntext = "(unclosed"\naction = "suspend"\nduration = "1m"\n')
    config = tmp_path / "cmcd.toml"
    config.write_text(
        f'[server]\nhostname = "mail.example.com"\n[smtp]\nlisten = []\n[shaping]\noverride_file = "{bad}"\n'
    )
    run = subprocess.run(
        [sys.executable, "-m", "cmcd.daemon", "check-config", "--config", str(config)],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert run.returncode == 2
    assert str(bad) in run.stderr and "automation rule 'broken'" in run.stderr and "regular expression" in run.stderr
    bad.write_text("# the operator's shaping: nothing of its own yet\n")
    run = subprocess.run(
        [sys.executable, "-m", "cmcd.daemon", "check-config", "--config", str(config)],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr


def test_a_reload_reads_the_shaping_file_again_and_keeps_it_when_bad(
    make_cmcd: Any, dns: DnsServer, tmp_path: Path
) -> None:
    shaping = tmp_path / "shaping.toml"
    shaping.write_text(PROVIDER.format(limit=2))
    port = free_port("127.0.0.2")
    with Sink("127.0.0.2", port):
        d = start(make_cmcd, dns, port, shaping)
        submit(d, ["a@one.test"])
        wait_until(lambda: (site(d) or {}).get("connection_limit") == 2, "the provider's site with limit 2")
        assert d.proc is not None
        shaping.write_text(PROVIDER.format(limit=3))
        d.proc.send_signal(signal.SIGHUP)
        d.wait_log(r"event=reloaded")
        submit(d, ["b@two.test"])
        wait_until(lambda: (site(d) or {}).get("connection_limit") == 3, "the reloaded limit 3")
        shaping.write_text('[provider.test]\nsuffixes = ["mx.provider.test"]\nconnection_limit = "many"\n')
        d.proc.send_signal(signal.SIGHUP)
        line = d.wait_log("event=shaping_reload_failed")
        assert str(shaping) in line and "provider test: connection_limit" in line
        assert [p["connection_limit"] for p in status(d)["providers"] if p["name"] == "test"] == [3]


def test_each_worker_holds_its_share_of_a_providers_limit(make_cmcd: Any, dns: DnsServer, tmp_path: Path) -> None:
    shaping = tmp_path / "shaping.toml"
    shaping.write_text(PROVIDER.format(limit=3))
    port = free_port("127.0.0.2")
    with Sink("127.0.0.2", port):
        d = start(make_cmcd, dns, port, shaping, server={"workers": 2})
        workers = json.loads(cmcctl(d, "--json", "shaping", "status"))["workers"]
        assert [w["worker"] for w in workers] == [0, 1]
        shares = [next(p["connection_limit"] for p in w["providers"] if p["name"] == "test") for w in workers]
        assert shares == [2, 1]  # the host's 3, split
        gmail = [next(p["connection_limit"] for p in w["providers"] if p["name"] == "gmail") for w in workers]
        assert gmail == [5, 5]  # the shipped file's 10
        submit(d, ["a@one.test"])
        wait_until(
            lambda: any(
                s["site"] == "provider:test" for s in json.loads(cmcctl(d, "--json", "queue", "summary"))["sites"]
            ),
            "the provider's site in queue summary",
        )


def test_one_failing_next_hop_never_backs_off_or_speaks_for_the_providers_other_domains(
    make_cmcd: Any, dns: DnsServer, tmp_path: Path
) -> None:
    """bad.test's MX (at the provider) refuses every connection; one.test's takes mail. The site they
    share is never declared dead, so one.test's mail goes out, and none of its rows names bad.test's host."""
    shaping = tmp_path / "shaping.toml"
    shaping.write_text(PROVIDER.format(limit=4))
    dns.add("bad.test", "MX", "10 mx3.mx.provider.test.")
    dns.add("mx3.mx.provider.test", "A", "127.0.0.4")  # nothing listens there: refused at once
    port = free_port("127.0.0.2")
    with Sink("127.0.0.2", port) as provider:
        d = start(make_cmcd, dns, port, shaping, delivery={"dead_site_backoff": "5m", "initial_concurrency": 2})
        for n in range(6):
            submit(d, [f"r{n}@bad.test"])
        d.wait_log(r"event=connect_failed site=provider:test", timeout=20)
        good = [submit(d, [f"r{n}@one.test"]) for n in range(3)]
        rows = d.wait_mail_log(lambda rows: sum(r["event"] == "delivered" for r in rows) >= 3, timeout=30)
        assert sorted(r["queue_id"] for r in rows if r["event"] == "delivered") == sorted(good)
        assert len(provider.messages) == 3
        bad = [r for r in rows if r["rcpt"].endswith("@bad.test") and r["event"] == "deferred"]
        assert bad and all("127.0.0.4" in r["response"] or "mx3.mx.provider.test" in r["response"] for r in bad)
        assert not any("127.0.0.4" in (r["response"] or "") for r in rows if r["rcpt"].endswith("@one.test"))
        assert not [line for line in d.log if "event=site_dead site=provider:test" in line]
