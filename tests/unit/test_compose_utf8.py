"""API messages with internationalised addresses (RFC 6531/6532): what the envelope carries (as written),
what the header says (UTF-8 only where an address has no ASCII form), and the octet limits."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

import pytest

from cmcd.api.compose import Composed, ComposeError, compose_bulk, compose_one

NOW = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
MAX = 1_000_000
JP = "ユーザー@例え.jp"


def one(**over: Any) -> Composed:
    req = {"from": "Acme <news@acme.test>", "to": [JP], "subject": "Hi", "text": "hello"} | over
    return compose_one(req, max_size=MAX, now=NOW)


def head(c: Composed) -> bytes:
    return c.body.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def parsed(c: Composed) -> EmailMessage:
    # from text: message_from_bytes reads a header's 8-bit octets as surrogates, not as UTF-8
    msg = email.message_from_string(c.body.decode("utf-8"), policy=email.policy.SMTPUTF8)
    assert isinstance(msg, EmailMessage) and not msg.defects
    return msg


def test_a_utf8_local_part_is_raw_utf8_in_the_header_and_as_written_in_the_envelope() -> None:
    c = one(to=[JP, {"email": "jöran@plain.test", "name": "Jöran"}], cc=["Bob <bob@dst.test>"])
    assert c.rcpts == [JP, "jöran@plain.test", "bob@dst.test"] and c.smtputf8
    assert f"\r\nTo: {JP}, =?utf-8?b?SsO2cmFu?= <jöran@plain.test>\r\n".encode() in head(c)  # RFC 6532 / 2047
    msg = parsed(c)
    assert [a.addr_spec for a in msg["To"].addresses] == [JP, "jöran@plain.test"]
    assert msg["To"].addresses[1].display_name == "Jöran"
    assert msg["Cc"].addresses[0].addr_spec == "bob@dst.test"


def test_an_idn_domain_with_an_ascii_local_part_is_written_as_its_a_label() -> None:
    """It has an ASCII form (RFC 6531 3.2): the message needs no SMTPUTF8 for it."""
    c = one(**{"from": "Jürgen <news@Bücher.example>", "to": ["user@例え.jp"], "reply_to": "help@bücher.example"})
    assert c.mail_from == "news@Bücher.example" and c.rcpts == ["user@例え.jp"]
    assert not c.smtputf8 and head(c).isascii()
    msg = parsed(c)
    assert msg["From"].addresses[0].addr_spec == "news@xn--bcher-kva.example"
    assert msg["From"].addresses[0].display_name == "Jürgen"
    assert msg["To"].addresses[0].addr_spec == "user@xn--r8jz45g.jp"
    assert msg["Reply-To"].addresses[0].addr_spec == "help@xn--bcher-kva.example"
    assert msg["Message-ID"].endswith("@xn--bcher-kva.example>")


def test_a_utf8_sender_makes_every_message_of_a_merge_utf8() -> None:
    req = {
        "from": "Jöran <jöran@acme.test>",
        "subject": "Hi {{n}}",
        "text": "hello {{n}}",
        "recipients": [{"to": JP, "merge": {"n": "1"}}, {"to": "Bob <bob@dst.test>", "merge": {"n": "2"}}],
    }
    out = compose_bulk(req, max_size=MAX, now=NOW)
    assert [c.rcpts for c in out] == [[JP], ["bob@dst.test"]] and all(c.smtputf8 for c in out)
    assert all(b"\r\nFrom: =?utf-8?b?SsO2cmFu?= <j\xc3\xb6ran@acme.test>\r\n" in b"\r\n" + head(c) for c in out)
    assert f"\r\nTo: {JP}\r\n".encode() in head(out[0]) and b"\r\nTo: Bob <bob@dst.test>\r\n" in head(out[1])


def test_bulk_writes_the_header_as_one_message_does() -> None:
    req: dict[str, Any] = {"from": "Jöran <jöran@acme.test>", "subject": "s", "text": "t", "reply_to": "r@例え.jp"}
    single = compose_one(req | {"to": [{"email": JP, "name": "Ü Ser"}]}, max_size=MAX, now=NOW)
    bulk = compose_bulk(req | {"recipients": [{"to": {"email": JP, "name": "Ü Ser"}}]}, max_size=MAX, now=NOW)[0]

    def fields(c: Composed) -> list[bytes]:
        return [f for f in head(c).split(b"\r\n") if not f.startswith(b"Message-ID")]

    assert fields(single) == fields(bulk) and single.smtputf8 and bulk.smtputf8


def test_an_ascii_request_is_unchanged() -> None:
    c = one(to=["bob@dst.test"])
    assert not c.smtputf8 and c.body.isascii() and b"\r\nTo: bob@dst.test\r\n" in head(c)


@pytest.mark.parametrize(
    ("address", "words"),
    [
        ("ユ" * 22 + "@例え.jp", "is 66 octets long (in UTF-8); at most 64"),
        ("a" * 65 + "@dst.test", "is 65 octets long (in UTF-8); at most 64"),
        ("ü" * 60 + "@" + "例" * 60 + ".jp", "octets long (in UTF-8); at most 254"),
        ("jö\u200bran@dst.test", "printable non-ASCII"),
        ("jöran@bü-.example", "not a valid host name"),
        ("jö..ran@dst.test", "local part"),
    ],
    ids=["local-part-22-characters-66-octets", "local-part-65-ascii", "address-over-254-octets", "format-character",
         "idn-without-a-label", "empty-dot-atom-word"],
)  # fmt: skip
def test_utf8_addresses_the_rules_refuse(address: str, words: str) -> None:
    with pytest.raises(ComposeError) as exc:
        one(to=[address])
    assert exc.value.field == "to[0]" and words in exc.value.detail, exc.value.detail


def test_a_64_octet_utf8_local_part_is_taken() -> None:
    local = "ユ" * 21 + "a"  # 21 x 3 + 1 octets
    assert one(to=[f"{local}@例え.jp"]).rcpts == [f"{local}@例え.jp"]
