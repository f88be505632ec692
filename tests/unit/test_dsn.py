"""The bounce report (RFC 3464): structure, what it carries, and what it never carries."""

from __future__ import annotations

import email
import email.policy

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
