"""cmcd.intl as tables: A-labels, the index form, the ASCII form, and what needs SMTPUTF8."""

from __future__ import annotations

import hmac
import os
import unicodedata

import pytest

from cmcd import bounces, crypto, intl

NFD = unicodedata.normalize("NFD", "user@bücher.example")
assert NFD != "user@bücher.example"


@pytest.mark.parametrize(
    ("domain", "alabel"),
    [
        ("例え.jp", "xn--r8jz45g.jp"),
        ("Bücher.Example", "xn--bcher-kva.example"),
        ("bücher.example.", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("Dst.Test", "dst.test"),
        ("straße.de", "xn--strae-oqa.de"),  # UTS #46 non-transitional: ß is kept, not "strasse"
        ("[192.0.2.1]", "[192.0.2.1]"),
    ],
    ids=["japanese", "mixed-case-german", "trailing-dot", "a-label-as-is", "ascii-lower", "eszett", "literal"],
)
def test_to_alabel(domain: str, alabel: str) -> None:
    assert intl.to_alabel(domain) == alabel


@pytest.mark.parametrize(
    "domain",
    ["bü-.example", "bü..example", "a\u2764\ufe0f.example", "ü" * 64 + ".example"],
    ids=["hyphen-at-end", "empty-label", "disallowed-code-point", "label-too-long"],
)
def test_to_alabel_refuses_a_bad_label(domain: str) -> None:
    with pytest.raises(ValueError, match="not a valid internationalised domain name"):
        intl.to_alabel(domain)


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("ユーザー@例え.jp", "xn--r8jz45g.jp"),
        ("User@Bücher.Example", "xn--bcher-kva.example"),
        ("rcpt@Dst.Test", "dst.test"),
        ("x@bü-.example", "bü-.example"),
    ],
    ids=["japanese", "german", "ascii", "no-a-label-form"],
)
def test_domain_key(address: str, key: str) -> None:
    assert intl.domain_key(address) == key


@pytest.mark.parametrize(
    "spelling",
    ["user@bücher.example", NFD, "USER@BÜCHER.EXAMPLE", "user@xn--bcher-kva.example", " user@Bücher.example\t"],
    ids=["nfc", "nfd", "upper-case", "a-label", "surrounding-space"],
)
def test_index_form_is_one_for_every_spelling(spelling: str) -> None:
    assert intl.index_form(spelling) == "user@xn--bcher-kva.example"


def test_index_form_keeps_a_utf8_local_part_in_nfc() -> None:
    assert intl.index_form(unicodedata.normalize("NFD", "Jöran@例え.jp")) == "jöran@xn--r8jz45g.jp"


@pytest.mark.parametrize("address", ["Rcpt@Dst.Test", " a.b+tag@Example.COM ", "postmaster@[192.0.2.1]", "x"], ids=str)
def test_an_ascii_address_hashes_as_before(address: str) -> None:
    """No migration: the index of an ASCII address is the formula cmcd always used."""
    keys = crypto.DataKeys(os.urandom(32), os.urandom(32))
    old = hmac.digest(keys.index_key, address.strip().lower().encode("utf-8"), "sha256")[:16]
    assert keys.index(address) == old


def test_nfd_nfc_and_a_label_share_one_index() -> None:
    keys = crypto.DataKeys(os.urandom(32), os.urandom(32))
    assert len({keys.index(a) for a in ("user@bücher.example", NFD, "user@xn--bcher-kva.example")}) == 1


@pytest.mark.parametrize(
    ("address", "form"),
    [
        ("user@dst.test", "user@dst.test"),
        ("user@bücher.example", "user@xn--bcher-kva.example"),
        ("ユーザー@例え.jp", None),
        ("jöran@example.com", None),
        ("user@bü-.example", None),
    ],
    ids=["ascii", "idn-domain", "utf8-local-part", "utf8-local-part-ascii-domain", "bad-domain"],
)
def test_ascii_form(address: str, form: str | None) -> None:
    assert intl.ascii_form(address) == form


def _body(received_with: str, header: str = "Subject: hi") -> bytes:
    return (
        f"DKIM-Signature: v=1; d=acme.test\r\n"
        f"Received: from client ([127.0.0.1])\r\n\t(authenticated as a via PLAIN)\r\n"
        f"\tby mx.test (cmcd) with {received_with} id Q1;\r\n\tThu, 1 Jan 2026 00:00:00 +0000\r\n"
        f"Received: from earlier by other with UTF8SMTPSA id X;\r\n"
        f"{header}\r\n\r\nbody ü\r\n"
    ).encode()


@pytest.mark.parametrize(
    ("body", "utf8"),
    [
        (_body("UTF8SMTPSA"), True),
        (_body("UTF8SMTPA"), True),
        (_body("ESMTPSA"), False),
        (_body("ESMTPSA", "Subject: ü"), False),
        (b"Subject: no received\r\n\r\nx\r\n", False),
        (_body("utf8smtps"), True),
    ],
    ids=["utf8smtpsa", "utf8smtpa", "esmtpsa-later-hop-ignored", "esmtpsa-utf8-header", "no-received", "lower-case"],
)
def test_submitted_with_smtputf8_reads_the_first_received(body: bytes, utf8: bool) -> None:
    assert intl.submitted_with_smtputf8(body) is utf8


@pytest.mark.parametrize(
    ("sender", "rcpts", "body", "refused"),
    [
        ("a@acme.test", ["b@dst.test"], _body("ESMTPSA"), frozenset()),
        ("a@acme.test", ["b@bücher.example"], _body("UTF8SMTPSA"), frozenset()),
        ("a@acme.test", ["b@dst.test", "ユーザー@例え.jp", "c@dst.test"], _body("UTF8SMTPSA"), frozenset({1})),
        ("jöran@acme.test", ["b@dst.test"], _body("UTF8SMTPSA"), None),
        ("a@acme.test", ["b@dst.test"], _body("UTF8SMTPSA", "Subject: Grüße"), None),
        ("a@acme.test", ["b@dst.test"], _body("ESMTPSA", "Subject: Grüße"), frozenset()),
        ("", ["b@dst.test"], _body("UTF8SMTPSA"), frozenset()),
    ],
    ids=[
        "all-ascii",
        "idn-domain-goes-as-a-label",
        "one-utf8-local-part",
        "utf8-sender",
        "utf8-header",
        "utf8-header-without-smtputf8-goes-as-before",
        "null-sender",
    ],
)
def test_refused_without_smtputf8(sender: str, rcpts: list[str], body: bytes, refused: frozenset[int] | None) -> None:
    assert intl.refused_without_smtputf8(sender, rcpts, body) == refused


@pytest.mark.parametrize(
    ("sender", "rcpts", "body", "needs"),
    [
        ("a@acme.test", ["b@dst.test"], _body("UTF8SMTPSA"), False),
        ("a@acme.test", ["b@bücher.example"], _body("ESMTPSA"), True),
        ("a@acme.test", ["b@dst.test"], _body("UTF8SMTPSA", "Subject: Grüße"), True),
        ("a@acme.test", ["b@dst.test"], _body("ESMTPSA", "Subject: Grüße"), False),
    ],
    ids=["ascii", "idn-envelope", "utf8-header", "utf8-header-without-smtputf8"],
)
def test_needs_smtputf8(sender: str, rcpts: list[str], body: bytes, needs: bool) -> None:
    assert intl.needs_smtputf8(sender, rcpts, body) is needs


@pytest.mark.parametrize(
    ("address", "form"),
    [
        ("user@dst.test", "user@dst.test"),
        ("user@Bücher.example", "user@xn--bcher-kva.example"),
        ("ユーザー@例え.jp", "ユーザー@例え.jp"),
        ("jöran@example.com", "jöran@example.com"),
    ],
    ids=["ascii", "idn-domain-as-a-label", "utf8-local-part-as-written", "utf8-local-part-ascii-domain"],
)
def test_header_form(address: str, form: str) -> None:
    """Only an address with no ASCII form puts UTF-8 into a header (RFC 6532)."""
    assert intl.header_form(address) == form


@pytest.mark.parametrize(
    ("with_", "utf8"),
    [("HTTPS (UTF8)", True), ("HTTPS", False), ("HTTP (UTF8)", True), ("HTTPS (utf8)", True), ("HTTPS (other)", False)],
    ids=["api-marked", "api-unmarked", "http-marked", "lower-case", "another-comment"],
)
def test_the_apis_mark_counts_as_smtputf8(with_: str, utf8: bool) -> None:
    """The API has no registered UTF-8 protocol name: "with HTTPS (UTF8)" says it (cmcd.intl)."""
    body = _body(with_, "To: ユーザー@例え.jp")
    assert intl.submitted_with_smtputf8(body) is utf8
    assert intl.refused_without_smtputf8("a@acme.test", ["b@dst.test"], body) == (None if utf8 else frozenset())


def test_the_apis_mark_in_a_later_received_does_not_count() -> None:
    body = b"Received: by mx.test (cmcd) with HTTPS id Q1;\r\nReceived: by x with HTTPS (UTF8) id Q0;\r\n\r\nx\r\n"
    assert not intl.submitted_with_smtputf8(body)


@pytest.mark.parametrize(
    ("code", "enhanced", "text"),
    [
        (0, "5.6.7", "5.6.7 SMTPUTF8 is required, but host mx.plain.test does not offer it"),
        (553, "5.6.7", "553 5.6.7 Non-ASCII addresses not permitted for that recipient"),
        (550, "5.6.7", "550 5.6.7 mailbox name not allowed"),
        (453, "4.6.7", "453 4.6.7 try later"),
        (553, "", "553 Non-ASCII addresses not permitted for that sender"),
    ],
    ids=["cmcd-own", "rfc-6531-words", "other-words", "temporary", "no-enhanced-code"],
)
def test_a_5_6_7_reply_classes_as_policy(code: int, enhanced: str, text: str) -> None:
    """RFC 6531 3.5's 5.6.7 is the next hop's rule, not the recipient's fault: policy, never suppressed
    by default (the next message may be ASCII)."""
    rules = bounces.load_rules()
    assert bounces.classify(rules, code, enhanced, text) == "policy"
    assert bounces.BlockPolicy().action("policy") == "none"
