"""SMTPUTF8 end to end (RFC 6531/6532): smtplib submits UTF-8 addresses with the SMTPUTF8 parameter,
cmcd resolves the A-label names from a DNS server on loopback, delivers byte-exact to a sink that
offers SMTPUTF8 (DKIM checked by dkimpy, d= the A-label), bounces with 5.6.7 what a sink without it
cannot take and sends an IDN domain with an ASCII local part there as xn--; the mail log finds an
address however it is spelt and shows it as written. The HTTP API takes the same addresses, and a bounce
report on a UTF-8 address is an RFC 6533 one; lengths are octets."""

from __future__ import annotations

import json
import smtplib
import unicodedata
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Cmcd, queue_id
from tests.e2e.test_delivery import FAST, events, final
from tests.e2e.test_dkim import dkimpy_results, publish
from tests.e2e.test_replies_at_rest import cmcctl
from tests.peers import DnsServer, Sink, free_port

JP = "ユーザー@例え.jp"
DE = "user@bücher.example"
DE_ALABEL = "user@xn--bcher-kva.example"
#: a domain whose MX does not offer SMTPUTF8
UTF8_LOCAL_PLAIN = "jöran@plain.test"
IDN_PLAIN = "user@münchen.test"
IDN_PLAIN_ALABEL = "user@xn--mnchen-3ya.test"
#: 22 characters, 66 octets of UTF-8 in the local part (the limit is 64 octets); and 64 octets
LONG_LOCAL = "ユ" * 22 + "@例え.jp"
OK_LOCAL = "ユ" * 21 + "a@例え.jp"


@pytest.fixture
def world(make_cmcd: Any) -> Iterator[tuple[Cmcd, DnsServer, Sink, Sink, Sink]]:
    """cmcd; DNS with MX records for the A-label names; a sink with SMTPUTF8 (127.0.0.2), one without
    (127.0.0.3) and acme.test's MX, where the bounces arrive (127.0.0.9), all on one port."""
    port = free_port("127.0.0.1")
    with (
        DnsServer() as dns_server,
        Sink("127.0.0.2", port, smtputf8=True) as utf8_sink,
        Sink("127.0.0.3", port, smtputf8=False) as ascii_sink,
        Sink("127.0.0.9", port) as bounces,
    ):
        for domain, ip in (
            ("xn--r8jz45g.jp", "127.0.0.2"),
            ("xn--bcher-kva.example", "127.0.0.2"),
            ("plain.test", "127.0.0.3"),
            ("xn--mnchen-3ya.test", "127.0.0.3"),
            ("acme.test", "127.0.0.9"),
        ):
            dns_server.add(domain, "MX", f"10 mx.{domain}.")
            dns_server.add(f"mx.{domain}", "A", ip)
        d = make_cmcd(
            {
                "dns": {"nameservers": [dns_server.address], "timeout": "2s"},
                "delivery": FAST | {"port": port},
                "api": {"listen": "127.0.0.1:0"},
            }
        )
        yield d, dns_server, utf8_sink, ascii_sink, bounces


def submit(d: Cmcd, rcpts: list[str], data: bytes, *, sender: str = "alice@acme.test") -> str:
    with d.smtp() as c:
        assert c.has_extn("smtputf8")
        c.mail(sender, ["SMTPUTF8"])
        for r in rcpts:
            code, reply = c.rcpt(r)
            assert code == 250, reply
        code, reply = c.data(data)
        assert code == 250, reply
        return queue_id(reply)


def test_smtputf8_is_offered_only_by_the_sink_asked_to(world: tuple[Cmcd, DnsServer, Sink, Sink, Sink]) -> None:
    """The peers are what the other tests take them for: aiosmtpd omits the keyword when told to."""
    _, _, utf8_sink, ascii_sink, _ = world
    for sink, offered in ((utf8_sink, True), (ascii_sink, False)):
        with smtplib.SMTP(sink.host, sink.port, timeout=10) as c:
            c.ehlo("client.test")
            assert c.has_extn("smtputf8") is offered


def test_utf8_addresses_arrive_byte_exact_and_signed_with_the_a_label(
    world: tuple[Cmcd, DnsServer, Sink, Sink, Sink],
) -> None:
    d, dns_server, utf8_sink, _, _ = world
    d.admin("domain.add", tenant="acme", domain="xn--bcher-kva.example")
    publish(d, dns_server)
    publish(d, dns_server, "xn--bcher-kva.example")
    data = (
        f"From: Jürgen <jürgen@Bücher.Example>\r\nTo: {JP}, {DE}\r\nSubject: Grüße aus 東京\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nこんにちは\r\n"
    ).encode()
    qid = submit(d, [JP, DE], data)
    got = utf8_sink.wait_for(2)  # two domains with two MX names: two transactions
    assert sorted(r for m in got for r in m.rcpt_tos) == sorted([JP, DE])
    for m in got:
        assert m.mail_from == "alice@acme.test" and m.smtputf8 and "SMTPUTF8" in m.mail_options
        original_head, original_body = data.split(b"\r\n\r\n", 1)  # byte-exact; Message-ID and Date added
        assert original_head + b"\r\n" in m.data and m.data.endswith(b"\r\n\r\n" + original_body)
        head = m.data.split(b"\r\n\r\n", 1)[0]
        assert b" with UTF8SMTPSA id " in head  # RFC 6531 4.3
        assert b"d=xn--bcher-kva.example;" in head
        assert dkimpy_results(m.data, dns_server.port) == ["rsa-sha256=pass", "ed25519-sha256=pass"]
    rows = d.wait_mail_log(lambda rows: final(rows, 2), qid)
    assert sorted(events(rows)) == sorted([(JP, "delivered"), (DE, "delivered")])
    assert {r["rcpt_domain"] for r in rows} == {"xn--r8jz45g.jp", "xn--bcher-kva.example"}

    # cmcctl log mail --rcpt: found however it is spelt, shown as written
    nfd = unicodedata.normalize("NFD", DE).upper()
    for spelling in (DE, nfd, DE_ALABEL):
        found = json.loads(cmcctl(d, "log", "mail", "--tenant", "acme", "--rcpt", spelling, "--format", "json"))
        assert {r["rcpt"] for r in found} == {DE} and "delivered" in {r["event"] for r in found}, spelling
    assert DE in cmcctl(d, "log", "mail", "--tenant", "acme", "--rcpt", DE_ALABEL)  # the table too
    found = json.loads(
        cmcctl(d, "log", "mail", "--tenant", "acme", "--rcpt", "ユーザー@XN--R8JZ45G.JP", "--format", "json")
    )
    assert {r["rcpt"] for r in found} == {JP}


def test_a_server_without_smtputf8_gets_a_labels_and_the_rest_bounces_with_5_6_7(
    world: tuple[Cmcd, DnsServer, Sink, Sink, Sink],
) -> None:
    d, _, _, ascii_sink, bounces = world
    plain = b"From: <alice@acme.test>\r\nTo: someone\r\nSubject: ascii header\r\n\r\nbody\r\n"
    utf8_header = "From: <alice@acme.test>\r\nSubject: Grüße\r\n\r\nx\r\n".encode()
    expected = {
        # a UTF-8 local part has no ASCII form: that recipient bounces, the other one goes
        submit(d, [UTF8_LOCAL_PLAIN, "ok@plain.test"], plain): [
            (UTF8_LOCAL_PLAIN, "bounced"),
            ("ok@plain.test", "delivered"),
        ],
        # a UTF-8 header of a message submitted with SMTPUTF8: the whole message needs it
        submit(d, [IDN_PLAIN], utf8_header): [(IDN_PLAIN, "bounced")],
        # an A-label domain is not internationalised (RFC 6531 3.2): it goes as xn--
        submit(d, [IDN_PLAIN], plain): [(IDN_PLAIN, "delivered")],
    }
    for qid, outcome in expected.items():
        n = len(outcome)
        rows = d.wait_mail_log(lambda rows, n=n: final(rows, n), qid)
        assert sorted(events(rows)) == sorted(outcome), rows
        for r in rows:
            if r["event"] == "bounced":  # at once, not deferred first
                assert r["attempt"] == 1 and r["response"].startswith("5.6.7 SMTPUTF8 is required, but host mx."), r
    got = ascii_sink.wait_for(2)
    assert sorted(r for m in got for r in m.rcpt_tos) == sorted(["ok@plain.test", IDN_PLAIN_ALABEL])
    assert all(not m.smtputf8 and b"Subject: ascii header\r\n" in m.data for m in got)
    dsns = bounces.wait_for(2)
    assert all(m.rcpt_tos == ["alice@acme.test"] and b"Status: 5.6.7" in m.data for m in dsns)
    assert d.admin("suppression.list", tenant="acme") == []  # the address is fine; the path is not
    assert len(ascii_sink.messages) == 2


@pytest.mark.parametrize(
    ("commands", "reply"),
    [
        ([b"MAIL FROM:<j\xc3\xb6rg@acme.test>"], b"550 5.6.7"),
        ([b"MAIL FROM:<alice@acme.test>", "RCPT TO:<ユーザー@例え.jp>".encode()], b"553 5.6.7"),
        ([b"MAIL FROM:<alice@acme.test> SMTPUTF8=yes"], b"501 5.5.4"),
        ([b"MAIL FROM:<j\xf6rg@acme.test> SMTPUTF8"], b"500 5.5.2"),
        ([b"NOOP \xc3\xa9"], b"501 5.5.4"),
        ([b"MAIL FROM:<alice@acme.test> SMTPUTF8", b"RCPT TO:<user@b\xc3\xbc-.example>"], b"501 5.1.3"),
        ([b"MAIL FROM:<j\xc3\xb6rg@acme.test> SMTPUTF8"], b"250 2.1.0"),
        ([b"MAIL FROM:<alice@b\xc3\xbccher.example> SMTPUTF8"], b"553 5.7.1"),
        # RFC 5321 4.5.3.1.1 counts octets: 22 characters, 66 octets of UTF-8
        ([b"MAIL FROM:<alice@acme.test> SMTPUTF8", b"RCPT TO:<" + LONG_LOCAL.encode() + b">"], b"501 5.1.3"),
        ([b"MAIL FROM:<" + LONG_LOCAL.replace("例え.jp", "acme.test").encode() + b"> SMTPUTF8"], b"501 5.1.3"),
        ([b"MAIL FROM:<alice@acme.test> SMTPUTF8", b"RCPT TO:<" + OK_LOCAL.encode() + b">"], b"250 2.1.5"),
    ],
    ids=[
        "utf8-mail-without-parameter",
        "utf8-rcpt-without-parameter",
        "parameter-with-value",
        "invalid-utf8",
        "utf8-outside-mail-and-rcpt",
        "bad-idn-label",
        "utf8-sender-with-parameter",
        "idn-sender-domain-not-the-tenants",
        "utf8-rcpt-local-part-of-66-octets",
        "utf8-sender-local-part-of-66-octets",
        "utf8-rcpt-local-part-of-64-octets",
    ],
)
def test_intake_replies(cmcd: Cmcd, commands: list[bytes], reply: bytes) -> None:
    with cmcd.smtp() as c:
        for line in commands:
            c.send(line + b"\r\n")
            code, text = c.getreply()
        assert f"{code} ".encode() + text[:5] == reply, (code, text)


def api_key(d: Cmcd) -> str:
    return str(d.admin("apikey.add", tenant="acme", login="alice")["token"])


def test_api_submission_to_a_utf8_address_arrives_byte_exact_with_smtputf8(
    world: tuple[Cmcd, DnsServer, Sink, Sink, Sink],
) -> None:
    """The API writes the UTF-8 address raw in To: (RFC 6532), marks the message in its Received: field,
    and delivery sends it with SMTPUTF8 to the address as written; DKIM verifies."""
    d, dns_server, utf8_sink, _, _ = world
    publish(d, dns_server)
    body = {"from": "Alice <alice@acme.test>", "to": [{"email": JP, "name": "ユーザー様"}], "subject": "件名",
            "text": "こんにちは"}  # fmt: skip
    status, _, sent = d.http("POST", "/v1/emails", body, token=api_key(d))
    assert status == 202, sent
    (m,) = utf8_sink.wait_for(1)
    assert m.rcpt_tos == [JP] and m.mail_from == "alice@acme.test" and m.smtputf8
    head = m.data.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    assert f"\r\nTo: =?utf-8?b?44Om44O844K244O85qeY?= <{JP}>\r\n".encode() in head  # the name stays RFC 2047
    assert b" with HTTPS (UTF8) id " + sent["id"].encode() + b";" in head  # the API's mark (cmcd.intl)
    assert dkimpy_results(m.data, dns_server.port) == ["rsa-sha256=pass", "ed25519-sha256=pass"]
    rows = d.wait_mail_log(lambda rows: final(rows, 1), sent["id"])
    assert events(rows) == [(JP, "delivered")] and rows[-1]["rcpt_domain"] == "xn--r8jz45g.jp"


def test_api_submission_a_next_hop_cannot_take_bounces_with_an_rfc_6533_report(
    world: tuple[Cmcd, DnsServer, Sink, Sink, Sink],
) -> None:
    """To a sink without SMTPUTF8: the UTF-8 recipient bounces at once with 5.6.7, class policy, not
    suppressed; the sender's report names it as written with the utf-8 address type. A UTF-8 sender's
    own report needs SMTPUTF8 and gets it."""
    d, _, _, ascii_sink, bounces = world
    key = api_key(d)
    sent = []
    for sender in ("alice@acme.test", "jöran@acme.test"):
        body = {"from": sender, "to": [UTF8_LOCAL_PLAIN], "subject": "s", "text": "t"}
        status, _, reply = d.http("POST", "/v1/emails", body, token=key)
        assert status == 202, reply
        sent.append(reply["id"])
    for qid in sent:
        rows = d.wait_mail_log(lambda rows: final(rows, 1), qid)
        (bounced,) = [r for r in rows if r["event"] == "bounced"]
        assert bounced["rcpt"] == UTF8_LOCAL_PLAIN and bounced["attempt"] == 1
        assert bounced["response"].startswith("5.6.7 SMTPUTF8 is required, but host mx.plain.test")
        assert bounced["bounce_class"] == "policy"
    reports = {m.rcpt_tos[0]: m for m in bounces.wait_for(2)}
    assert set(reports) == {"alice@acme.test", "jöran@acme.test"}
    for to, m in reports.items():
        assert m.mail_from == "" and m.smtputf8 is (to == "jöran@acme.test")  # only a UTF-8 header needs it
        assert f"\r\nTo: <{to}>\r\n".encode() in m.data
        assert b"Content-Type: multipart/report; report-type=global-delivery-status;" in m.data
        assert b"Content-Type: message/global-delivery-status\r\n" in m.data
        assert f"\r\nFinal-Recipient: utf-8; {UTF8_LOCAL_PLAIN}\r\nAction: failed\r\nStatus: 5.6.7\r\n".encode() in (
            m.data
        )
        assert b"\r\nX-Cmcd-Bounce-Class: policy\r\n" in m.data
        assert f"\r\n<{UTF8_LOCAL_PLAIN}>: 5.6.7 SMTPUTF8 is required".encode() in m.data
    assert "\r\nFrom: jöran@acme.test\r\n".encode() in reports["jöran@acme.test"].data  # message/global-headers
    assert not ascii_sink.messages
    assert d.admin("suppression.list", tenant="acme") == []  # the next message may be ASCII


def test_api_refuses_a_local_part_over_64_octets_and_takes_64(world: tuple[Cmcd, DnsServer, Sink, Sink, Sink]) -> None:
    d, _, utf8_sink, _, _ = world
    key = api_key(d)
    base = {"from": "alice@acme.test", "subject": "s", "text": "t"}
    status, _, problem = d.http("POST", "/v1/emails", base | {"to": [LONG_LOCAL]}, token=key)
    assert status == 422 and problem["field"] == "to[0]", problem
    assert "66 octets long (in UTF-8); at most 64" in problem["detail"]
    long_sender = LONG_LOCAL.replace("例え.jp", "acme.test")
    status, _, problem = d.http("POST", "/v1/emails/bulk", base | {"from": long_sender, "recipients": [{"to": JP}]},
                                token=key)  # fmt: skip
    assert status == 422 and problem["field"] == "from", problem
    status, _, sent = d.http("POST", "/v1/emails", base | {"to": [OK_LOCAL]}, token=key)
    assert status == 202, sent
    (m,) = utf8_sink.wait_for(1)
    assert m.rcpt_tos == [OK_LOCAL]
