"""Faults of the far side (issue 20): a destination that misbehaves, a mail loop, a crash mid-delivery.

The real daemon delivers to misbehaving SMTP servers on loopback (tests/badmx.py) and resolves
through a DNS server on loopback. Each test states the bound that must hold: connections over a
window, the destination's words in the deferral, a loop bounced with 5.4.6 within a few hops, a
stalled reader cut off within data_xfer_timeout.
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.badmx import BadMx
from tests.conftest import PASSWORD, Cmcd, message, queue_id
from tests.e2e.test_delivery import FAST as DELIVERY_FAST
from tests.peers import DnsServer, Sink, free_port

#: test_delivery's fast timers, without its short dead_site_backoff: the tests here set their own
FAST = {k: v for k, v in DELIVERY_FAST.items() if k != "dead_site_backoff"}


@pytest.fixture
def bounces() -> Iterator[Sink]:
    """Where acme.test's mail (the DSNs to its senders) goes."""
    with Sink("127.0.0.9", free_port("127.0.0.9")) as sink:
        yield sink


def submit(d: Cmcd, rcpt: str, data: bytes | None = None) -> str:
    """Send one message over SMTP AUTH; its queue id from the 250."""
    with d.smtp() as c:
        c.mail("alice@acme.test")
        code, reply = c.rcpt(rcpt)
        assert code == 250, reply
        code, reply = c.data(data or message(to=rcpt))
        assert code == 250, reply
        return queue_id(reply)


def first(rows: list[dict[str, Any]], event: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["event"] == event), None)


# -- a destination that greets, then ends the session -----------------------------------------


@pytest.mark.parametrize(
    ("mode", "words"),
    [
        ("ehlo_then_421", "421 4.3.2 mx.bad.test shutting down for maintenance"),
        ("ehlo_then_garbage", "garbled reply"),
    ],
    ids=["421-after-ehlo", "garbage-after-ehlo"],
)
def test_a_session_that_ends_after_ehlo_is_deferred_and_backed_off(
    make_cmcd: Any, bounces: Sink, mode: str, words: str
) -> None:
    """Before: ~50,000 connections in 20 s, the recipient inflight for ever. Now: one failed session
    per window step, the job deferred with the server's words, then the site dead for its backoff."""
    with BadMx("127.0.0.2", mode=mode) as mx:
        d = make_cmcd(
            {"delivery": FAST | {"routes": {"acme.test": bounces.address, "*": mx.address}, "dead_site_backoff": "60s"}}
        )
        qid = submit(d, "rcpt@dst.test")
        rows = d.wait_mail_log(lambda rows: first(rows, "deferred") is not None, qid)
        deferred = first(rows, "deferred")
        assert deferred is not None
        assert words in deferred["response"], deferred["response"]
        # each retry (1 s apart here) makes at most one connection, and shrinks the site's window;
        # at zero the site is dead and retries are deferred without connecting
        d.wait_log(r"event=site_dead site=route:127\.0\.0\.2", timeout=30)
        assert mx.connections <= 5, f"{mx.connections} connections for one message"
        seen = len([r for r in d.mail_log(qid) if r["event"] == "deferred"])
        window_start = time.monotonic()
        d.wait_mail_log(lambda rows: sum(r["event"] == "deferred" for r in rows) >= seen + 2, qid, timeout=20)
        assert mx.connections_between(window_start, time.monotonic()) == 0
        deferrals = [r for r in d.mail_log(qid) if r["event"] == "deferred"]
        assert mx.connections <= len(deferrals)
        assert all(words in r["response"] for r in deferrals)  # the dead site's deferrals keep its words
        failures = d.admin("status")["session_failures"]
        # the close is seen before MAIL ("ready") or as the reply to MAIL ("transaction"): both fail the session
        assert failures["ready"] + failures["transaction"] == mx.connections


def test_a_421_at_mail_is_logged_with_the_servers_words(make_cmcd: Any, bounces: Sink) -> None:
    with BadMx("127.0.0.2", mode="421_at_mail") as mx:
        d = make_cmcd({"delivery": FAST | {"routes": {"acme.test": bounces.address, "*": mx.address}}})
        qid = submit(d, "rcpt@dst.test")
        rows = d.wait_mail_log(lambda rows: first(rows, "deferred") is not None, qid)
        response = first(rows, "deferred")["response"]  # type: ignore[index]
        assert "421 4.7.0 mx.bad.test too many connections from your network" in response
        assert "connection closed" not in response


def test_the_connection_rate_guard_holds_when_nothing_else_would(make_cmcd: Any, bounces: Sink) -> None:
    """The per-site connect_rate_limit is the last guard: it holds even where every connection is
    legitimate (one message a connection, 30 messages at once, a server that takes them all)."""
    d = make_cmcd({"delivery": FAST | {"enabled": False}})
    for i in range(30):
        submit(d, f"r{i}@dst.test")
    d.stop()
    with BadMx("127.0.0.2", mode="relay") as mx:
        d.config["delivery"] = FAST | {
            "routes": {"acme.test": bounces.address, "*": mx.address},
            "messages_per_connection": 1,
            "connect_rate_limit": 5.0,
        }
        d.write_config()
        d.start()
        d.wait_mail_log(lambda rows: sum(r["event"] == "delivered" for r in rows) >= 30, timeout=30)
        times = sorted(mx.connect_times)
        busiest = max(sum(1 for t in times if s <= t < s + 1.0) for s in times)
        assert busiest <= 5 + 5, f"{busiest} connections in one second with connect_rate_limit = 5 (burst 5)"
        assert d.admin("status")["connect_throttled"] >= 1
        d.wait_log("event=connect_throttled")


# -- a destination that stops reading the body ----------------------------------------------------


@pytest.mark.parametrize("mode", ["stall_in_data", "trickle_in_data"], ids=["stops-reading", "two-bytes-a-second"])
def test_a_reader_that_stalls_in_data_is_cut_off_and_deferred(make_cmcd: Any, bounces: Sink, mode: str) -> None:
    """Before: a 20 MB message still inflight after 150 s with data_timeout = 10 s. Now: deferred within
    data_xfer_timeout of the stall (plus the time the kernel buffers take to fill)."""
    with BadMx("127.0.0.2", mode=mode) as mx:
        d = make_cmcd(
            {
                "delivery": FAST
                | {
                    "routes": {"acme.test": bounces.address, "*": mx.address},
                    "data_xfer_timeout": "2s",
                    "data_timeout": "60s",
                    "retry_schedule": ["1h"],
                }
            }
        )
        big = message(to="rcpt@dst.test", body=("x" * 998 + "\r\n") * 8000)  # 8 MB
        qid = submit(d, "rcpt@dst.test", big)
        assert mx.stalled.wait(20)
        stalled_at = time.monotonic()
        rows = d.wait_mail_log(lambda rows: first(rows, "deferred") is not None, qid, timeout=30)
        took = time.monotonic() - stalled_at
        response = first(rows, "deferred")["response"]  # type: ignore[index]
        assert "timed out sending the message" in response, response
        assert took < 15, f"deferred {took:.1f} s after the stall"
        d.wait_log("event=mail_log|.")  # the daemon is alive
        assert d.admin("status")["outbound_connections"] == 0  # the slot is free again


# -- loops -----------------------------------------------------------------------------------------


def test_a_route_or_mx_back_to_cmcd_itself_bounces_with_5_4_6(make_cmcd: Any, bounces: Sink) -> None:
    """Before: one message became 1,082 in 20 s. Now: bounced at the first attempt, one message in all."""
    smtp_port = free_port("127.0.0.1")
    with DnsServer() as dns:
        dns.add("mxloop.test", "MX", "10 mail.mxloop.test.")
        dns.add("mail.mxloop.test", "A", "127.0.0.1")
        d = make_cmcd(
            {
                "smtp": {"listen": [f"127.0.0.1:{smtp_port}"]},
                "dns": {"nameservers": [f"127.0.0.1:{dns.port}"], "timeout": "2s"},
                "delivery": FAST
                | {
                    "port": smtp_port,
                    "routes": {"acme.test": bounces.address, "routeloop.test": f"127.0.0.1:{smtp_port}"},
                },
            }
        )
        d.admin("ipcred.add", tenant="acme", login="alice", cidr="127.0.0.0/16")  # as the README suggests
        for rcpt in ("a@routeloop.test", "b@mxloop.test"):
            qid = submit(d, rcpt)
            rows = d.wait_mail_log(lambda rows: first(rows, "bounced") is not None, qid)
            response = first(rows, "bounced")["response"]  # type: ignore[index]
            assert "5.4.6" in response and "loops back to myself" in response, response
        dsns = bounces.wait_for(2)
        assert all(b"5.4.6" in m.data for m in dsns)
        assert d.admin("status")["accepted"] == 2  # nothing came back in
        assert d.admin("status")["loops"]["own_address"] == 2


def test_a_loop_through_another_mta_ends_at_max_hops_with_5_4_6(make_cmcd: Any, bounces: Sink) -> None:
    """A relay that hands every message back to cmcd (as a forwarding MX would): each pass adds a
    Received: field; at smtp.max_hops intake refuses with 554 5.4.6, and the relay's refusal bounces."""
    holder: dict[str, Cmcd] = {}

    def forward(sender: str, rcpts: list[str], body: bytes) -> str:
        d = holder["d"]
        try:
            with smtplib.SMTP("127.0.0.1", d.smtp_port, local_hostname="relay.test", timeout=30) as c:
                c.starttls(context=d.client_context())
                c.login("alice", PASSWORD)
                c.sendmail(sender, rcpts, body)
        except smtplib.SMTPDataError as exc:
            return f"{exc.smtp_code} {exc.smtp_error.decode()}"
        return "250 2.0.0 relayed"

    with BadMx("127.0.0.2", mode="relay", forward=forward) as relay:
        d = make_cmcd(
            {
                "smtp": {"max_hops": 8},
                "delivery": FAST | {"routes": {"acme.test": bounces.address, "*": relay.address}},
            }
        )
        holder["d"] = d
        qid = submit(d, "rcpt@loop.test")
        dsn = bounces.wait_for(1, timeout=60)[0]
        assert b"5.4.6" in dsn.data and b"Too many hops" in dsn.data
        rows = d.wait_mail_log(lambda rows: any(r["event"] == "bounced" for r in rows))
        bounced = [r for r in rows if r["event"] == "bounced"]
        assert len(bounced) == 1 and "554 5.4.6" in bounced[0]["response"]
        assert relay.messages == 8  # hops 1..8 relayed; the 8th pass was refused at intake
        assert d.admin("status")["loops"]["intake"] == 1
        assert first(d.mail_log(qid), "delivered") is not None


def test_a_queued_message_over_max_hops_is_bounced_before_delivery(make_cmcd: Any, bounces: Sink) -> None:
    hops = "".join(f"Received: from h{i}.test by h{i + 1}.test; Thu, 3 Dec 2026 10:00:00 +0000\r\n" for i in range(5))
    with Sink("127.0.0.3", free_port("127.0.0.3")) as sink:
        d = make_cmcd({"delivery": FAST | {"enabled": False}})
        qid = submit(d, "rcpt@dst.test", hops.encode() + message(to="rcpt@dst.test"))
        d.stop()
        d.config["smtp"]["max_hops"] = 3  # lowered while the message waited
        d.config["delivery"] = FAST | {"routes": {"acme.test": bounces.address, "*": sink.address}}
        d.write_config()
        d.start()
        rows = d.wait_mail_log(lambda rows: first(rows, "bounced") is not None, qid)
        assert "5.4.6 too many hops (6 Received: fields)" in first(rows, "bounced")["response"]  # type: ignore[index]
        bounces.wait_for(1)
        assert sink.transactions == 0 and d.admin("status")["loops"]["hops"] == 1


# -- DNS and crashes --------------------------------------------------------------------------------


def test_mx_hosts_that_do_not_exist_bounce_instead_of_five_days_of_retries(make_cmcd: Any, bounces: Sink) -> None:
    with DnsServer() as dns:
        dns.add("gone.test", "MX", "10 mx1.nowhere.test.", "20 mx2.nowhere.test.")
        dns.add("half.test", "MX", "10 mx1.nowhere.test.", "20 mx.servfail.test.")
        dns.add("mx.servfail.test", "A", "127.0.0.5")
        dns.servfail("mx.servfail.test")
        d = make_cmcd(
            {
                "dns": {"nameservers": [f"127.0.0.1:{dns.port}"], "timeout": "1s"},
                "delivery": FAST | {"routes": {"acme.test": bounces.address}, "retry_schedule": ["1h"]},
            }
        )
        gone = submit(d, "a@gone.test")
        rows = d.wait_mail_log(lambda rows: first(rows, "bounced") is not None, gone)
        assert "5.4.4" in first(rows, "bounced")["response"]  # type: ignore[index]
        half = submit(d, "b@half.test")  # one MX host temporarily unresolvable: a deferral, not a bounce
        rows = d.wait_mail_log(lambda rows: first(rows, "deferred") is not None, half)
        assert first(rows, "bounced") is None


def test_recipients_in_flight_at_a_kill_are_counted_as_possible_duplicates(make_cmcd: Any) -> None:
    with BadMx("127.0.0.2", mode="stall_in_data") as mx:
        d = make_cmcd({"delivery": FAST | {"routes": {"*": mx.address}, "data_xfer_timeout": "60s"}})
        submit(d, "rcpt@dst.test", message(to="rcpt@dst.test", body="x" * 2_000_000))
        assert mx.stalled.wait(20)
        d.kill9()
        d.config["delivery"]["enabled"] = False
        d.write_config()
        d.start()
        assert d.admin("status")["possible_duplicates"] == 1
        d.wait_log("event=possible_duplicate reason=restart recipients=1")


def test_a_message_with_too_many_hops_is_refused_at_intake(make_cmcd: Any) -> None:
    d = make_cmcd({"smtp": {"max_hops": 4}})
    hops = "".join(f"Received: from h{i}.test by h{i + 1}.test; Thu, 3 Dec 2026 10:00:00 +0000\r\n" for i in range(4))
    with d.smtp() as c:
        c.mail("alice@acme.test")
        c.rcpt("rcpt@dst.test")
        code, reply = c.data(hops.encode() + message())
        assert (code, reply[:5]) == (554, b"5.4.6"), reply
        c.mail("alice@acme.test")
        c.rcpt("rcpt@dst.test")
        code, reply = c.data(message())
        assert code == 250, reply  # the session goes on
        assert queue_id(reply)
