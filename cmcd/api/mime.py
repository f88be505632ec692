"""Write checked message parts as RFC 5322/MIME bytes with CRLF line endings; never checks a request.

Two writers give the same result: render() through the email package (POST /v1/emails), and
Static (what a mail merge's messages share, rendered once) with a fast path from bytes for each
recipient's pieces (POST /v1/emails/bulk). Custom header values are written as given, folded
only at their own whitespace. The values come checked from fields.py; compose.py checks the
result's line lengths and size.
"""

from __future__ import annotations

import binascii
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email import policy as email_policy
from email.headerregistry import Address, BaseHeader, HeaderRegistry, UnstructuredHeader
from email.message import EmailMessage, MIMEPart
from email.policy import Policy
from email.utils import format_datetime, make_msgid
from typing import Any, cast

from cmcd import intl

MAX_LINE_OCTETS = 998  # RFC 5322 2.1.1, excluding CRLF
ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"  # RFC 5322 atext: a dot-atom's and a plain phrase's words
_WORDS = re.compile(r"([ \t]+)")
_NOT_7BIT = re.compile(r"[^\t\r\n\x20-\x7e]")
_CRLF = b"\r\n"
_PHRASE = re.compile(rf"{ATEXT}(?: {ATEXT})*")


class _VerbatimHeader(UnstructuredHeader, BaseHeader):
    """Custom headers: an ASCII value is written exactly as given, folded only at its own whitespace (a long
    List-Unsubscribe URL must not become an encoded-word); a non-ASCII X-* value is RFC 2047 encoded as usual."""

    @classmethod
    def parse(cls, value: str, kwds: dict[str, Any]) -> None:
        super().parse(value, kwds)
        if value.isascii():
            kwds["decoded"] = value

    def fold(self, *, policy: Policy) -> str:
        value = str(self)
        if not value.isascii():
            return super().fold(policy=policy)
        return policy.linesep.join(fold_words(self.name, value, policy.max_line_length or 78)) + policy.linesep


_REGISTRY = HeaderRegistry(default_class=_VerbatimHeader)
_BUILD_POLICY = email_policy.SMTP.clone(header_factory=_REGISTRY)


def fold_words(name: str, value: str, width: int) -> list[str]:
    """Fold `name: value` at the value's whitespace; unfolding gives the value back exactly."""
    pieces = _WORDS.split(value)  # word, space, word, ...
    lines = [f"{name}: {pieces[0]}"]
    for i in range(1, len(pieces) - 1, 2):
        chunk = pieces[i] + pieces[i + 1]
        if len(lines[-1]) + len(chunk) <= width or not pieces[i + 1]:  # never a whitespace-only line
            lines[-1] += chunk
        else:
            lines.append(chunk)
    return lines


@dataclass(frozen=True)
class Mailbox:
    """A checked address and its display name ("" for none), as a header writes it."""

    name: str
    local: str
    domain: str

    @property
    def addr(self) -> str:
        """The address as written: what the envelope carries."""
        return f"{self.local}@{self.domain}"

    @property
    def header_addr(self) -> str:
        """The address as a header writes it (cmcd.intl.header_form): ASCII when it has an ASCII form."""
        return intl.header_form(self.addr)

    @property
    def utf8(self) -> bool:
        """The header must carry this address in UTF-8 (RFC 6532): its local part is not ASCII."""
        return not self.local.isascii()

    def header(self) -> Address:
        local, _, domain = self.header_addr.rpartition("@")
        return Address(display_name=self.name, username=local, domain=domain)

    @property
    def needs_encoding(self) -> bool:
        return bool(self.name) and (not self.name.isascii() or "=?" in self.name)


def _encoded_words(text: str, max_bytes: int = 45) -> list[str]:
    """TEXT as RFC 2047 "B" encoded words of at most MAX_BYTES UTF-8 bytes each (72 characters),
    split between characters only: every character, spaces included, is inside a word, so a
    decoder (which drops the white space between encoded words) gives TEXT back exactly."""
    words, chunk = [], b""
    for ch in text:
        b = ch.encode("utf-8")
        if chunk and len(chunk) + len(b) > max_bytes:
            words.append(chunk)
            chunk = b""
        chunk += b
    if chunk:
        words.append(chunk)
    return ["=?utf-8?b?" + binascii.b2a_base64(w, newline=False).decode("ascii") + "?=" for w in words]


def _phrase(name: str) -> str:
    """An ASCII display name as a phrase: as it is when it is plain words, else a quoted string."""
    if _PHRASE.fullmatch(name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _encoded_mailboxes(name: str, boxes: Sequence[Mailbox]) -> bytes:
    """An address header whose display names need encoding, or whose addresses are UTF-8 (RFC 6532:
    raw in the header, the names still RFC 2047 encoded), folded by hand: the email package folds
    such a name between encoded words and loses the space there ("A : B" becomes "A: B")."""
    lines = [f"{name}:"]
    for i, box in enumerate(boxes):
        if box.utf8 and box.name and not box.needs_encoding:
            words = [_phrase(box.name)]
        else:
            words = _encoded_words(box.name) if box.name else []
        parts = words + [f"<{box.header_addr}>" if box.name else box.header_addr]
        if i < len(boxes) - 1:
            parts[-1] += ","
        for part in parts:
            if len(lines[-1]) + 1 + len(part) <= 78 or lines[-1] == f"{name}:":
                lines[-1] += " " + part
            else:
                lines.append(" " + part)
    return "\r\n".join(lines).encode("utf-8") + _CRLF


def _set_mailboxes(msg: EmailMessage, name: str, boxes: Sequence[Mailbox], utf8: dict[bytes, bytes]) -> None:
    """Set the address header NAME; one with a UTF-8 address is set to a placeholder that render()
    replaces with the field in UTF-8 (UTF8 maps one to the other): the email package writes a raw
    UTF-8 header only under a policy that would also write every Subject raw."""
    if any(b.utf8 for b in boxes):
        mark = f"cmcd-utf8-{secrets.token_hex(12)}"
        msg.set_raw(name, mark)
        utf8[f"{name}: {mark}\r\n".encode("ascii")] = _encoded_mailboxes(name, boxes)
    elif any(b.needs_encoding for b in boxes):  # as written here, never refolded (ASCII, lines within 78)
        msg.set_raw(name, _encoded_mailboxes(name, boxes).decode("ascii")[len(name) + 2 : -2])
    elif len(boxes) == 1:
        msg[name] = boxes[0].header()
    else:
        msg[name] = [b.header() for b in boxes]


def attachment_part(data: bytes, maintype: str, subtype: str, filename: str) -> MIMEPart:
    """An attachment as a MIME part, encoded once (every message of a mail merge shares it)."""
    part = MIMEPart(policy=_BUILD_POLICY)
    part.set_content(data, maintype=maintype, subtype=subtype, disposition="attachment", filename=filename)
    return part


def _text_cte(text: str) -> str:
    """7bit for printable ASCII in lines of at most 78 characters, quoted-printable otherwise."""
    if _NOT_7BIT.search(text) or any(len(line) > 78 for line in text.splitlines()):
        return "quoted-printable"
    return "7bit"


def render(
    sender: Mailbox,
    reply_to: Mailbox | None,
    attachments: Sequence[MIMEPart],
    *,
    to: Sequence[Mailbox],
    cc: Sequence[Mailbox],
    subject: str,
    text: str | None,
    html_body: str | None,
    headers: Sequence[tuple[str, str]],
    now: datetime,
) -> bytes:
    """The message's CRLF bytes, written by the email package (the caller checks line lengths and size)."""
    msg = EmailMessage(policy=_BUILD_POLICY)
    utf8: dict[bytes, bytes] = {}
    _set_mailboxes(msg, "From", [sender], utf8)
    _set_mailboxes(msg, "To", to, utf8)
    if cc:
        _set_mailboxes(msg, "Cc", cc, utf8)
    if reply_to is not None:
        _set_mailboxes(msg, "Reply-To", [reply_to], utf8)
    msg["Subject"] = subject
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = make_msgid(domain=intl.domain_key(sender.addr))
    msg["MIME-Version"] = "1.0"
    for name, value in headers:
        msg[name] = value
    if text is not None:
        msg.set_content(text, subtype="plain", charset="utf-8", cte=_text_cte(text))
        if html_body is not None:
            msg.add_alternative(html_body, subtype="html", charset="utf-8", cte=_text_cte(html_body))
    elif html_body is not None:
        msg.set_content(html_body, subtype="html", charset="utf-8", cte=_text_cte(html_body))
    if attachments:
        msg.make_mixed()
        for part in attachments:  # shared, already encoded; flattening does not change them
            msg.attach(cast(EmailMessage, part))  # typeshed wants EmailMessage; a MIMEPart is what fits
    out = msg.as_bytes(policy=email_policy.SMTP)
    if utf8:
        head, sep, rest = out.partition(_CRLF + _CRLF)
        head += _CRLF
        for mark, field in utf8.items():
            head = head.replace(mark, field, 1)
        out = head[:-2] + sep + rest
    return out


# The bulk path assembles each message from bytes: the email package costs milliseconds a message, a mail merge
# of 1,000 must take well under a second. Whatever is the same for every recipient is rendered once (by the email
# package where it is not trivial: attachments, non-ASCII names); the per-recipient pieces take a fast path when
# they are plain ASCII and fall back to the email package otherwise. Tests compare the result with compose_one's.


def _fold_with_email(name: str, value: object) -> bytes:
    """One header folded by the email package (the general, slow path)."""
    header = _BUILD_POLICY.header_factory(name, value)
    return str(header.fold(policy=email_policy.SMTP)).encode("ascii")


def _mailbox_header(name: str, box: Mailbox) -> bytes:
    if box.utf8:
        return _encoded_mailboxes(name, [box])
    line = ""
    if not box.name:
        line = f"{name}: {box.header_addr}"
    elif box.name.isascii() and "=?" not in box.name:
        line = f"{name}: {_phrase(box.name)} <{box.header_addr}>"
    if line and len(line) <= 78:
        return line.encode("ascii") + _CRLF
    if box.needs_encoding:
        return _encoded_mailboxes(name, [box])
    return _fold_with_email(name, box.header())


def _unstructured_header(name: str, value: str) -> bytes:
    """Subject and custom headers: ASCII folded at its whitespace, anything else RFC 2047 encoded."""
    if value.isascii() and "=?" not in value:
        lines = fold_words(name, value, 78)
        if name != "Subject" or all(len(line) <= 78 for line in lines):
            return "\r\n".join(lines).encode("ascii") + _CRLF
    return _fold_with_email(name, value)


def _text_entity(text: str, subtype: str) -> bytes:
    """A text/plain or text/html part, headers included, as the email package would write it."""
    data = _CRLF.join(text.encode("utf-8").splitlines()) + _CRLF
    cte = _text_cte(text)
    if cte == "quoted-printable":
        data = binascii.b2a_qp(data, quotetabs=False, istext=True, header=False)
    head = f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n\r\n'
    return head.encode("ascii") + data


def _multipart(subtype: str, parts: Sequence[bytes], checked: int) -> bytes:
    """A multipart entity around complete parts; the first `checked` are searched for the boundary."""
    while True:
        boundary = ("=_" + secrets.token_hex(16)).encode("ascii")
        if not any(b"--" + boundary in part for part in parts[:checked]):
            break
    head = b"Content-Type: multipart/" + subtype.encode("ascii") + b';\r\n boundary="' + boundary + b'"\r\n\r\n'
    delimiter = b"\r\n--" + boundary
    return head + delimiter[2:] + _CRLF + (delimiter + _CRLF).join(parts) + delimiter + b"--" + _CRLF


@dataclass(frozen=True)
class Static:
    """The bytes a mail merge's messages share."""

    before_to: bytes  # From
    before_subject: bytes  # Reply-To
    before_custom: bytes  # Date, MIME-Version
    attachments: tuple[bytes, ...]
    domain: str

    @classmethod
    def build(cls, sender: Mailbox, reply_to: Mailbox | None, attachments: Sequence[MIMEPart], now: datetime) -> Static:
        return cls(
            before_to=_mailbox_header("From", sender),
            before_subject=b"" if reply_to is None else _mailbox_header("Reply-To", reply_to),
            before_custom=f"Date: {format_datetime(now)}\r\n".encode("ascii"),
            attachments=tuple(part.as_bytes(policy=email_policy.SMTP) for part in attachments),
            domain=intl.domain_key(sender.addr),
        )

    def assemble(
        self,
        *,
        to: Mailbox,
        subject: str,
        text: str | None,
        html_body: str | None,
        headers: Sequence[tuple[str, str]],
    ) -> bytes:
        """One recipient's message, in compose_one's header order and MIME structure (the caller
        checks line lengths and size)."""
        chunks = [
            self.before_to,
            _mailbox_header("To", to),
            self.before_subject,
            _unstructured_header("Subject", subject),
            self.before_custom,
            f"Message-ID: {make_msgid(domain=self.domain)}\r\nMIME-Version: 1.0\r\n".encode("ascii"),
        ]
        chunks += [_unstructured_header(name, value) for name, value in headers]
        parts = [_text_entity(body, sub) for body, sub in ((text, "plain"), (html_body, "html")) if body is not None]
        content = parts[0] if len(parts) == 1 else _multipart("alternative", parts, len(parts))
        if self.attachments:
            content = _multipart("mixed", [content, *self.attachments], 1)
        chunks.append(content)
        return b"".join(chunks)
