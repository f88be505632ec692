"""Delivery to and through real peers: Debian's nsd serving the MX records, a real Postfix as the
receiving MX (with STARTTLS), and Postfix's smtp-sink taking a burst over reused connections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.conftest import message
from tests.e2e.test_delivery import FAST, final, submit
from tests.peers import DnsServer, Nsd, PostfixMx, Sink, SmtpSinkProcess, free_port

pytestmark = pytest.mark.peer


def test_mx_records_served_by_nsd(make_cmcd: Any) -> None:
    port = free_port("127.0.0.1")
    zones = {"dst.test": [("@", "MX", "10 mx1.dst.test."), ("@", "MX", "20 mx2.dst.test."), ("mx1", "A", "127.0.0.2"),
                          ("mx2", "A", "127.0.0.3")]}  # fmt: skip
    with Nsd(zones) as nsd, Sink("127.0.0.3", port) as sink:  # mx1 refuses connections: mx2 takes it
        d = make_cmcd({"dns": {"nameservers": [nsd.address]}, "delivery": FAST | {"port": port}})
        qid = submit(d, ["rcpt@dst.test"])
        assert sink.wait_for(1)[0].rcpt_tos == ["rcpt@dst.test"]
        rows = d.wait_mail_log(lambda rows: final(rows, 1), qid)
        assert [(r["event"], r["mx"]) for r in rows[1:]] == [("delivered", "mx2.dst.test")]
        # a domain nsd is not authoritative for is REFUSED: a temporary DNS failure, so deferred, never bounced
        other = submit(d, ["rcpt@elsewhere.test"])
        rows = d.wait_mail_log(lambda rows: len(rows) > 1, other)
        assert rows[1]["event"] == "deferred" and "4.4.3" in rows[1]["response"]


def test_a_real_postfix_as_the_receiving_mx(make_cmcd: Any, ca: trustme.CA, tmp_path: Path) -> None:
    cert = ca.issue_cert("mx1.dst.test")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "mx.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "mx.key"))
    with PostfixMx(["dst.test"], "127.0.0.2", tls_cert=tmp_path / "mx.pem", tls_key=tmp_path / "mx.key") as mx:
        with DnsServer() as dns:
            dns.add("dst.test", "MX", "10 mx1.dst.test.")
            dns.add("mx1.dst.test", "A", "127.0.0.2")
            d = make_cmcd({"dns": {"nameservers": [dns.address]}, "delivery": FAST | {"port": mx.port}})
            body = "first\r\n.\r\n..two\r\nlast"
            qids = [submit(d, ["one@dst.test", "two@dst.test"], message(to="one@dst.test", body=body))]
            qids.append(submit(d, ["three@dst.test"]))
            got = mx.wait_for(3)  # the maildir holds one file per recipient
            for q in qids:
                rows = d.wait_mail_log(lambda rows: final(rows, 1), q)
                assert all(r["tls"].startswith("TLSv1.") for r in rows if r["event"] == "delivered")
            first = [m for m in got if b"first" in m]
            assert len(first) == 2
            assert b"\nfirst\n.\n..two\nlast\n" in first[0]  # dot-stuffing undone by Postfix, byte for byte
            assert b"Received: from client.test" in first[0] and b"Subject: hello" in first[0]
            assert b"with ESMTPS" in first[0] and b"mx.cmcd.test" in first[0]  # Postfix saw TLS from cmcd


def test_a_burst_to_smtp_sink_over_reused_connections(make_cmcd: Any) -> None:
    with SmtpSinkProcess("127.0.0.1") as sink:
        d = make_cmcd({"delivery": FAST | {"routes": {"*": sink.address}, "connection_limit": 3}})
        n = 60
        with d.smtp() as c:
            for i in range(n):
                c.sendmail("alice@acme.test", [f"r{i}@dst.test"], message(to=f"r{i}@dst.test"))
        sink.wait_for(n, timeout=30)
        rows = d.wait_mail_log(lambda rows: sum(r["event"] == "delivered" for r in rows) == n)
        assert sum(r["event"] == "delivered" for r in rows) == n
        status = d.admin("status")
        assert status["delivery"]["delivered"] == n
