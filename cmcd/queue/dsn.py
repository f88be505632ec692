"""Delivery status notifications (RFC 3464): the bounce a sender gets for recipients that failed.

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

MAX_HEADER_BYTES = 64 * 1024


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
    return "".join(c if " " <= c <= "~" else "?" for c in " ".join(text.split()))[:900]


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
    """A multipart/report delivery-status message to SENDER, from MAILER-DAEMON@HOSTNAME."""
    boundary = f"{queue_id}.{os.urandom(6).hex()}/{hostname}"
    date = format_datetime(datetime.datetime.fromtimestamp(now, datetime.UTC))
    arrived = format_datetime(datetime.datetime.fromtimestamp(arrival, datetime.UTC))
    expired = any(r.expired for r in recipients)
    subject = "Undelivered Mail Returned to Sender" if not expired else "Undelivered Mail: delivery time expired"
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{_clean(sender)}>",
        f"Subject: {subject}",
        f"Date: {date}",
        f"Message-ID: <{queue_id}.dsn.{os.urandom(4).hex()}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        f"This is the mail system at host {hostname}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "",
    ]
    for r in recipients:
        kind = f" (class: {_clean(r.bounce_class)})" if r.bounce_class else ""
        lines.append(f"<{_clean(r.address)}>: {_clean(r.diagnostic.split(';', 1)[-1])}{kind}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {hostname}",
        f"X-Cmcd-Queue-ID: {queue_id}",
        f"Arrival-Date: {arrived}",
        "",
    ]
    for r in recipients:
        lines += [
            f"Final-Recipient: rfc822; {_clean(r.address)}",
            "Action: failed",
            f"Status: {r.status}",
        ]
        if r.remote_mta:
            lines.append(f"Remote-MTA: dns; {_clean(r.remote_mta)}")
        lines.append(f"Diagnostic-Code: {_clean(r.diagnostic)}")
        if r.bounce_class:  # an extension field (RFC 3464 section 2.4)
            lines.append(f"X-Cmcd-Bounce-Class: {_clean(r.bounce_class)}")
        lines.append("")
    lines += [f"--{boundary}", "Content-Type: text/rfc822-headers", ""]
    head = "\r\n".join(lines).encode("ascii") + b"\r\n"
    original = headers if headers.endswith(b"\r\n") or not headers else headers + b"\r\n"
    return head + original + f"\r\n--{boundary}--\r\n".encode("ascii")
