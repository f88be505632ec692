"""Bounce classes end to end: provider replies replayed by a sink land in their class in the mail log,
the API and the blocks they make; the override rules file is read again on SIGHUP (a bad one keeps the
rules in force)."""

from __future__ import annotations

import signal
import sqlite3
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PASSWORD, Cmcd
from tests.e2e.test_delivery import FAST, final, submit
from tests.e2e.test_metrics import scrape_until
from tests.peers import DnsServer, Sink, free_port

DATA = Path(__file__).resolve().parents[1] / "data" / "provider_replies.toml"
REPLIES = tomllib.loads(DATA.read_text())["reply"]
#: permanent refusals (5xx) the sink gives at RCPT, one recipient each
PERMANENT = [r for r in REPLIES if r["reply"].startswith("5")]


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer() as server:
        server.add("dst.test", "MX", "10 mx1.dst.test.")
        server.add("mx1.dst.test", "A", "127.0.0.2")
        yield server


def start(make_cmcd: Any, dns: DnsServer, port: int, **extra: Any) -> Cmcd:
    return make_cmcd(
        {
            "dns": {"nameservers": [f"127.0.0.1:{dns.port}"], "timeout": "2s"},
            "delivery": FAST | {"port": port, "retry_schedule": ["1h"]},
            "api": {"listen": "127.0.0.1:0"},
        }
        | extra
    )


def test_provider_replies_replayed_by_a_sink_land_in_their_class(make_cmcd: Any, dns: DnsServer) -> None:
    port = free_port("127.0.0.2")
    dns.add("acme.test", "MX", "10 mx.acme.test.")  # where the bounce report goes
    dns.add("mx.acme.test", "A", "127.0.0.9")
    by_rcpt = {f"r{n}@dst.test": r for n, r in enumerate(PERMANENT)}
    busy = "450 4.2.1 The user you are trying to contact is receiving mail too quickly. Please resend later. - gsmtp"

    def reply(address: str) -> str | None:
        return busy if address == "busy@dst.test" else by_rcpt[address]["reply"]

    with Sink("127.0.0.2", port, rcpt_reply=reply), Sink("127.0.0.9", port) as reports:
        metrics = free_port("127.0.0.1")
        d = start(make_cmcd, dns, port, metrics={"listen": f"127.0.0.1:{metrics}"})
        rcpts = [*by_rcpt, "busy@dst.test"]
        qid = submit(d, rcpts)
        rows = d.wait_mail_log(
            lambda rows: final(rows, len(by_rcpt)) and any(r["event"] == "deferred" for r in rows), qid
        )
        got = {r["rcpt"]: r["bounce_class"] for r in rows if r["event"] in ("bounced", "deferred")}
        assert got == {a: r["class"] for a, r in by_rcpt.items()} | {"busy@dst.test": "rate_limited"}
        assert all(r["bounce_class"] == "" for r in rows if r["event"] == "accepted")
        (report,) = reports.wait_for(1)  # the sender's DSN names each recipient's class
        lines = report.data.decode("ascii").splitlines()
        for address, r in by_rcpt.items():
            (said,) = [line for line in lines if line.startswith(f"<{address}>: ")]
            assert said.endswith(f" (class: {r['class']})")
        assert report.data.count(b"X-Cmcd-Bounce-Class: ") == len(by_rcpt)
        assert b"(class: authentication)" in report.data

        # the API shows the class on every bounce
        d.admin("user.add", tenant="acme", login="acme-admin", role="admin", password=PASSWORD)
        token = d.admin("apikey.add", tenant="acme", login="acme-admin", role="viewer")["token"]
        status, _, page = d.http("GET", "/v1/bounces?limit=100", token=token)
        assert status == 200
        assert {r["recipient"]: r["bounce_class"] for r in page["data"]} == {a: r["class"] for a, r in by_rcpt.items()}

        # blocks: invalid_recipient and bad_domain at once; one mailbox_full, an authentication or a
        # spam_block refusal never
        blocked = {s["address"] for s in d.admin("suppression.list", tenant="acme")}
        assert blocked == {a for a, r in by_rcpt.items() if r["class"] in ("invalid_recipient", "bad_domain")}
        conn = sqlite3.connect(f"file:{d.root / 'cmcd.db'}?mode=ro", uri=True)
        try:
            expiries = conn.execute("SELECT bounce_class, expires - created FROM suppressions").fetchall()
        finally:
            conn.close()
        assert {round(e) for _, e in expiries} == {30 * 86400}
        assert {c for c, _ in expiries} <= {"invalid_recipient", "bad_domain"}

        # authentication and spam_block refusals raise the tenant's alert counter instead
        want = {c: sum(r["class"] == c for r in PERMANENT) for c in ("authentication", "spam_block")}
        assert all(want.values())
        scraped = scrape_until(metrics, lambda m: m.labelled("cmcd_tenant_bounce_alerts", "class") == want)
        for cls, n in want.items():
            assert scraped.value("cmcd_tenant_bounce_alerts_total", tenant="acme", **{"class": cls}) == n


def test_the_override_file_is_read_again_on_sighup(make_cmcd: Any, dns: DnsServer, tmp_path: Path) -> None:
    port = free_port("127.0.0.2")
    override = tmp_path / "rules.toml"
    override.write_text("# no rules of the operator's yet\n")
    refusal = "550 5.7.1 Refused by the xyzzy filter"
    with Sink("127.0.0.2", port, rcpt_reply=lambda a: refusal):
        d = start(make_cmcd, dns, port, bounces={"override_file": str(override)}, server={"workers": 1})
        shipped = int(d.wait_log(r"event=bounce_rules_loaded rules=\d+").split("rules=")[1].split()[0])
        first = submit(d, ["one@dst.test"])
        rows = d.wait_mail_log(lambda rows: final(rows, 1), first)
        assert [r["bounce_class"] for r in rows if r["event"] == "bounced"] == ["policy"]  # 5.7.1's fallback

        override.write_text('[[rule]]\nclass = "spam_block"\ntext = "xyzzy filter"\nsource = "https://ops.test/"\n')
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        d.wait_log(rf"event=bounce_rules_loaded rules={shipped + 1}\b")
        second = submit(d, ["two@dst.test"])
        rows = d.wait_mail_log(lambda rows: final(rows, 1), second)
        assert [r["bounce_class"] for r in rows if r["event"] == "bounced"] == ["spam_block"]

        override.write_text('[[rule]]\nclass = "spam_block"\ntext = "(unclosed"\n')
        d.proc.send_signal(signal.SIGHUP)
        line = d.wait_log("event=bounce_rules_reload_failed")
        assert str(override) in line and "rule 1" in line
        third = submit(d, ["three@dst.test"])
        rows = d.wait_mail_log(lambda rows: final(rows, 1), third)
        assert [r["bounce_class"] for r in rows if r["event"] == "bounced"] == ["spam_block"]  # the rules in force
