"""Delivery end to end: the real daemon, a DNS server on a loopback port, SMTP sinks on 127.0.0.x.

Every test submits over SMTP AUTH (smtplib), lets cmcd resolve MX records from the test DNS
server and deliver to sinks listening on one shared port on several loopback addresses, and
then reads what the sinks received, the mail log and the spool.
"""

from __future__ import annotations

import sqlite3
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.conftest import Cmcd, message, queue_id, wait_until
from tests.peers import BlackHole, DnsServer, Sink, free_port

FAST = {
    "enabled": True,
    "routes": {},
    "retry_schedule": ["1s"],
    "retry_jitter": 0.0,
    "connect_timeout": "2s",
    "command_timeout": "3s",
    "data_timeout": "3s",
    "dead_site_backoff": "2s",
    "connection_idle": "0.5s",
}


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer() as server:
        server.add("acme.test", "MX", "10 mx.acme.test.")
        server.add("mx.acme.test", "A", "127.0.0.9")
        yield server


@pytest.fixture
def port() -> int:
    """One port for every sink of a test (cmcd's delivery.port), free on the addresses used."""
    return free_port("127.0.0.1")


@pytest.fixture
def bounces(port: int) -> Iterator[Sink]:
    """The MX of acme.test (the senders' domain): where bounces arrive."""
    with Sink("127.0.0.9", port) as sink:
        yield sink


def start(make_cmcd: Any, dns: DnsServer, port: int, workers: int | None = None, **delivery: Any) -> Cmcd:
    return make_cmcd(
        {
            "dns": {"nameservers": [f"127.0.0.1:{dns.port}"], "timeout": "2s"},
            "delivery": FAST | {"port": port} | delivery,
        }
        | ({"server": {"workers": workers}} if workers is not None else {})
    )


def submit(d: Cmcd, rcpts: list[str], data: bytes | None = None) -> str:
    """Send one message and return its queue id (from the 250 reply)."""
    with d.smtp() as c:
        c.mail("alice@acme.test")
        for r in rcpts:
            code, _ = c.rcpt(r)
            assert code == 250
        code, reply = c.data(data or message(to=rcpts[0]))
        assert code == 250, reply
        return queue_id(reply)


def final(rows: list[dict[str, Any]], n: int) -> bool:
    return sum(r["event"] in ("delivered", "bounced", "expired", "suppressed") for r in rows) >= n


def events(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(r["rcpt"], r["event"]) for r in rows if r["event"] != "accepted"]


def spool_bytes(d: Cmcd) -> bytes:
    spool = Path(d.config["spool"]["dir"])
    return b"".join(p.read_bytes() for p in spool.iterdir() if p.is_file())


def outbox_events(d: Cmcd, qid: str) -> list[str]:
    """The events of QID in its shard's outbox (committed, not yet shipped to the store), oldest first."""
    conn = sqlite3.connect(f"file:{d.shard_file(qid)}?mode=ro", uri=True)
    try:
        return [e for (e,) in conn.execute("SELECT event FROM events WHERE queue_id = ? ORDER BY id", (qid,))]
    finally:
        conn.close()


def queue_rows(d: Cmcd) -> tuple[int, int]:
    """(messages, recipients) in every shard of the spool."""
    messages = recipients = 0
    for shard in d.shards():
        conn = sqlite3.connect(f"file:{shard}?mode=ro", uri=True)
        try:
            messages += conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
            recipients += conn.execute("SELECT COUNT(*) FROM recipients").fetchone()[0]
        finally:
            conn.close()
    return messages, recipients


# -- the basic path ------------------------------------------------------------------------


def test_mx_delivery_is_byte_exact_and_the_body_is_erased(make_cmcd: Any, dns: DnsServer, port: int) -> None:
    dns.add("dst.test", "MX", "10 mx1.dst.test.")
    dns.add("mx1.dst.test", "A", "127.0.0.2")
    with Sink("127.0.0.2", port) as sink:
        d = start(make_cmcd, dns, port)
        # a line holding only "." and lines starting with dots must survive dot-stuffing both ways
        data = message(to="rcpt@dst.test", body="line one\r\n.\r\n..two dots\r\n.leading\r\nend")
        qid = submit(d, ["rcpt@dst.test"], data)
        ciphertext = _ciphertext(d, qid)
        (got,) = sink.wait_for(1)
        assert got.rcpt_tos == ["rcpt@dst.test"] and got.mail_from == "alice@acme.test"
        body = got.data
        assert body.endswith(data.split(b"\r\n\r\n", 1)[1]) and b"\r\n.\r\n..two dots\r\n.leading\r\n" in body
        assert body.count(b"\r\n\r\n") >= 1 and b"Received: from client.test" in body
        rows = d.wait_mail_log(lambda rows: final(rows, 1), qid)
        delivered = [r for r in rows if r["event"] == "delivered"][0]
        assert delivered["rcpt"] == "rcpt@dst.test" and delivered["response"].startswith("250")
        assert delivered["mx"] == "mx1.dst.test" and delivered["ip"] == "127.0.0.2" and delivered["attempt"] == 1
        assert delivered["size"] > 0 and delivered["message_id"].startswith("<")
        # the body and its rows are gone; after the checkpoint its bytes are in no spool file
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (queue_rows(d) != (0, 0) or ciphertext[:64] in spool_bytes(d)):
            time.sleep(0.2)
        assert queue_rows(d) == (0, 0)
        assert ciphertext[:64] not in spool_bytes(d)


def _ciphertext(d: Cmcd, qid: str) -> bytes:
    conn = sqlite3.connect(f"file:{d.shard_file(qid)}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT body FROM messages WHERE queue_id = ?", (qid,)).fetchone()
    finally:
        conn.close()
    return bytes(row[0]) if row else b""


def test_mx_preference_order_and_fallback_to_the_next_host(make_cmcd: Any, dns: DnsServer, port: int) -> None:
    dns.add("dst.test", "MX", "10 mx1.dst.test.", "20 mx2.dst.test.", "30 mx3.dst.test.")
    dns.add("mx1.dst.test", "A", "127.0.0.2")  # nothing listens there: connection refused
    dns.add("mx2.dst.test", "A", "127.0.0.3")
    dns.add("mx3.dst.test", "A", "127.0.0.4")
    with Sink("127.0.0.3", port) as second, Sink("127.0.0.4", port) as third:
        d = start(make_cmcd, dns, port)
        qid = submit(d, ["rcpt@dst.test"])
        second.wait_for(1)
        rows = d.wait_mail_log(lambda rows: final(rows, 1), qid)
        assert [r["mx"] for r in rows if r["event"] == "delivered"] == ["mx2.dst.test"]
        assert third.messages == []


def test_implicit_mx_uses_the_domains_own_address(make_cmcd: Any, dns: DnsServer, port: int) -> None:
    dns.add("plain.test", "A", "127.0.0.5")
    with Sink("127.0.0.5", port) as sink:
        d = start(make_cmcd, dns, port)
        qid = submit(d, ["rcpt@plain.test"])
        sink.wait_for(1)
        rows = d.wait_mail_log(lambda rows: final(rows, 1), qid)
        assert [(r["event"], r["mx"]) for r in rows if r["event"] != "accepted"] == [("delivered", "plain.test")]


def test_null_mx_and_nxdomain_bounce_to_the_sender(make_cmcd: Any, dns: DnsServer, port: int, bounces: Sink) -> None:
    dns.add("null.test", "MX", "0 .")
    d = start(make_cmcd, dns, port)
    qid = submit(d, ["rcpt@null.test", "rcpt@nosuch.test"])
    rows = d.wait_mail_log(lambda rows: final(rows, 2), qid)
    by_rcpt = {r["rcpt"]: r for r in rows if r["event"] == "bounced"}
    assert "5.1.10" in by_rcpt["rcpt@null.test"]["response"]
    assert "5.1.2" in by_rcpt["rcpt@nosuch.test"]["response"]
    dsns = bounces.wait_for(1)
    assert dsns[0].mail_from == "" and dsns[0].rcpt_tos == ["alice@acme.test"]
    report = dsns[0].data
    assert b"multipart/report; report-type=delivery-status" in report
    assert b"Final-Recipient: rfc822; rcpt@null.test" in report and b"Status: 5.1.10" in report
    assert b"Final-Recipient: rfc822; rcpt@nosuch.test" in report
    assert b"Subject: hello" in report  # the original headers ...
    assert b"\r\nhi\r\n" not in report  # ... but never the original body


def test_servfail_defers_then_the_retry_delivers(make_cmcd: Any, dns: DnsServer, port: int) -> None:
    dns.add("dst.test", "MX", "10 mx1.dst.test.")
    dns.add("mx1.dst.test", "A", "127.0.0.2")
    dns.servfail("dst.test", times=1)
    with Sink("127.0.0.2", port) as sink:
        d = start(make_cmcd, dns, port)
        qid = submit(d, ["rcpt@dst.test"])
        sink.wait_for(1, timeout=20)
        rows = d.wait_mail_log(lambda rows: final(rows, 1), qid)
        assert [e for _, e in events(rows)] == ["deferred", "delivered"]
        assert "4.4.3" in rows[1]["response"]


def test_451_is_retried_on_schedule_then_delivered(make_cmcd: Any, dns: DnsServer, port: int) -> None:
    dns.add("dst.test", "MX", "10 mx1.dst.test.")
    dns.add("mx1.dst.test", "A", "127.0.0.2")
    with Sink("127.0.0.2", port, data_replies=["451 4.3.0 try again later"]) as sink:
        d = start(make_cmcd, dns, port)
        qid = submit(d, ["rcpt@dst.test"])
        rows = d.wait_mail_log(lambda rows: final(rows, 1), qid)
        deferred, delivered = [r for r in rows if r["event"] != "accepted"]
        assert deferred["event"] == "deferred" and deferred["response"] == "451 4.3.0 try again later"
        assert deferred["attempt"] == 1 and delivered["attempt"] == 2 and delivered["event"] == "delivered"
        assert delivered["ts"] - deferred["ts"] >= 0.9  # the 1 s schedule, not at once
        assert len(sink.messages) == 1


def test_550_bounces_suppresses_and_a_later_message_is_not_attempted(
    make_cmcd: Any, dns: DnsServer, port: int, bounces: Sink
) -> None:
    dns.add("dst.test", "MX", "10 mx1.dst.test.")
    dns.add("mx1.dst.test", "A", "127.0.0.2")

    def refuse(address: str) -> str | None:
        return "550 5.1.1 no such user here" if address.startswith("gone@") else None

    with Sink("127.0.0.2", port, rcpt_reply=refuse) as sink:
        d = start(make_cmcd, dns, port)
        qid = submit(d, ["gone@dst.test", "ok@dst.test"])  # partial acceptance: one transaction
        rows = d.wait_mail_log(lambda rows: final(rows, 2), qid)
        assert sorted(events(rows)) == [("gone@dst.test", "bounced"), ("ok@dst.test", "delivered")]
        assert [m.rcpt_tos for m in sink.wait_for(1)] == [["ok@dst.test"]]
        (dsn,) = bounces.wait_for(1)
        assert b"Final-Recipient: rfc822; gone@dst.test" in dsn.data and b"Status: 5.1.1" in dsn.data
        assert b"ok@dst.test" not in dsn.data.split(b"text/rfc822-headers")[0]
        assert [s["address"] for s in d.admin("suppression.list", tenant="acme")] == ["gone@dst.test"]
        # a suppression delivery made in one worker reaches the others' caches within their directory
        # poll (0.25 s); an operator's change (this one changes nothing) makes every worker read it now
        d.admin("tenant.set", name="acme", suppressed_rcpt="accept")

        later = submit(d, ["gone@dst.test"])
        rows = d.wait_mail_log(lambda rows: final(rows, 1), later)
        assert events(rows) == [("gone@dst.test", "suppressed")]
        assert len(sink.messages) == 1  # never attempted

        d.admin("tenant.set", name="acme", suppressed_rcpt="refuse")  # in effect when it returns
        with d.smtp() as c:
            c.mail("alice@acme.test")
            code, reply = c.rcpt("gone@dst.test")
            assert (code, reply[:5]) == (550, b"5.7.1")
            assert c.rcpt("GONE@dst.test")[0] == 550  # the index ignores case
        # the other tenant never suppressed it
        with d.smtp(login="bob") as c:
            c.mail("bob@beta.test")
            assert c.rcpt("gone@dst.test")[0] == 250


def test_dsn_can_be_turned_off_per_tenant(make_cmcd: Any, dns: DnsServer, port: int, bounces: Sink) -> None:
    dns.add("null.test", "MX", "0 .")
    d = start(make_cmcd, dns, port)
    d.admin("tenant.set", name="acme", dsn=False)  # in effect when it returns
    qid = submit(d, ["rcpt@null.test"])
    d.wait_mail_log(lambda rows: final(rows, 1), qid)
    # a bounce is queued in the transaction that writes the final state: none is, so none is sent
    assert d.admin("queue.list")["items"] == []
    assert bounces.messages == []


def test_a_black_holed_destination_does_not_delay_others(make_cmcd: Any, dns: DnsServer, port: int) -> None:
    dns.add("slow.test", "MX", "10 mx.slow.test.")
    dns.add("mx.slow.test", "A", "127.0.0.6")
    dns.add("dst.test", "MX", "10 mx1.dst.test.")
    dns.add("mx1.dst.test", "A", "127.0.0.2")
    with BlackHole("127.0.0.6", port) as hole, Sink("127.0.0.2", port) as sink:
        d = start(make_cmcd, dns, port, command_timeout="4s", retry_schedule=["1h"])
        stuck = submit(d, ["rcpt@slow.test"])
        wait_until(lambda: hole.connections >= 1, "cmcd connected to the black hole")
        first = time.monotonic()
        for _ in range(5):
            submit(d, ["rcpt@dst.test"])
        sink.wait_for(5)
        assert time.monotonic() - first < 3.5  # delivered while the black hole still holds its connection
        assert hole.connections >= 1
        rows = d.wait_mail_log(lambda rows: any(r["event"] == "deferred" for r in rows), stuck, timeout=15)
        assert "timed out" in [r for r in rows if r["event"] == "deferred"][0]["response"]


def test_tls_is_used_when_offered(make_cmcd: Any, dns: DnsServer, port: int, ca: trustme.CA) -> None:
    dns.add("dst.test", "MX", "10 mx1.dst.test.")
    dns.add("mx1.dst.test", "A", "127.0.0.2")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx1.dst.test").configure_cert(ctx)
    with Sink("127.0.0.2", port, tls_context=ctx) as sink:
        d = start(make_cmcd, dns, port)
        qid = submit(d, ["rcpt@dst.test"])
        (got,) = sink.wait_for(1)
        assert got.tls
        rows = d.wait_mail_log(lambda rows: final(rows, 1), qid)
        assert [r["tls"] for r in rows if r["event"] == "delivered"] == ["TLSv1.3"]


def test_one_transaction_per_domain(make_cmcd: Any, dns: DnsServer, port: int) -> None:
    for name, ip in (("one.test", "127.0.0.2"), ("two.test", "127.0.0.3")):
        dns.add(name, "MX", f"10 mx.{name}.")
        dns.add(f"mx.{name}", "A", ip)
    with Sink("127.0.0.2", port) as one, Sink("127.0.0.3", port) as two:
        d = start(make_cmcd, dns, port)
        submit(d, ["a@one.test", "b@two.test"])
        assert [m.rcpt_tos for m in one.wait_for(1)] == [["a@one.test"]]
        assert [m.rcpt_tos for m in two.wait_for(1)] == [["b@two.test"]]
        submit(d, ["c@one.test", "d@one.test"])
        one.wait_for(2)
        assert one.messages[1].rcpt_tos == ["c@one.test", "d@one.test"]
        assert one.transactions == 2


def test_expired_recipients_bounce_after_max_lifetime(make_cmcd: Any, dns: DnsServer, port: int, bounces: Sink) -> None:
    dns.add("dst.test", "MX", "10 mx1.dst.test.")
    dns.add("mx1.dst.test", "A", "127.0.0.2")
    with Sink("127.0.0.2", port, rcpt_reply=lambda a: "450 4.2.1 mailbox busy"):
        d = start(make_cmcd, dns, port, max_lifetime="2s")
        qid = submit(d, ["rcpt@dst.test"])
        rows = d.wait_mail_log(lambda rows: final(rows, 1), qid, timeout=20)
        assert events(rows)[-1] == ("rcpt@dst.test", "expired")
        assert {e for _, e in events(rows)[:-1]} <= {"deferred"}
        (dsn,) = bounces.wait_for(1)
        assert b"delivery time expired" in dsn.data and b"Status: 4.2.1" in dsn.data


def test_dead_site_defers_without_connecting(make_cmcd: Any, dns: DnsServer, port: int) -> None:
    dns.add("down.test", "MX", "10 mx.down.test.")
    dns.add("mx.down.test", "A", "127.0.0.7")  # nothing listens
    # one process: what a worker learned about a dead site is its own (each worker probes it once)
    d = start(make_cmcd, dns, port, 1, initial_concurrency=1, dead_site_backoff="1h", retry_schedule=["1h"])
    first = submit(d, ["a@down.test"])
    d.wait_mail_log(lambda rows: any(r["event"] == "deferred" for r in rows), first)
    d.wait_log("event=site_dead")
    second = submit(d, ["b@down.test"])
    rows = d.wait_mail_log(lambda rows: any(r["event"] == "deferred" for r in rows), second)
    assert "refused" in rows[-1]["response"].lower() or "connect" in rows[-1]["response"]
    assert sum("event=connect_failed" in line for line in d.log) == 1  # the second never connected


def test_per_domain_connection_limit_and_message_rate(make_cmcd: Any, dns: DnsServer, port: int) -> None:
    for name, ip in (("limited.test", "127.0.0.2"), ("paced.test", "127.0.0.3")):
        dns.add(name, "MX", f"10 mx.{name}.")
        dns.add(f"mx.{name}", "A", ip)
    with Sink("127.0.0.2", port, data_delay=0.2) as limited, Sink("127.0.0.3", port) as paced:
        policies = {"limited.test": {"connection_limit": 2}, "paced.test": {"rate": "4/s"}}
        d = start(make_cmcd, dns, port, domains=policies, connection_limit=10, initial_concurrency=10)
        with d.smtp() as c:
            for n in range(8):
                c.sendmail("alice@acme.test", [f"r{n}@limited.test"], message(to=f"r{n}@limited.test"))
            for n in range(8):
                c.sendmail("alice@acme.test", [f"r{n}@paced.test"], message(to=f"r{n}@paced.test"))
        most = 0
        deadline = time.monotonic() + 20
        while len(limited.messages) < 8 and time.monotonic() < deadline:
            most = max(most, limited.active)
            time.sleep(0.01)
        assert len(limited.messages) == 8 and 1 <= most <= 2
        paced.wait_for(8)
        rows = d.wait_mail_log(lambda rows: sum(r["event"] == "delivered" for r in rows) == 16)
        times = sorted(r["ts"] for r in rows if r["event"] == "delivered" and r["rcpt"].endswith("@paced.test"))
        # 4/s with a burst of 4: the last of 8 cannot go before about one second after the first
        assert times[-1] - times[0] >= 0.8


def test_a_connection_the_server_dropped_while_idle_is_not_a_deferral(
    make_cmcd: Any, dns: DnsServer, port: int
) -> None:
    dns.add("dst.test", "MX", "10 mx1.dst.test.")
    dns.add("mx1.dst.test", "A", "127.0.0.2")
    with Sink("127.0.0.2", port, timeout=0.3) as sink:  # aiosmtpd closes a session idle for 0.3 s
        d = start(make_cmcd, dns, port, connection_idle="5s")
        first = submit(d, ["a@dst.test"])
        sink.wait_for(1)
        # cmcd still holds the connection; the server has closed it
        wait_until(lambda: sink.active == 0, "the sink closed the idle session", timeout=10)
        second = submit(d, ["b@dst.test"])
        sink.wait_for(2)
        for q in (first, second):
            rows = d.wait_mail_log(lambda rows: final(rows, 1), q)
            assert [e for _, e in events(rows)] == ["delivered"]
        assert sink.connections == 2


def test_domains_sharing_a_next_hop_share_a_transaction(make_cmcd: Any, dns: DnsServer, port: int) -> None:
    with Sink("127.0.0.2", port) as hop:
        d = start(make_cmcd, dns, port, routes={"*": hop.address}, domains={"own.test": {"rate": "100/s"}})
        qid = submit(d, ["a@x.test", "b@y.test", "c@z.test", "d@own.test"])
        got = hop.wait_for(2)
        assert sorted(m.rcpt_tos for m in got) == [["a@x.test", "b@y.test", "c@z.test"], ["d@own.test"]]
        rows = d.wait_mail_log(lambda rows: final(rows, 4), qid)
        assert {(r["rcpt"], r["rcpt_domain"]) for r in rows if r["event"] == "delivered"} == {
            ("a@x.test", "x.test"),
            ("b@y.test", "y.test"),
            ("c@z.test", "z.test"),
            ("d@own.test", "own.test"),
        }


def test_a_failed_tls_handshake_defers_unless_the_domain_allows_plain_text(
    make_cmcd: Any, dns: DnsServer, port: int, ca: trustme.CA
) -> None:
    for name, ip in (("strict.test", "127.0.0.2"), ("lenient.test", "127.0.0.3")):
        dns.add(name, "MX", f"10 mx.{name}.")
        dns.add(f"mx.{name}", "A", ip)
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # offers STARTTLS, but no cipher cmcd's client has in common
    ca.issue_cert("mx.strict.test").configure_cert(old)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    old.set_ciphers("PSK-AES128-CBC-SHA")
    with Sink("127.0.0.2", port, tls_context=old) as strict, Sink("127.0.0.3", port, tls_context=old) as lenient:
        d = start(make_cmcd, dns, port, retry_schedule=["1h"], domains={"lenient.test": {"tls": "opportunistic+plain"}})
        deferred = submit(d, ["a@strict.test"])
        plain = submit(d, ["b@lenient.test"])
        rows = d.wait_mail_log(lambda rows: len(rows) > 1, deferred)
        assert rows[1]["event"] == "deferred" and rows[1]["response"].startswith("4.7.5")
        assert strict.messages == []
        (got,) = lenient.wait_for(1)
        assert got.tls is False
        rows = d.wait_mail_log(lambda rows: final(rows, 1), plain)
        assert [(r["event"], r["tls"]) for r in rows[1:]] == [("delivered", "")]


def test_a_bounce_that_bounces_is_dropped_not_bounced_again(make_cmcd: Any, dns: DnsServer, port: int) -> None:
    dns.remove("acme.test", "MX")
    dns.add("acme.test", "MX", "0 .")  # the sender's own domain takes no mail: its bounce cannot be delivered
    dns.add("null.test", "MX", "0 .")
    d = start(make_cmcd, dns, port)
    qid = submit(d, ["rcpt@null.test"])
    d.wait_mail_log(lambda rows: final(rows, 1), qid)
    line = d.wait_log("event=bounce_dropped")
    rows = d.mail_log()
    bounce_ids = {r["queue_id"] for r in rows if r["sender"] == ""}
    assert len(bounce_ids) == 1 and "5.1.10" in line
    assert [r["event"] for r in rows if r["queue_id"] in bounce_ids] == ["accepted", "bounced"]
    # a bounce is queued in the transaction that writes the final state (the bounce's "bounced" row,
    # seen above): the queue is empty, so no bounce of the bounce was queued
    assert d.admin("queue.list")["items"] == []
    assert sum("event=bounce_queued" in line for line in d.log) == 1  # the original's bounce only
    assert len({r["queue_id"] for r in d.mail_log()}) == 2  # no bounce of the bounce


def test_a_reset_after_the_dot_defers_and_counts_a_possible_duplicate(make_cmcd: Any) -> None:
    """A server that takes the whole message and resets before its reply: deferred, retried, never lost."""
    import socket
    import struct
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.2", 0))
    listener.listen(8)
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as lines:
            conn.sendall(b"220 evil.test\r\n")
            for line in lines:  # no PIPELINING offered: one command, one reply
                verb = line[:4].upper()
                if verb == b"EHLO":
                    conn.sendall(b"250 evil.test\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go ahead\r\n")
                    for body_line in lines:
                        if body_line == b".\r\n":
                            break
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, no reply
                    return
                else:
                    conn.sendall(b"250 OK\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with Sink("127.0.0.3", free_port("127.0.0.3")) as second:
            d = make_cmcd({"delivery": FAST | {"routes": {"*": f"127.0.0.2:{port}"}, "retry_schedule": ["1s"]}})
            qid = submit(d, ["rcpt@dst.test"])
            rows = d.wait_mail_log(lambda rows: any(r["event"] == "deferred" for r in rows), qid)
            deferred = [r for r in rows if r["event"] == "deferred"][0]
            assert "possible duplicate" in deferred["response"]
            assert d.admin("status")["possible_duplicates"] == 1
            thread.join(5)
            # the next attempt goes to a well-behaved server: delivered, nothing lost
            d.config["delivery"]["routes"] = {"*": second.address}
            d.write_config()
            assert d.proc is not None
            d.proc.send_signal(__import__("signal").SIGHUP)
            d.wait_log("event=reloaded")
            second.wait_for(1, timeout=20)
            d.wait_mail_log(lambda rows: final(rows, 1), qid)
    finally:
        listener.close()


def test_a_dns_server_that_stops_answering_defers_then_recovers(make_cmcd: Any, dns: DnsServer, port: int) -> None:
    dns.add("dst.test", "MX", "10 mx1.dst.test.")
    dns.add("mx1.dst.test", "A", "127.0.0.2")
    dns.blackhole("dst.test")
    with Sink("127.0.0.2", port) as sink:
        d = start(make_cmcd, dns, port)
        qid = submit(d, ["rcpt@dst.test"])
        rows = d.wait_mail_log(lambda rows: any(r["event"] == "deferred" for r in rows), qid)
        assert "4.4.3" in [r for r in rows if r["event"] == "deferred"][0]["response"]
        dns.clear_faults()
        sink.wait_for(1, timeout=20)
        rows = d.wait_mail_log(lambda rows: final(rows, 1), qid)
        assert [e for _, e in events(rows)][-1] == "delivered"


def test_the_store_locked_by_another_process_loses_nothing(make_cmcd: Any) -> None:
    d = make_cmcd()
    lock = sqlite3.connect(str(d.root / "cmcd.db"), timeout=5, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")  # another process holds the store: no reader, no writer gets in
        qid = submit(d, ["rcpt@dst.test"])  # intake does not wait for the store: the spool keeps the event
        assert outbox_events(d, qid) == ["accepted"]  # kept by the spool while the store is held
        # the clock is the subject: the store stays held across at least one shipping round (every
        # 0.5 s), so the shipper meets the lock; nothing the daemon shows says it has, so time it
        time.sleep(1.0)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    rows = d.wait_mail_log(lambda rows: len(rows) == 1, qid)
    assert rows[0]["event"] == "accepted"
    assert qid in d.spooled()
