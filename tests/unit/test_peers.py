"""The test peers in tests/peers.py do what delivery tests will rely on."""

from __future__ import annotations

import smtplib
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import dns.asyncquery
import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest
import trustme

from tests.peers import (
    POSTFIX_DIR,
    BlackHole,
    DnsServer,
    Nsd,
    PostfixMx,
    Sink,
    SmtpSinkProcess,
    check_loopback,
    closed_port,
    txt_rdata,
)

MESSAGE = (
    b"From: <a@acme.test>\r\nTo: <b@dst.test>\r\nSubject: hi\r\n\r\n.a line that starts with a dot\r\n..two\r\nend\r\n"
)
DKIM_KEY = "v=DKIM1; k=rsa; p=" + "A" * 392  # as long as a 2048-bit RSA key: more than one TXT string


def smtp(host: str, port: int, timeout: float = 5) -> smtplib.SMTP:
    # local_hostname: smtplib's default is socket.getfqdn(), which would ask the machine's resolver
    return smtplib.SMTP(host, port, local_hostname="client.test", timeout=timeout)


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    return ctx


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


# -- DnsServer ---------------------------------------------------------------------------------------


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with DnsServer() as server:
        server.add("dst.test", "MX", "10 mx1.dst.test.", "20 mx2.dst.test")
        server.add("mx1.dst.test", "A", "127.0.0.2")
        server.add("mx2.dst.test", "A", "127.0.0.3")
        server.add("null.test", "MX", "0 .")
        server.add("sel._domainkey.acme.test", "TXT", DKIM_KEY)
        server.add("alias.dst.test", "CNAME", "mx1.dst.test.")
        yield server


async def test_dns_answers_mx_a_txt(dns_server: DnsServer) -> None:
    resolver = dns_server.resolver()
    mx = await resolver.resolve("dst.test", "MX")
    assert sorted((r.preference, str(r.exchange)) for r in mx) == [(10, "mx1.dst.test."), (20, "mx2.dst.test.")]
    assert [r.address for r in await resolver.resolve("mx1.dst.test", "A")] == ["127.0.0.2"]
    txt = await resolver.resolve("sel._domainkey.acme.test", "TXT")
    assert b"".join(txt[0].strings).decode() == DKIM_KEY
    assert len(txt[0].strings) == 2
    cname = await resolver.resolve("alias.dst.test", "A")
    assert [r.address for r in cname] == ["127.0.0.2"] and str(cname.canonical_name) == "mx1.dst.test."
    assert dns_server.queries[:2] == [("dst.test", "MX"), ("mx1.dst.test", "A")]
    assert dns_server.queried("dst.test", "MX") == 1


async def test_dns_null_mx(dns_server: DnsServer) -> None:
    answer = await dns_server.resolver().resolve("null.test", "MX")
    assert [(r.preference, str(r.exchange)) for r in answer] == [(0, ".")]


async def test_dns_nxdomain_and_nodata(dns_server: DnsServer) -> None:
    resolver = dns_server.resolver()
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolver.resolve("nowhere.test", "MX")
    with pytest.raises(dns.resolver.NoAnswer):
        await resolver.resolve("mx1.dst.test", "AAAA")
    with pytest.raises(dns.resolver.NoAnswer):  # an empty non-terminal exists too
        await resolver.resolve("_domainkey.acme.test", "TXT")
    reply = await dns.asyncquery.udp(dns.message.make_query("mx1.dst.test", "AAAA"), "127.0.0.1", 2, dns_server.port)
    assert reply.rcode() == dns.rcode.NOERROR and not reply.answer
    assert reply.authority[0].rdtype == dns.rdatatype.SOA and str(reply.authority[0].name) == "dst.test."
    dns_server.remove("mx1.dst.test", "A")
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolver.resolve("mx1.dst.test", "A")


async def test_dns_servfail_times_then_normal(dns_server: DnsServer) -> None:
    resolver = dns_server.resolver()
    dns_server.servfail("dst.test", times=2)
    for _ in range(2):
        with pytest.raises(dns.resolver.NoNameservers):
            await resolver.resolve("dst.test", "MX")
    assert len(await resolver.resolve("dst.test", "MX")) == 2
    dns_server.servfail("mx1.dst.test")
    for _ in range(3):
        with pytest.raises(dns.resolver.NoNameservers):
            await resolver.resolve("mx1.dst.test", "A")
    dns_server.clear_faults()
    assert len(await resolver.resolve("mx1.dst.test", "A")) == 1


async def test_dns_blackhole_times_out(dns_server: DnsServer) -> None:
    dns_server.blackhole("dst.test")
    with pytest.raises(dns.exception.Timeout):
        await dns_server.resolver(lifetime=0.3).resolve("dst.test", "MX")
    assert dns_server.queried("dst.test", "MX") >= 1


async def test_dns_truncation_falls_back_to_tcp(dns_server: DnsServer) -> None:
    dns_server.truncate("dst.test")
    assert len(await dns_server.resolver().resolve("dst.test", "MX")) == 2
    assert dns_server.tcp_queries == 1 and dns_server.queried("dst.test", "MX") == 2


def test_txt_rdata_and_loopback_guard() -> None:
    assert txt_rdata('"already"') == '"already"'
    assert txt_rdata('say "hi"') == '"say \\"hi\\""'
    assert txt_rdata("x" * 300) == f'"{"x" * 255}" "{"x" * 45}"'
    with pytest.raises(ValueError):
        check_loopback("10.0.0.1")
    with pytest.raises(ValueError):
        Sink("0.0.0.0")


async def test_dns_and_sink_on_ipv6_loopback() -> None:
    with DnsServer("::1") as server, Sink("::1") as sink:
        server.add("dst.test", "AAAA", "::1")
        answer = await server.resolver().resolve("dst.test", "AAAA")
        assert [r.address for r in answer] == ["::1"] and server.address == f"[::1]:{server.port}"
        with smtp("::1", sink.port) as client:
            client.sendmail("a@acme.test", ["b@dst.test"], MESSAGE)
        assert (await sink.wait_for_async(1))[0].peer[0] == "::1"


# -- Sink --------------------------------------------------------------------------------------------


def test_sink_receives_exact_bytes() -> None:
    with Sink("127.0.0.2") as sink:
        with smtp("127.0.0.2", sink.port) as client:
            assert client.sendmail("a@acme.test", ["b@dst.test", "c@dst.test"], MESSAGE) == {}
        (got,) = sink.wait_for(1)
        assert got.data == MESSAGE
        assert (got.mail_from, got.rcpt_tos, got.tls, got.helo) == (
            "a@acme.test",
            ["b@dst.test", "c@dst.test"],
            False,
            "client.test",
        )
        assert got.peer[0] == "127.0.0.1" and f"SIZE={len(MESSAGE)}" in got.mail_options
        assert (sink.connections, sink.transactions) == (1, 1)
        with pytest.raises(TimeoutError):
            sink.wait_for(2, timeout=0.05)
        with smtp("127.0.0.2", sink.port) as client:
            client.sendmail("", ["postmaster@dst.test"], MESSAGE)  # a bounce: null reverse-path
        assert sink.wait_for(2)[1].mail_from == ""
        assert (sink.connections, sink.transactions) == (2, 2)


def test_sink_starttls(ca: trustme.CA) -> None:
    with Sink("127.0.0.2", tls_context=server_context(ca, "127.0.0.2"), require_tls=True) as sink:
        with smtp("127.0.0.2", sink.port) as client:
            client.ehlo()
            assert client.has_extn("starttls")
            assert client.mail("a@acme.test")[0] == 530  # require_tls: nothing before STARTTLS
            client.starttls(context=client_context(ca))
            client.sendmail("a@acme.test", ["b@dst.test"], MESSAGE)
        (got,) = sink.wait_for(1)
        assert got.tls and got.data == MESSAGE
        assert sink.connections == 1


def test_sink_stops_with_a_session_open(ca: trustme.CA) -> None:
    sink = Sink(tls_context=server_context(ca, "127.0.0.1")).start()
    client = smtp("127.0.0.1", sink.port)
    client.starttls(context=client_context(ca))
    assert sink.active == 1
    sink.stop()
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.noop()
    client.close()


def test_sink_refuses_a_recipient_and_replies_451_then_250() -> None:
    refuse = {"nobody@dst.test": "550 5.1.1 no such user"}
    with Sink(rcpt_reply=refuse.get, data_replies=["451 4.3.0 try later"]) as sink:
        with smtp("127.0.0.1", sink.port) as client:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail("a@acme.test", ["b@dst.test"], MESSAGE)
            assert refused.value.smtp_code == 451
            client.rset()
            bad = client.sendmail("a@acme.test", ["b@dst.test", "nobody@dst.test"], MESSAGE)
            assert bad == {"nobody@dst.test": (550, b"5.1.1 no such user")}
        (got,) = sink.wait_for(1)
        assert got.rcpt_tos == ["b@dst.test"]
        assert sink.transactions == 2


# -- BlackHole, closed ports -------------------------------------------------------------------------


def test_blackhole_times_out_and_closed_port_refuses() -> None:
    with BlackHole("127.0.0.3") as hole:
        with socket.create_connection(("127.0.0.3", hole.port), timeout=0.2) as s:
            with pytest.raises(TimeoutError):
                s.recv(1)
        with pytest.raises(smtplib.SMTPServerDisconnected, match="timed out"):
            smtp("127.0.0.3", hole.port, timeout=0.2)
        assert hole.connections == 2
    with BlackHole(greeting=b"220 silent.test ESMTP\r\n") as hole, smtp("127.0.0.1", hole.port, timeout=0.2) as client:
        with pytest.raises(smtplib.SMTPServerDisconnected, match="timed out"):
            client.ehlo()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.4", closed_port("127.0.0.4")), timeout=1).close()


# -- Debian programs ---------------------------------------------------------------------------------


@pytest.mark.peer
def test_smtp_sink_process_counts_and_dumps() -> None:
    with SmtpSinkProcess(dump=True) as sink:
        with smtp("127.0.0.1", sink.port) as client:
            for _ in range(2):
                client.sendmail("a@acme.test", ["b@dst.test"], MESSAGE)
        assert sink.wait_for(2) == 2
    dumps = sink.messages()
    assert len(dumps) == 2
    assert b"X-Mail-Args: <a@acme.test>" in dumps[0]
    assert dumps[0].endswith(MESSAGE.replace(b"\r\n", b"\n") + b"\n")


@pytest.mark.peer
def test_postfix_mx_delivers_into_maildir(ca: trustme.CA, tmp_path: Path) -> None:
    before = {
        n: (POSTFIX_DIR / n).read_bytes() if (POSTFIX_DIR / n).exists() else None for n in ("main.cf", "master.cf")
    }
    cert = ca.issue_cert("127.0.0.2", "mx.dst.test")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    with PostfixMx(["dst.test"], tls_cert=tmp_path / "cert.pem", tls_key=tmp_path / "key.pem") as mx:
        with smtp("127.0.0.2", mx.port) as client:
            client.sendmail("a@acme.test", ["b@dst.test"], MESSAGE)
            with pytest.raises(smtplib.SMTPRecipientsRefused):  # not a domain of this MX, and no relaying
                client.sendmail("a@acme.test", ["b@elsewhere.test"], MESSAGE)
        with smtp("127.0.0.2", mx.port) as client:
            client.starttls(context=client_context(ca))
            client.sendmail("a@acme.test", ["c@dst.test"], MESSAGE)
        first, second = mx.wait_for(2)
        assert first.endswith(MESSAGE.replace(b"\r\n", b"\n"))
        assert b"Delivered-To: b@dst.test" in first and b"Delivered-To: c@dst.test" in second
        assert b"using TLS" in second
        assert "warning" not in mx.log(), mx.log()
    after = {
        n: (POSTFIX_DIR / n).read_bytes() if (POSTFIX_DIR / n).exists() else None for n in ("main.cf", "master.cf")
    }
    assert after == before


@pytest.mark.peer
async def test_nsd_answers_mx() -> None:
    zones = {
        "dst.test": [("@", "MX", "10 mx1.dst.test."), ("mx1", "A", "127.0.0.2"), ("sel._domainkey", "TXT", DKIM_KEY)]
    }
    with Nsd(zones) as nsd:
        resolver = nsd.resolver()
        mx = await resolver.resolve("dst.test", "MX")
        assert [(r.preference, str(r.exchange)) for r in mx] == [(10, "mx1.dst.test.")]
        assert [r.address for r in await resolver.resolve("mx1.dst.test", "A")] == ["127.0.0.2"]
        txt = await resolver.resolve("sel._domainkey.dst.test", "TXT")
        assert b"".join(txt[0].strings).decode() == DKIM_KEY
        with pytest.raises(dns.resolver.NXDOMAIN):
            await resolver.resolve("nowhere.dst.test", "A")
