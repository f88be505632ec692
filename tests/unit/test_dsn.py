"""The bounce report (RFC 3464): structure, what it carries, and what it never carries."""

from __future__ import annotations

import email
import email.message
import email.policy

import pytest

from cmcd import intl
from cmcd.queue import dsn

ORIGINAL = (
    b"From: <alice@acme.test>\r\nTo: <bob@dst.test>\r\nSubject: invoice 42\r\nMessage-ID: <m1@acme.test>\r\n"
    b"\r\nSECRET BODY LINE\r\n"
)


def build(recipients: list[dsn.FailedRecipient]) -> bytes:
    return dsn.build(
        hostname="mx.cmcd.test",
        queue_id="25XFN2TPNZJ8XP4LR",
        sender="alice@acme.test",
        arrival=1_700_000_000.0,
        now=1_700_000_600.0,
        recipients=recipients,
        headers=dsn.original_headers(ORIGINAL),
    )


def test_report_structure_per_rfc_3464() -> None:
    raw = build(
        [
            dsn.failed("bob@dst.test", "550 5.1.1 no such user", "mx1.dst.test", expired=False),
            dsn.failed("carol@dst.test", "451 4.4.1 connection refused", "", expired=True),
        ]
    )
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
    msg = email.message_from_bytes(raw, policy=email.policy.SMTP)
    assert msg["To"].addresses[0].addr_spec == "alice@acme.test" and msg["Auto-Submitted"] == "auto-replied"
    assert msg.get_content_type() == "multipart/report" and msg.get_param("report-type") == "delivery-status"
    text, status, headers = msg.get_payload()
    assert text.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"
    fields = status.as_bytes()
    assert b"Reporting-MTA: dns; mx.cmcd.test" in fields
    assert b"Final-Recipient: rfc822; bob@dst.test\r\nAction: failed\r\nStatus: 5.1.1" in fields
    assert b"Remote-MTA: dns; mx1.dst.test" in fields and b"Diagnostic-Code: smtp; 550 5.1.1 no such user" in fields
    assert b"Final-Recipient: rfc822; carol@dst.test\r\nAction: failed\r\nStatus: 4.4.1" in fields
    assert msg["Subject"] == "Undelivered Mail: delivery time expired"
    assert b"Subject: invoice 42" in raw and b"SECRET BODY LINE" not in raw


def test_remote_text_cannot_add_headers_or_parts() -> None:
    evil = "550 5.7.1 nope\r\nX-Injected: 1\r\n--boundary"
    raw = build([dsn.failed("bob@dst.test", evil, "mx\r\nX-Evil: 1", expired=False)])
    assert b"\r\nX-Injected" not in raw and b"\r\nX-Evil" not in raw
    assert raw.count(b"Content-Type:") == 4  # the report and its three parts, nothing more


def test_status_without_an_enhanced_code() -> None:
    assert dsn.failed("a@b.test", "550 mailbox unavailable", "", expired=False).status == "5.0.0"
    assert dsn.failed("a@b.test", "", "", expired=True).status == "4.4.7"
    assert dsn.failed("a@b.test", "5.1.10 null MX", "", expired=False).diagnostic.startswith("x-cmcd; ")


# -- internationalised reports (RFC 6533) --------------------------------------------------------

JP = "ユーザー@例え.jp"
UTF8_ORIGINAL = (
    "From: Jürgen <jürgen@bücher.example>\r\nTo: ユーザー@例え.jp\r\nSubject: Grüße\r\n\r\nSECRET BODY LINE\r\n"
).encode()


def build_utf8(
    recipients: list[dsn.FailedRecipient], *, sender: str = "alice@acme.test", original: bytes = UTF8_ORIGINAL
) -> bytes:
    return dsn.build(
        hostname="mx.cmcd.test",
        queue_id="25XFN2TPNZJ8XP4LR",
        sender=sender,
        arrival=1_700_000_000.0,
        now=1_700_000_600.0,
        recipients=recipients,
        headers=dsn.original_headers(original),
    )


def parts(raw: bytes) -> tuple[email.message.EmailMessage, list[email.message.EmailMessage]]:
    msg = email.message_from_bytes(raw, policy=email.policy.SMTPUTF8)
    assert isinstance(msg, email.message.EmailMessage) and not msg.defects
    return msg, list(msg.iter_parts())  # type: ignore[arg-type]


def test_a_utf8_recipient_gets_a_global_report_with_the_address_as_written() -> None:
    raw = build_utf8(
        [
            dsn.failed(JP, "5.6.7 SMTPUTF8 is required, but host mx.plain.test does not offer it", "", False, "policy"),
            dsn.failed("bob@dst.test", "550 5.1.1 no such user", "mx1.dst.test", expired=False),
        ]
    )
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
    msg, (text, status, headers) = parts(raw)
    assert msg.get_content_type() == "multipart/report" and msg.get_param("report-type") == "global-delivery-status"
    assert (
        b"\r\nTo: <alice@acme.test>\r\n" in raw and raw.split(b"\r\n\r\n", 1)[0].isascii()
    )  # its header needs no SMTPUTF8
    assert text.get_content_type() == "text/plain" and text.get_content_charset() == "utf-8"
    assert f"<{JP}>: 5.6.7 SMTPUTF8 is required".encode() in raw and b"(class: policy)" in raw
    assert status.get_content_type() == "message/global-delivery-status"
    assert headers.get_content_type() == "message/global-headers"  # the original's header holds UTF-8
    assert f"\r\n\r\nFinal-Recipient: utf-8; {JP}\r\nAction: failed\r\nStatus: 5.6.7\r\n".encode() in raw
    assert b"X-Cmcd-Bounce-Class: policy" in raw
    assert b"Final-Recipient: rfc822; bob@dst.test\r\nAction: failed\r\nStatus: 5.1.1" in raw  # ASCII stays rfc822
    assert "From: Jürgen <jürgen@bücher.example>\r\n".encode() in raw and b"SECRET BODY LINE" not in raw
    assert raw.count(b"Content-Transfer-Encoding: 8bit") == 4  # the report itself (RFC 2045 section 6.4) and its parts


def test_unitext_escapes_what_the_address_type_reserves() -> None:
    """RFC 6533 3: controls, space, '\\', '+' and '=' as \\x{HEX}; UTF-8 as it is."""
    assert dsn.unitext(JP) == JP
    assert dsn.unitext("jöran+tag=x@例え.jp") == "jöran\\x{2B}tag\\x{3D}x@例え.jp"
    assert dsn.unitext("a\\b\x7f\u2028c@x.jp") == "a\\x{5C}b\\x{7F}\\x{2028}c@x.jp"
    raw = build_utf8([dsn.failed("jöran+tag@例え.jp", "550 5.1.1 no", "", False)])
    assert "Final-Recipient: utf-8; jöran\\x{2B}tag@例え.jp\r\n".encode() in raw


def test_a_utf8_sender_is_written_in_its_ascii_form_when_it_has_one() -> None:
    raw = build_utf8([dsn.failed("bob@dst.test", "550 5.1.1 no", "", False)], sender="alice@bücher.example")
    msg, _ = parts(raw)
    assert msg.get_param("report-type") == "global-delivery-status"
    assert b"\r\nTo: <alice@xn--bcher-kva.example>\r\n" in raw
    raw = build_utf8([dsn.failed("bob@dst.test", "550 5.1.1 no", "", False)], sender=JP)
    assert f"\r\nTo: <{JP}>\r\n".encode() in raw  # no ASCII form: UTF-8 in the header (RFC 6532)


def test_a_global_report_returns_an_ascii_or_non_utf8_header_as_text_rfc822_headers() -> None:
    plain = b"From: <alice@acme.test>\r\nSubject: hi\r\n\r\nx\r\n"
    latin1 = b"From: <alice@acme.test>\r\nSubject: Gr\xfc\xdfe\r\n\r\nx\r\n"  # 8-bit, not UTF-8
    for original in (plain, latin1):
        raw = build_utf8([dsn.failed(JP, "550 5.1.1 no", "", False)], original=original)
        _, (_, status, headers) = parts(raw)
        assert status.get_content_type() == "message/global-delivery-status"
        assert headers.get_content_type() == "text/rfc822-headers"


def test_an_ascii_report_is_what_it_always_was() -> None:
    """ASCII addresses: RFC 3464 as before, even when the returned header has 8-bit bytes."""
    raw = build_utf8([dsn.failed("bob@dst.test", "550 5.1.1 no", "", False)])
    msg, (text, status, headers) = parts(raw)
    assert msg.get_param("report-type") == "delivery-status" and b"8bit" not in raw and b"utf-8;" not in raw
    assert text.get_content_charset() == "us-ascii" and status.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"
    assert raw.split(b"--25XFN2TPNZJ8XP4LR")[0].replace(b"\r\n", b"\n").split(b"\n\n")[0].isascii()


def test_a_remote_reply_cannot_break_a_utf8_report() -> None:
    raw = build_utf8([dsn.failed(JP, "550 5.1.1 n\u2028o\r\nX-Injected: 1 ü", "mx\r\nX-Evil: 1", False)])
    assert b"\r\nX-Injected" not in raw and b"\r\nX-Evil" not in raw
    assert raw.count(b"Content-Type:") == 4


@pytest.mark.parametrize(
    ("sender", "failed", "needs", "refused"),
    [
        ("alice@acme.test", JP, False, frozenset()),
        ("alice@bücher.example", "bob@dst.test", True, frozenset()),
        (JP, "bob@dst.test", True, frozenset({0})),
    ],
    ids=["ascii-sender", "idn-sender-goes-as-a-label", "utf8-sender-needs-smtputf8"],
)
def test_what_delivery_makes_of_a_global_report(sender: str, failed: str, needs: bool, refused: frozenset[int]) -> None:
    """The report travels to SENDER from the null sender: it needs SMTPUTF8 exactly when its own header
    does, which is when SENDER has a non-ASCII local part, and the envelope already says so (the
    8bit parts need 8BITMIME only)."""
    raw = build_utf8([dsn.failed(failed, "550 5.1.1 no", "", False)], sender=sender)
    assert intl.needs_smtputf8("", [sender], raw) is needs
    assert intl.refused_without_smtputf8("", [sender], raw) == refused
