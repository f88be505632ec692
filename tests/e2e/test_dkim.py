"""DKIM end to end: keys made by `domain add`, records published from `domain dns` into a DNS server
on loopback, messages submitted over SMTP and delivered to a sink, and the signatures checked by three
independent verifiers (dkimpy, OpenDKIM, Perl's Mail::DKIM)."""

from __future__ import annotations

import re
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim as dkimpy
import dns.resolver
import pytest

from tests.conftest import Cmcd, need
from tests.e2e.test_delivery import FAST
from tests.peers import DnsServer, Received, Sink, free_port

PERL_VERIFIER = r"""
use strict; use warnings;
use Mail::DKIM::Verifier; use Net::DNS::Resolver;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(nameservers => ['127.0.0.1'], port => $ARGV[0], recurse => 0));
my $v = Mail::DKIM::Verifier->new;
binmode STDIN; local $/; my $m = <STDIN>; $v->PRINT($m); $v->CLOSE;
foreach my $s ($v->signatures) { print $s->algorithm, "=", $s->result, "\n"; }
"""


@pytest.fixture
def world(make_cmcd: Any) -> Iterator[tuple[Cmcd, DnsServer, Sink]]:
    with DnsServer() as dns_server, Sink("127.0.0.2", free_port("127.0.0.2")) as sink:
        d = make_cmcd(
            {
                "dns": {"nameservers": [dns_server.address]},
                "delivery": FAST | {"routes": {"*": sink.address}},
                "dkim": {"expire_after": "7d"},
            }
        )
        publish(d, dns_server)
        yield d, dns_server, sink


def publish(d: Cmcd, dns_server: DnsServer, domain: str = "acme.test") -> list[dict[str, Any]]:
    """Put the records `domain dns` prints into the DNS server, as an operator would."""
    records: list[dict[str, Any]] = d.admin("domain.dns", tenant="acme", domain=domain)["records"]
    for r in records:
        dns_server.remove(r["name"], "TXT")
        dns_server.add(r["name"], "TXT", " ".join(f'"{s}"' for s in r["strings"]))
    return records


def dkimpy_results(message: bytes, port: int) -> list[str]:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = port

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        except dns.exception.DNSException:
            return None
        return b"".join(answer.rrset[0].strings) if answer.rrset else None

    d = dkimpy.DKIM(message)
    count = len(re.findall(rb"(?mi)^DKIM-Signature:", message.split(b"\r\n\r\n", 1)[0]))
    out = []
    for i in range(count):
        try:
            ok = d.verify(idx=i, dnsfunc=dnsfunc)
        except dkimpy.DKIMException:
            ok = False
        algorithm = re.findall(rb"a=([\w-]+)", message.split(b"\r\n\r\n", 1)[0])[i].decode()
        out.append(f"{algorithm}={'pass' if ok else 'fail'}")
    return out


def opendkim_results(tmp: Path, message: bytes, records: list[dict[str, Any]]) -> list[str]:
    opendkim = need("opendkim")
    keys = tmp / "keys"
    keys.write_text("".join(f"{r['name']} {r['value']}\n" for r in records if "selector" in r))
    conf = tmp / "opendkim.conf"
    conf.write_text(f"Mode v\nTestPublicKeys {keys}\nSyslog no\n")
    (tmp / "m.eml").write_bytes(message)
    proc = subprocess.run(
        [opendkim, "-x", str(conf), "-t", str(tmp / "m.eml"), "-vvv"], capture_output=True, text=True, timeout=60
    )
    return [f"{a}={r}" for r, a in re.findall(r"dkim=(\w+).*?header\.a=([\w-]+)", proc.stdout)]


def perl_results(message: bytes, port: int) -> list[str]:
    need("perl")
    if subprocess.run(["perl", "-MMail::DKIM::Verifier", "-e", "1"], capture_output=True).returncode:
        need("mail-dkim-perl-is-not-installed")  # skips, or fails under CMCD_REQUIRE_PEERS=1
    proc = subprocess.run(
        ["perl", "-e", PERL_VERIFIER, str(port)], input=message, capture_output=True, timeout=60, check=True
    )
    return proc.stdout.decode().split()


BOTH_PASS = ["rsa-sha256=pass", "ed25519-sha256=pass"]
# Debian 12's Mail::DKIM (1.20230212) predates its Ed25519 support: it checks the RSA signature and
# calls the Ed25519 one "invalid (unsupported algorithm)"; dkimpy and OpenDKIM check both.
PERL_EXPECTED = ["rsa-sha256=pass", "ed25519-sha256=invalid"]

PLAIN = b"From: Alice <alice@acme.test>\r\nTo: bob@dst.test\r\nSubject: plain\r\n\r\nHello Bob.\r\n"
MULTIPART = (
    b"From: alice@acme.test\r\nTo: bob@dst.test\r\nSubject: invoice\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n'
    b"See attached.\r\n--b1\r\nContent-Type: application/pdf; name=a.pdf\r\nContent-Transfer-Encoding: base64\r\n"
    b'Content-Disposition: attachment; filename="a.pdf"\r\n\r\nJVBERi0xLjQKJcfsj6IKNSAwIG9iago8PC9MZW5ndGggNiAwIFI+Pgo=\r\n--b1--\r\n'
)
ENCODED = (
    b"From: =?utf-8?q?J=C3=BCrgen?= <alice@acme.test>\r\nTo: bob@dst.test\r\n"
    b"Subject: =?utf-8?b?R3LDvMOfZSBhdXMgVG9reW8g5p2x5Lqs?=\r\n\r\nBody \xc3\xa4 in 8 bit.\r\n"
)
RAW_UTF8 = "From: Jürgen <alice@acme.test>\r\nTo: bob@dst.test\r\nSubject: Grüße 東京\r\n\r\nUTF-8 body ü\r\n".encode()
LONG_FOLDED = (
    b"From: alice@acme.test\r\nTo: " + b",\r\n\t".join(b"user%d@dst.test" % i for i in range(12)) + b"\r\n"
    b"Subject: a very long subject line that goes on and on " + b"and on " * 20 + b"\r\n\r\nbody\r\n"
)
EMPTY_BODY = b"From: alice@acme.test\r\nTo: bob@dst.test\r\nSubject: empty\r\n\r\n"


def deliver(d: Cmcd, sink: Sink, data: bytes, *, smtputf8: bool = False) -> Received:
    before = len(sink.messages)
    with d.smtp() as c:
        c.sendmail("alice@acme.test", ["bob@dst.test"], data, mail_options=["SMTPUTF8"] if smtputf8 else [])
    return sink.wait_for(before + 1)[before]


def deliver_raw(d: Cmcd, sink: Sink, raw: bytes) -> Received:
    """DATA exactly as given (bare LFs included), past smtplib's own line-ending fixes."""
    before = len(sink.messages)
    with d.smtp() as c:
        c.mail("alice@acme.test")
        c.rcpt("bob@dst.test")
        c.putcmd("data")
        assert c.getreply()[0] == 354
        c.send(raw + b"\r\n.\r\n")
        assert c.getreply()[0] == 250
    return sink.wait_for(before + 1)[before]


@pytest.mark.peer
@pytest.mark.parametrize(
    ("data", "smtputf8"),
    [
        (PLAIN, False),
        (MULTIPART, False),
        (ENCODED, False),
        (RAW_UTF8, False),
        (LONG_FOLDED, False),
        (EMPTY_BODY, False),
    ],
    ids=["plain", "multipart-attachment", "rfc2047-8bit", "raw-utf8-headers", "long-folded", "empty-body"],
)
def test_signatures_verify_with_three_verifiers(
    world: tuple[Cmcd, DnsServer, Sink], tmp_path: Path, data: bytes, smtputf8: bool
) -> None:
    d, dns_server, sink = world
    got = deliver(d, sink, data, smtputf8=smtputf8).data
    assert got.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;") and got.count(b"DKIM-Signature:") == 2
    records = d.admin("domain.dns", tenant="acme", domain="acme.test")["records"]
    assert dkimpy_results(got, dns_server.port) == BOTH_PASS
    assert opendkim_results(tmp_path, got, records) == BOTH_PASS
    assert perl_results(got, dns_server.port) == PERL_EXPECTED


@pytest.mark.peer
def test_bare_lf_normalised_by_intake_then_signed(world: tuple[Cmcd, DnsServer, Sink], tmp_path: Path) -> None:
    d, dns_server, sink = world
    got = deliver_raw(d, sink, b"From: alice@acme.test\nTo: bob@dst.test\nSubject: lf\n\nline one\nline two").data
    assert b"\n" not in got.replace(b"\r\n", b"")
    assert dkimpy_results(got, dns_server.port) == BOTH_PASS
    assert perl_results(got, dns_server.port) == PERL_EXPECTED


@pytest.mark.peer
@pytest.mark.parametrize("added", [b"From: Mallory <ceo@acme.test>\r\n", b"Subject: urgent: wire money\r\n"])
def test_an_added_from_or_subject_breaks_the_signatures(
    world: tuple[Cmcd, DnsServer, Sink], tmp_path: Path, added: bytes
) -> None:
    d, dns_server, sink = world
    got = deliver(d, sink, PLAIN).data
    head, body = got.split(b"\r\n\r\n", 1)
    forged = head + b"\r\n" + added.rstrip(b"\r\n") + b"\r\n\r\n" + body  # appended below the signed copy
    records = d.admin("domain.dns", tenant="acme", domain="acme.test")["records"]
    assert dkimpy_results(forged, dns_server.port) == ["rsa-sha256=fail", "ed25519-sha256=fail"]
    assert "pass" not in " ".join(opendkim_results(tmp_path, forged, records))
    assert "=pass" not in " ".join(perl_results(forged, dns_server.port))


def test_dkim_rotation_walk_through(world: tuple[Cmcd, DnsServer, Sink]) -> None:
    d, dns_server, sink = world
    first = {k["selector"]: k for k in d.admin("domain.keys", tenant="acme", domain="acme.test")}
    assert sorted(k["state"] for k in first.values()) == ["active", "active"]
    checked = d.admin("domain.check", tenant="acme", domain="acme.test")
    assert {r["status"] for r in checked} == {"published"}

    pending = d.admin("domain.dkim-rotate", tenant="acme", domain="acme.test")["pending"]
    assert len(pending) == 2 and not set(pending) & set(first)
    checked = {r["name"].split(".")[0]: r["status"] for r in d.admin("domain.check", tenant="acme", domain="acme.test")}
    assert [checked[s] for s in pending] == ["missing", "missing"]
    with pytest.raises(Exception, match="DNS does not show"):
        d.admin("domain.dkim-activate", tenant="acme", domain="acme.test")
    got = deliver(d, sink, PLAIN).data  # still signed with the first keys
    assert set(re.findall(rb"s=(\w+);", got)) == {s.encode() for s in first}

    publish(d, dns_server)
    checked = {r["name"].split(".")[0]: r["status"] for r in d.admin("domain.check", tenant="acme", domain="acme.test")}
    assert [checked[s] for s in pending] == ["published", "published"]
    activated = d.admin("domain.dkim-activate", tenant="acme", domain="acme.test")
    assert sorted(activated["active"]) == sorted(pending) and sorted(activated["standby"]) == sorted(first)

    got = deliver(d, sink, PLAIN).data
    assert set(re.findall(rb"s=(\w+);", got)) == {s.encode() for s in pending}
    assert dkimpy_results(got, dns_server.port) == BOTH_PASS
    names = [r["name"] for r in d.admin("domain.dns", tenant="acme", domain="acme.test")["records"]]
    assert all(any(n.startswith(s + ".") for n in names) for s in list(first) + pending)  # old keys still published

    assert d.admin("domain.dkim-retire", tenant="acme", domain="acme.test") == {"domain": "acme.test", "retired": 2}
    names = [r["name"] for r in d.admin("domain.dns", tenant="acme", domain="acme.test")["records"]]
    assert not any(n.startswith(s + ".") for n in names for s in first)
    states = {k["selector"]: k["state"] for k in d.admin("domain.keys", tenant="acme", domain="acme.test")}
    assert states == {**{s: "retired" for s in first}, **{s: "active" for s in pending}}


def test_a_key_known_missing_from_dns_does_not_sign(world: tuple[Cmcd, DnsServer, Sink]) -> None:
    d, dns_server, sink = world
    for r in d.admin("domain.dns", tenant="acme", domain="acme.test")["records"]:
        if "selector" in r and r["selector"].endswith("e"):
            dns_server.remove(r["name"], "TXT")  # the Ed25519 record was never published
    d.admin("domain.check", tenant="acme", domain="acme.test")
    got = deliver(d, sink, PLAIN).data
    assert got.count(b"DKIM-Signature:") == 1 and b"a=rsa-sha256" in got
    assert dkimpy_results(got, dns_server.port) == ["rsa-sha256=pass"]


def test_import_key_and_dns_records(world: tuple[Cmcd, DnsServer, Sink], tmp_path: Path) -> None:
    from cmcd.dkim import DkimKey

    d, dns_server, sink = world
    key = DkimKey.generate_rsa("acme.test", "legacy", 2048)
    pem = key.private_pem().decode()
    with pytest.raises(Exception, match="not a readable PEM"):
        d.admin("domain.import-key", tenant="acme", domain="acme.test", selector="bad", pem="garbage")
    with pytest.raises(Exception, match="no domain"):
        d.admin("domain.import-key", tenant="beta", domain="acme.test", selector="x", pem=pem)  # not beta's
    out = d.admin("domain.import-key", tenant="acme", domain="acme.test", selector="legacy", pem=pem)
    assert out["algorithm"] == "rsa-sha256" and len(out["standby"]) == 1
    dns = d.admin("domain.dns", tenant="acme", domain="acme.test")
    legacy = [r for r in dns["records"] if r["name"] == "legacy._domainkey.acme.test"][0]
    assert legacy["value"] == key.dns_txt() and all(len(s) <= 255 for s in legacy["strings"])
    assert any(line.startswith("legacy._domainkey.acme.test. 3600 IN TXT (") for line in dns["zone"])
    assert any("v=spf1 a:mx.cmcd.test ~all" in line for line in dns["zone"])
    assert any(line.startswith("_dmarc.acme.test. 3600 IN TXT") for line in dns["zone"])
    publish(d, dns_server)
    got = deliver(d, sink, PLAIN).data
    assert b"s=legacy;" in got and dkimpy_results(got, dns_server.port) == BOTH_PASS

    # the private keys are nowhere in the store or the logs in clear
    secret_lines = [line for line in pem.splitlines() if not line.startswith("-----")][3:6]
    files = [p for p in d.root.iterdir() if p.name.startswith("cmcd.db")]
    blob = b"".join(p.read_bytes() for p in files)
    assert all(line.encode() not in blob for line in secret_lines)
    assert all(line not in "\n".join(d.log) for line in secret_lines)
    conn = sqlite3.connect(f"file:{d.root / 'cmcd.db'}?mode=ro", uri=True)
    try:
        stored = [bytes(r[0]) for r in conn.execute("SELECT private_enc FROM dkim_keys")]
    finally:
        conn.close()
    assert stored and all(b"PRIVATE KEY" not in s for s in stored)
