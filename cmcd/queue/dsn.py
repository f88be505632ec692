"""Delivery status notifications (RFC 3464): the bounce a sender gets for recipients that failed.

A report on a message with a non-ASCII sender or failed recipient is an internationalised one
(RFC 6533): report-type global-delivery-status, a message/global-delivery-status part whose
non-ASCII addresses have the utf-8 address type (``Final-Recipient: utf-8; ユーザー@例え.jp``, in the
utf-8-addr-unitext form), a UTF-8 text part, and the returned header block as message/global-headers
when it holds UTF-8. Those parts are 8bit MIME entities: the report needs 8BITMIME, and SMTPUTF8 only
when its own header does, which is when its recipient (the sender) has a non-ASCII local part, so
the envelope already says so (cmcd.intl.needs_smtputf8); its To: field writes the sender in its ASCII
form when it has one (cmcd.intl.header_form). Any other report is byte for byte an RFC 3464 one.

Pure: builds bytes from what the queue knows. The report carries the original message's
header block only (RFC 3462 text/rfc822-headers), never its body, so a bounce cannot leak
content to a forged sender and stays small. The report quotes remote replies, which echo the
recipient: it is queued like any message, its body encrypted in the spool.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from email.utils import format_datetime

from cmcd import intl

MAX_HEADER_BYTES = 64 * 1024
MAX_FIELD_OCTETS = 900


@dataclass(frozen=True)
class FailedRecipient:
    address: str
    status: str  # enhanced code, e.g. "5.1.1"
    diagnostic: str  # "smtp; 550 5.1.1 ..." for a remote reply, "x-cmcd; ..." for cmcd's own reason
    remote_mta: str  # the host that answered, "" when none did
    expired: bool
    bounce_class: str = ""  # what kind of failure (cmcd/bounces.py), "" when not classed


def failed(address: str, reply: str, remote_mta: str, expired: bool, bounce_class: str = "") -> FailedRecipient:
    """A recipient's DSN entry from its last reply (RFC 3463 code kept when the reply has one)."""
    status = "4.4.7" if expired else "5.0.0"
    for word in reply.split()[:2]:
        parts = word.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts) and parts[0] in ("4", "5"):
            status = word
            break
    diagnostic = f"smtp; {reply}" if reply[:3].isdigit() else f"x-cmcd; {reply or 'delivery failed'}"
    return FailedRecipient(address, status, diagnostic, remote_mta, expired, bounce_class)


def _clean(text: str) -> str:
    """One line of printable ASCII: nothing from a remote server may add a header or a part."""
    return "".join(c if " " <= c <= "~" else "?" for c in " ".join(text.split()))[:MAX_FIELD_OCTETS]


def _clean_utf8(text: str) -> str:
    """One line of printable characters (UTF-8), at most MAX_FIELD_OCTETS octets of it."""
    out, size = [], 0
    for c in " ".join(text.split()):
        c = c if c.isprintable() else "?"
        size += len(c.encode("utf-8"))
        if size > MAX_FIELD_OCTETS:
            break
        out.append(c)
    return "".join(out)


def unitext(address: str) -> str:
    """ADDRESS in RFC 6533's utf-8-addr-unitext form: UTF-8 as it is, and each ASCII control, space,
    '\\', '+' and '=' (and anything else that is not printable) as an EmbeddedUnicodeChar, \\x{HEX}.
    Addresses are at most 254 octets (cmcd.tenancy.rules): the result fits one line."""
    return "".join(f"\\x{{{ord(c):02X}}}" if _escaped(c) else c for c in address)


def _escaped(c: str) -> bool:
    return c <= " " or c in "\\+=\x7f" or not c.isprintable()


def _address_field(address: str) -> str:
    """An address-type and address for Final-Recipient: rfc822 for ASCII, utf-8 (RFC 6533) otherwise."""
    return f"rfc822; {_clean(address)}" if address.isascii() else f"utf-8; {unitext(address)}"


def original_headers(body: bytes) -> bytes:
    end = body.find(b"\r\n\r\n")
    block = body[: end + 2] if end >= 0 else body
    if len(block) > MAX_HEADER_BYTES:
        block = block[:MAX_HEADER_BYTES].rsplit(b"\r\n", 1)[0] + b"\r\n"
    return block


def build(
    *,
    hostname: str,
    queue_id: str,
    sender: str,
    arrival: float,
    now: float,
    recipients: list[FailedRecipient],
    headers: bytes,
) -> bytes:
    """A multipart/report delivery-status message to SENDER, from MAILER-DAEMON@HOSTNAME; a
    global-delivery-status one (RFC 6533) when SENDER or a recipient is not ASCII."""
    utf8 = not sender.isascii() or not all(r.address.isascii() for r in recipients)
    boundary = f"{queue_id}.{os.urandom(6).hex()}/{hostname}"
    date = format_datetime(datetime.datetime.fromtimestamp(now, datetime.UTC))
    arrived = format_datetime(datetime.datetime.fromtimestamp(arrival, datetime.UTC))
    expired = any(r.expired for r in recipients)
    subject = "Undelivered Mail Returned to Sender" if not expired else "Undelivered Mail: delivery time expired"
    show = _clean_utf8 if utf8 else _clean
    report_type = "global-delivery-status" if utf8 else "delivery-status"
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{show(intl.header_form(sender)) if utf8 else _clean(sender)}>",
        f"Subject: {subject}",
        f"Date: {date}",
        f"Message-ID: <{queue_id}.dsn.{os.urandom(4).hex()}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type={report_type}; boundary="{boundary}"',
        *(("Content-Transfer-Encoding: 8bit",) if utf8 else ()),  # its parts are 8bit (RFC 2045 section 6.4)
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        *(
            ("Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit")
            if utf8
            else ("Content-Type: text/plain; charset=us-ascii",)
        ),
        "",
        f"This is the mail system at host {hostname}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "",
    ]
    for r in recipients:
        kind = f" (class: {_clean(r.bounce_class)})" if r.bounce_class else ""
        lines.append(f"<{show(r.address)}>: {_clean(r.diagnostic.split(';', 1)[-1])}{kind}")
    lines += [
        "",
        f"--{boundary}",
        *(
            ("Content-Type: message/global-delivery-status", "Content-Transfer-Encoding: 8bit")
            if utf8
            else ("Content-Type: message/delivery-status",)
        ),
        "",
        f"Reporting-MTA: dns; {hostname}",
        f"X-Cmcd-Queue-ID: {queue_id}",
        f"Arrival-Date: {arrived}",
        "",
    ]
    for r in recipients:
        lines += [
            f"Final-Recipient: {_address_field(r.address)}",
            "Action: failed",
            f"Status: {r.status}",
        ]
        if r.remote_mta:
            lines.append(f"Remote-MTA: dns; {_clean(r.remote_mta)}")
        lines.append(f"Diagnostic-Code: {_clean(r.diagnostic)}")
        if r.bounce_class:  # an extension field (RFC 3464 section 2.4)
            lines.append(f"X-Cmcd-Bounce-Class: {_clean(r.bounce_class)}")
        lines.append("")
    if utf8 and not headers.isascii() and _is_utf8(headers):
        lines += [f"--{boundary}", "Content-Type: message/global-headers", "Content-Transfer-Encoding: 8bit", ""]
    else:
        lines += [f"--{boundary}", "Content-Type: text/rfc822-headers", ""]
    head = "\r\n".join(lines).encode("utf-8" if utf8 else "ascii") + b"\r\n"
    original = headers if headers.endswith(b"\r\n") or not headers else headers + b"\r\n"
    return head + original + f"\r\n--{boundary}--\r\n".encode("ascii")


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
