"""Turn tenant API JSON into RFC 5322 messages (one, or a mail merge); never applies policy or touches the spool.

The HTTP handler passes the decoded JSON body; what comes back is an envelope (sender, recipients) and CRLF bytes
ready for the same intake path as SMTP, where limits, suppression and DKIM happen. Everything a tenant can put
into a header is checked here, so no request can inject a header or override From/To/DKIM-Signature/Received:
custom headers are limited to X-* (except cmcd's own X-Cmcd-*) and a few List-*/threading headers, and no value
may hold a line break. Bcc recipients reach the envelope only. Errors name the offending field JSON-pointer-ish
(``to[3]``, ``headers.X-Foo``, ``attachments[0].content``, ``recipients[7].merge.first_name``, ``size``).
"""

from __future__ import annotations

import binascii
import functools
import html
import math
import mimetypes
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy as email_policy
from email.headerregistry import Address, BaseHeader, HeaderRegistry, UnstructuredHeader
from email.message import EmailMessage, MIMEPart
from email.policy import Policy
from email.utils import format_datetime, make_msgid
from typing import Any, cast

from cmcd.tenancy.rules import address_refusal

MAX_LINE_OCTETS = 998  # RFC 5322 2.1.1, excluding CRLF
MAX_SUBJECT_CHARS = 998
MAX_HEADER_VALUE_CHARS = 998
MAX_NAME_CHARS = 200  # display names
MAX_FILENAME_CHARS = 255
MAX_TAGS = 10
MAX_MERGE_KEYS = 50
MAX_MERGE_VALUE_CHARS = 10_000

ONE_KEYS = frozenset(
    {"from", "to", "cc", "bcc", "reply_to", "subject", "text", "html", "attachments", "headers", "tags"}
)
BULK_KEYS = frozenset({"from", "reply_to", "subject", "text", "html", "attachments", "headers", "tags", "recipients"})
LIST_HEADERS = ("List-Unsubscribe", "List-Unsubscribe-Post", "List-Id", "In-Reply-To", "References")

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL_PART = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})+")
_NAME_ADDR = re.compile(r"\s*(.*?)\s*<([^<>]*)>\s*", re.S)
_ASCII_CTL = re.compile(r"[\x00-\x1f\x7f]")
# Anything str.splitlines() or a mail parser could take for a line break, plus the other controls (TAB is fine).
_HEADER_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_NAME_BAD = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# What a merge value loses in a header context: every line break str.splitlines() knows.
_LINE_BREAKS = re.compile(r"[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
_X_HEADER = re.compile(r"X-[A-Za-z0-9-]{1,70}", re.I)
_TAG = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_MIME_TOKEN = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
_CONTENT_TYPE = re.compile(rf"({_MIME_TOKEN})/({_MIME_TOKEN})")
_FILENAME_BAD = re.compile(r"[/\\\x00-\x1f\x7f-\x9f\u2028\u2029]")
_B64_SPACE = re.compile(r"[ \t\r\n]+")
_PLACEHOLDER = re.compile(r"\{\{[ \t]*([A-Za-z0-9_]{1,64})[ \t]*\}\}")
_MERGE_KEY = re.compile(r"[A-Za-z0-9_]{1,64}")
_WORDS = re.compile(r"([ \t]+)")
_NOT_7BIT = re.compile(r"[^\t\r\n\x20-\x7e]")


class ComposeError(ValueError):
    """A request that cannot become a message: `field` says where (``to[3]``, ``headers.X-Foo``), `detail` what."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(field, detail)
        self.field = field
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.field}: {self.detail}" if self.field else self.detail


@dataclass(frozen=True)
class Composed:
    """One message for the intake path: envelope and CRLF bytes."""

    mail_from: str
    rcpts: list[str]  # to+cc+bcc, deduplicated case-insensitively, order kept
    body: bytes  # CRLF line endings, ready for SMTP
    tags: tuple[str, ...]


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
        return policy.linesep.join(_fold_words(self.name, value, policy.max_line_length or 78)) + policy.linesep


_REGISTRY = HeaderRegistry(default_class=_VerbatimHeader)
_BUILD_POLICY = email_policy.SMTP.clone(header_factory=_REGISTRY)


def _fold_words(name: str, value: str, width: int) -> list[str]:
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
class _Mailbox:
    name: str
    local: str
    domain: str

    @property
    def addr(self) -> str:
        return f"{self.local}@{self.domain}"

    def header(self) -> Address:
        return Address(display_name=self.name, username=self.local, domain=self.domain)


@dataclass(frozen=True)
class _Common:
    """What every message of a request shares, checked once."""

    sender: _Mailbox
    reply_to: _Mailbox | None
    attachments: tuple[MIMEPart, ...]
    tags: tuple[str, ...]


def _show(value: object) -> str:
    """A short repr for error messages: never echo a huge value."""
    if isinstance(value, str) and len(value) > 40:
        return repr(value[:40]) + "..."
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, int | float) else type(value).__name__
    )


def _check_keys(req: object, allowed: frozenset[str], field: str) -> Mapping[str, Any]:
    if not isinstance(req, Mapping):
        raise ComposeError(field, f"must be a JSON object, not {_kind(req)}")
    unknown = [k for k in req if k not in allowed]
    if unknown:
        raise ComposeError(
            f"{field}.{unknown[0]}" if field else str(unknown[0]),
            f"unknown key {_show(unknown[0])}; allowed keys are {', '.join(sorted(allowed))}",
        )
    return req


def _check_addr(addr: str, field: str) -> tuple[str, str]:
    """An address the one address rule takes (cmcd.tenancy.rules.address_refusal, ASCII only: a
    request cannot ask for SMTPUTF8) that can also be written into a header as it is: one '@', a
    dot-atom local part, a host name for the domain. Returns (local, domain)."""
    refusal = address_refusal(addr, smtputf8=False)
    if refusal is not None:
        raise ComposeError(field, _rule_fault(addr) or f"the address {_show(addr)}: {refusal.text}")
    local, _, domain = addr.rpartition("@")
    if "@" in local:
        raise ComposeError(field, f"the address {_show(addr)} has more than one '@'")
    if domain.startswith("["):
        raise ComposeError(field, f"the address {_show(addr)} is an address literal; use a domain name")
    if len(local) > 64 or not _LOCAL_PART.fullmatch(local):
        raise ComposeError(field, _bad_local(addr))
    if len(domain) > 253 or not _DOMAIN.fullmatch(domain) or domain.rpartition(".")[2].isdigit():
        raise ComposeError(field, _bad_domain(addr))
    return local, domain


def _rule_fault(addr: str) -> str:
    """What the address rule refused ADDR for, in the request's words (the rule decides; this says
    which part is at fault, more precisely than an SMTP reply does)."""
    if not addr:
        return "the address is empty"
    if len(addr) > 254:
        return f"the address is {len(addr)} characters long; at most 254 are allowed"
    if not addr.isascii():
        return (
            f"the address {_show(addr)} has non-ASCII characters; internationalised (SMTPUTF8) addresses are "
            "not supported (write a domain in its xn-- form)"
        )
    if _ASCII_CTL.search(addr):
        return f"the address {_show(addr)} contains control characters"
    if " " in addr:
        return f"the address {_show(addr)} contains spaces"
    if "@" not in addr:
        return f"the address {_show(addr)} has no '@'; write local@domain"
    return _bad_local(addr) if addr.startswith("@") else _bad_domain(addr)


def _bad_local(addr: str) -> str:
    return f"the local part of {_show(addr)} is not valid (letters, digits, !#$%&'*+/=?^_`{{|}}~- and dots)"


def _bad_domain(addr: str) -> str:
    return f"the domain of {_show(addr)} is not a valid host name"


def _check_name(name: object, field: str) -> str:
    if name is None:
        return ""
    if not isinstance(name, str):
        raise ComposeError(field, f"the display name must be a string, not {_kind(name)}")
    if len(name) > MAX_NAME_CHARS:
        raise ComposeError(field, f"the display name is {len(name)} characters; at most {MAX_NAME_CHARS}")
    if _NAME_BAD.search(name):
        raise ComposeError(field, "the display name contains control characters or line breaks")
    return name.strip()


def _mailbox(value: object, field: str) -> _Mailbox:
    """An address as "addr", "Name <addr>" or {"email": addr, "name": name}."""
    if isinstance(value, Mapping):
        _check_keys(value, frozenset({"email", "name"}), field)
        addr = value.get("email")
        if not isinstance(addr, str):
            raise ComposeError(f"{field}.email", f"must be a string, not {_kind(addr)}")
        name = _check_name(value.get("name"), field)
    elif isinstance(value, str):
        if len(value) > 600:
            raise ComposeError(field, f"is {len(value)} characters long; an address with its name fits in 600")
        if _NAME_BAD.search(value):
            raise ComposeError(field, f"{_show(value)} contains control characters or line breaks")
        if "<" in value or ">" in value:
            m = _NAME_ADDR.fullmatch(value)
            if m is None:
                raise ComposeError(field, f"{_show(value)} is neither 'addr@domain' nor 'Name <addr@domain>'")
            raw_name, addr = m.group(1), m.group(2).strip()
            if len(raw_name) >= 2 and raw_name[0] == raw_name[-1] == '"':
                raw_name = re.sub(r"\\(.)", r"\1", raw_name[1:-1])
            name = _check_name(raw_name, field)
        else:
            addr, name = value.strip(), ""
    else:
        raise ComposeError(field, f"must be an address string or an object with 'email' and 'name', not {_kind(value)}")
    local, domain = _check_addr(addr, field)
    return _Mailbox(name, local, domain)


def _mailboxes(req: Mapping[str, Any], key: str, *, required: bool, limit: int) -> list[_Mailbox]:
    value = req.get(key)
    if value is None or value == []:
        if required:
            raise ComposeError(key, "is required: a list of at least one address")
        return []
    if not isinstance(value, list):
        raise ComposeError(key, f"must be a list of addresses, not {_kind(value)}")
    if len(value) > limit:
        raise ComposeError(key, f"has {len(value)} addresses; at most {limit} are allowed")
    return [_mailbox(item, f"{key}[{i}]") for i, item in enumerate(value)]


def _check_subject(subject: object, field: str) -> str:
    if not isinstance(subject, str):
        what = "is required" if subject is None else f"must be a string, not {_kind(subject)}"
        raise ComposeError(field, what)
    if len(subject) > MAX_SUBJECT_CHARS:
        raise ComposeError(field, f"is {len(subject)} characters long; at most {MAX_SUBJECT_CHARS} are allowed")
    if _HEADER_BAD.search(subject):
        raise ComposeError(field, "contains a line break (CR/LF) or another control character")
    return subject


def _header_name(name: object) -> str:
    """The canonical spelling of an allowed custom header name, or ComposeError naming it."""
    if not isinstance(name, str):
        raise ComposeError("headers", f"header names must be strings, not {_kind(name)}")
    for allowed in LIST_HEADERS:
        if name.lower() == allowed.lower():
            return allowed
    field = f"headers.{name[:80]}"
    if not _X_HEADER.fullmatch(name):
        raise ComposeError(
            field,
            f"header {_show(name)} may not be set; allowed are X-* names (letters, digits, '-', at most 72 "
            f"characters) and {', '.join(LIST_HEADERS)}",
        )
    if name.lower().startswith("x-cmcd-"):
        raise ComposeError(field, f"header {_show(name)} is reserved for cmcd")
    return name


def _check_header_value(name: str, value: object, field: str) -> str:
    if not isinstance(value, str):
        raise ComposeError(field, f"the value must be a string, not {_kind(value)}")
    if len(value) > MAX_HEADER_VALUE_CHARS:
        raise ComposeError(field, f"the value is {len(value)} characters; at most {MAX_HEADER_VALUE_CHARS}")
    if _HEADER_BAD.search(value):
        raise ComposeError(field, "the value contains a line break (CR/LF), NUL or another control character")
    value = value.strip(" \t")
    if value.isascii():
        if any(len(line) > MAX_LINE_OCTETS for line in _fold_words(name, value, 78)):
            raise ComposeError(field, f"the value has a word too long for a {MAX_LINE_OCTETS}-octet header line")
    elif name in LIST_HEADERS:
        raise ComposeError(field, "the value must be ASCII")
    return value


def _custom_headers(value: object) -> list[tuple[str, str]]:
    """[(canonical name, value)], checked; the values may still hold merge placeholders."""
    if value is None:
        return []
    if not isinstance(value, Mapping):
        raise ComposeError("headers", f"must be an object of header name to value, not {_kind(value)}")
    seen: set[str] = set()
    out = []
    for raw_name, raw_value in value.items():
        name = _header_name(raw_name)
        if name.lower() in seen:
            raise ComposeError(f"headers.{name}", "is given twice (header names are case-insensitive)")
        seen.add(name.lower())
        out.append((name, _check_header_value(name, raw_value, f"headers.{name}")))
    return out


def _tags(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ComposeError("tags", f"must be a list of strings, not {_kind(value)}")
    if len(value) > MAX_TAGS:
        raise ComposeError("tags", f"has {len(value)} tags; at most {MAX_TAGS} are allowed")
    for i, tag in enumerate(value):
        if not isinstance(tag, str) or not _TAG.fullmatch(tag):
            raise ComposeError(f"tags[{i}]", f"{_show(tag)} is not a tag: 1-64 of letters, digits and _.:-")
    return tuple(dict.fromkeys(value))


def _bodies(req: Mapping[str, Any], max_size: int) -> tuple[str | None, str | None]:
    text, html_body = req.get("text"), req.get("html")
    if text is None and html_body is None:
        raise ComposeError("text", "give 'text', 'html' or both")
    for key, body in (("text", text), ("html", html_body)):
        if body is not None and not isinstance(body, str):
            raise ComposeError(key, f"must be a string, not {_kind(body)}")
        if body is not None and len(body) > max_size:
            raise ComposeError(
                "size", f"'{key}' alone is {len(body)} characters; messages are limited to {max_size} bytes"
            )
    return text, html_body


@functools.cache
def _mime_types() -> mimetypes.MimeTypes:
    """Python's built-in table only, so the guess does not depend on the host's /etc/mime.types."""
    return mimetypes.MimeTypes()


def _guess_type(filename: str) -> str:
    ctype, encoding = _mime_types().guess_type(filename, strict=True)
    if encoding is not None:  # x.tar.gz is gzip data, not a tar file
        return {"gzip": "application/gzip", "bzip2": "application/x-bzip2", "xz": "application/x-xz"}.get(
            encoding, "application/octet-stream"
        )
    return ctype or "application/octet-stream"


def _attachment(item: object, field: str, max_size: int) -> MIMEPart:
    req = _check_keys(item, frozenset({"filename", "content", "content_type"}), field)
    filename = req.get("filename")
    if not isinstance(filename, str) or not filename.strip():
        raise ComposeError(f"{field}.filename", "is required: a non-empty string")
    if len(filename) > MAX_FILENAME_CHARS:
        raise ComposeError(f"{field}.filename", f"is {len(filename)} characters; at most {MAX_FILENAME_CHARS}")
    if _FILENAME_BAD.search(filename) or filename in (".", ".."):
        raise ComposeError(f"{field}.filename", f"{_show(filename)} has a path separator or a control character")
    ctype = req.get("content_type")
    if ctype is None:
        ctype = _guess_type(filename)
    if not isinstance(ctype, str) or not (m := _CONTENT_TYPE.fullmatch(ctype)):
        raise ComposeError(f"{field}.content_type", f"{_show(ctype)} is not a MIME type like 'application/pdf'")
    maintype, subtype = m.group(1).lower(), m.group(2).lower()
    if maintype in ("multipart", "message"):
        raise ComposeError(
            f"{field}.content_type", f"{maintype}/* cannot be an attachment; use application/octet-stream"
        )
    content = req.get("content")
    if not isinstance(content, str):
        raise ComposeError(f"{field}.content", f"is required: a base64 string, not {_kind(content)}")
    compact = _B64_SPACE.sub("", content)
    if len(compact) // 4 * 3 > max_size:
        raise ComposeError("size", f"{field} alone decodes to more than the {max_size}-byte message limit")
    try:
        data = binascii.a2b_base64(compact.encode("ascii"), strict_mode=True)
    except (binascii.Error, ValueError):
        raise ComposeError(f"{field}.content", "is not valid base64 (standard alphabet, with padding)") from None
    part = MIMEPart(policy=_BUILD_POLICY)
    part.set_content(data, maintype=maintype, subtype=subtype, disposition="attachment", filename=filename)
    return part


def _common(req: Mapping[str, Any], max_size: int) -> _Common:
    sender = req.get("from")
    if sender is None:
        raise ComposeError("from", "is required: the sender's address")
    reply_to = req.get("reply_to")
    attachments = req.get("attachments")
    if attachments is None:
        attachments = []
    if not isinstance(attachments, list):
        raise ComposeError("attachments", f"must be a list, not {_kind(attachments)}")
    return _Common(
        sender=_mailbox(sender, "from"),
        reply_to=None if reply_to is None else _mailbox(reply_to, "reply_to"),
        attachments=tuple(_attachment(a, f"attachments[{i}]", max_size) for i, a in enumerate(attachments)),
        tags=_tags(req.get("tags")),
    )


def _text_cte(text: str) -> str:
    """7bit for printable ASCII in lines of at most 78 characters, quoted-printable otherwise."""
    if _NOT_7BIT.search(text) or any(len(line) > 78 for line in text.splitlines()):
        return "quoted-printable"
    return "7bit"


def _render(
    common: _Common,
    *,
    to: Sequence[_Mailbox],
    cc: Sequence[_Mailbox],
    subject: str,
    text: str | None,
    html_body: str | None,
    headers: Sequence[tuple[str, str]],
    now: datetime,
    max_size: int,
) -> bytes:
    """The message's CRLF bytes, checked for line length and size."""
    msg = EmailMessage(policy=_BUILD_POLICY)
    msg["From"] = common.sender.header()
    msg["To"] = [m.header() for m in to]
    if cc:
        msg["Cc"] = [m.header() for m in cc]
    if common.reply_to is not None:
        msg["Reply-To"] = common.reply_to.header()
    msg["Subject"] = subject
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = make_msgid(domain=common.sender.domain.lower())
    msg["MIME-Version"] = "1.0"
    for name, value in headers:
        msg[name] = value
    if text is not None:
        msg.set_content(text, subtype="plain", charset="utf-8", cte=_text_cte(text))
        if html_body is not None:
            msg.add_alternative(html_body, subtype="html", charset="utf-8", cte=_text_cte(html_body))
    elif html_body is not None:
        msg.set_content(html_body, subtype="html", charset="utf-8", cte=_text_cte(html_body))
    if common.attachments:
        msg.make_mixed()
        for part in common.attachments:  # shared, already encoded; flattening does not change them
            msg.attach(cast(EmailMessage, part))  # typeshed wants EmailMessage; a MIMEPart is what fits
    return _checked(msg.as_bytes(policy=email_policy.SMTP), max_size)


def _checked(body: bytes, max_size: int) -> bytes:
    """`body` if it fits `max_size` and is CRLF-only with lines of at most 998 octets."""
    if len(body) > max_size:
        raise ComposeError("size", f"the message would be {len(body)} bytes; the limit is {max_size}")
    if body.count(b"\n") != body.count(b"\r\n") or body.count(b"\r") != body.count(b"\r\n"):
        raise ComposeError("message", "the generated message has a bare CR or LF (a bug in cmcd; please report it)")
    if max(map(len, body.split(b"\r\n"))) > MAX_LINE_OCTETS:
        raise ComposeError("message", f"a line of the generated message is longer than {MAX_LINE_OCTETS} octets")
    return body


def _dedup(addrs: Sequence[str]) -> list[str]:
    seen: dict[str, str] = {}
    for addr in addrs:
        seen.setdefault(addr.lower(), addr)
    return list(seen.values())


def _now(now: datetime | None) -> datetime:
    return datetime.now(UTC) if now is None else now.astimezone(UTC)


def compose_one(
    req: dict[str, Any], *, max_rcpts_per_field: int = 10, max_size: int, now: datetime | None = None
) -> Composed:
    """Build the message of `POST /v1/emails`; `now` (aware, default the clock) dates it."""
    req_map = _check_keys(req, ONE_KEYS, "")
    common = _common(req_map, max_size)
    to = _mailboxes(req_map, "to", required=True, limit=max_rcpts_per_field)
    cc = _mailboxes(req_map, "cc", required=False, limit=max_rcpts_per_field)
    bcc = _mailboxes(req_map, "bcc", required=False, limit=max_rcpts_per_field)
    subject = _check_subject(req_map.get("subject"), "subject")
    text, html_body = _bodies(req_map, max_size)
    headers = _custom_headers(req_map.get("headers"))
    body = _render(
        common,
        to=to,
        cc=cc,
        subject=subject,
        text=text,
        html_body=html_body,
        headers=headers,
        now=_now(now),
        max_size=max_size,
    )
    rcpts = _dedup([m.addr for m in (*to, *cc, *bcc)])
    return Composed(mail_from=common.sender.addr, rcpts=rcpts, body=body, tags=common.tags)


@dataclass(frozen=True)
class _Template:
    """A string parsed once: `{{name}}` placeholders become positional fields of a str.format string (literal
    braces doubled), so filling one in is a C-speed format call."""

    text: str  # as given; what a template without placeholders renders to
    fmt: str
    names: tuple[str, ...]  # distinct, in order of first use; field i of `fmt` is names[i]
    uses: tuple[int, ...] = ()  # how often each name occurs
    literal: int = 0  # characters outside the placeholders

    @classmethod
    def parse(cls, text: str) -> _Template:
        pieces = _PLACEHOLDER.split(text)  # literal, name, literal, ...
        names = tuple(dict.fromkeys(pieces[1::2]))
        index = {name: i for i, name in enumerate(names)}
        fmt = "".join(
            piece.replace("{", "{{").replace("}", "}}") if i % 2 == 0 else f"{{{index[piece]}}}"
            for i, piece in enumerate(pieces)
        )
        uses = tuple(pieces[1::2].count(name) for name in names)
        return cls(text, fmt, names, uses, sum(len(p) for p in pieces[0::2]))

    def length(self, values: Mapping[str, str]) -> int:
        """The characters fill() would produce, counted before building it (a value used many times
        must not make a huge string first); a missing value counts as empty (fill() reports it)."""
        return self.literal + sum(n * len(values.get(name, "")) for name, n in zip(self.names, self.uses))

    def fill(self, values: Mapping[str, str], field: str, where: str) -> str:
        if not self.names:
            return self.text
        try:
            return self.fmt.format(*[values[name] for name in self.names])
        except KeyError as missing:
            name = str(missing.args[0])
            raise ComposeError(
                f"{field}.merge.{name}", f"no value for {{{{{name}}}}}, which the {where} uses"
            ) from None


def _merge_values(value: object, field: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ComposeError(f"{field}.merge", f"must be an object of name to value, not {_kind(value)}")
    if len(value) > MAX_MERGE_KEYS:
        raise ComposeError(f"{field}.merge", f"has {len(value)} names; at most {MAX_MERGE_KEYS} are allowed")
    out = {}
    for key, item in value.items():
        if not isinstance(key, str) or not _MERGE_KEY.fullmatch(key):
            raise ComposeError(f"{field}.merge", f"{_show(key)} is not a merge name: 1-64 of letters, digits and _")
        if type(item) is str:
            if len(item) > MAX_MERGE_VALUE_CHARS:
                raise ComposeError(f"{field}.merge.{key}", f"is longer than {MAX_MERGE_VALUE_CHARS} characters")
            out[key] = item
            continue
        if isinstance(item, bool) or not isinstance(item, int | float):
            raise ComposeError(f"{field}.merge.{key}", f"must be a string or a number, not {_kind(item)}")
        if isinstance(item, float) and not math.isfinite(item):
            raise ComposeError(f"{field}.merge.{key}", "must be a finite number")
        try:
            text = str(item)
        except ValueError:  # an int beyond sys.get_int_max_str_digits()
            text = "x" * (MAX_MERGE_VALUE_CHARS + 1)
        if len(text) > MAX_MERGE_VALUE_CHARS:
            raise ComposeError(f"{field}.merge.{key}", f"is longer than {MAX_MERGE_VALUE_CHARS} characters")
        out[key] = text
    return out


# The bulk path assembles each message from bytes: the email package costs milliseconds a message, a mail merge
# of 1,000 must take well under a second. Whatever is the same for every recipient is rendered once (by the email
# package where it is not trivial: attachments, non-ASCII names); the per-recipient pieces take a fast path when
# they are plain ASCII and fall back to the email package otherwise. Tests compare the result with compose_one's.

_CRLF = b"\r\n"
_PHRASE = re.compile(rf"{_ATEXT}(?: {_ATEXT})*")


def _fold_with_email(name: str, value: object) -> bytes:
    """One header folded by the email package (the general, slow path)."""
    header = _BUILD_POLICY.header_factory(name, value)
    return str(header.fold(policy=email_policy.SMTP)).encode("ascii")


def _mailbox_header(name: str, box: _Mailbox) -> bytes:
    line = ""
    if not box.name:
        line = f"{name}: {box.addr}"
    elif box.name.isascii() and "=?" not in box.name:
        phrase = box.name
        if not _PHRASE.fullmatch(phrase):
            phrase = '"' + phrase.replace("\\", "\\\\").replace('"', '\\"') + '"'
        line = f"{name}: {phrase} <{box.addr}>"
    if line and len(line) <= 78:
        return line.encode("ascii") + _CRLF
    return _fold_with_email(name, box.header())


def _unstructured_header(name: str, value: str) -> bytes:
    """Subject and custom headers: ASCII folded at its whitespace, anything else RFC 2047 encoded."""
    if value.isascii() and "=?" not in value:
        lines = _fold_words(name, value, 78)
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
class _Static:
    """The bytes a mail merge's messages share."""

    before_to: bytes  # From
    before_subject: bytes  # Reply-To
    before_custom: bytes  # Date, MIME-Version
    attachments: tuple[bytes, ...]
    domain: str

    @classmethod
    def build(cls, common: _Common, now: datetime) -> _Static:
        reply_to = b"" if common.reply_to is None else _mailbox_header("Reply-To", common.reply_to)
        return cls(
            before_to=_mailbox_header("From", common.sender),
            before_subject=reply_to,
            before_custom=f"Date: {format_datetime(now)}\r\n".encode("ascii"),
            attachments=tuple(part.as_bytes(policy=email_policy.SMTP) for part in common.attachments),
            domain=common.sender.domain.lower(),
        )

    def assemble(
        self,
        *,
        to: _Mailbox,
        subject: str,
        text: str | None,
        html_body: str | None,
        headers: Sequence[tuple[str, str]],
        max_size: int,
    ) -> bytes:
        """One recipient's message, in compose_one's header order and MIME structure."""
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
        return _checked(b"".join(chunks), max_size)


def compose_bulk(
    req: dict[str, Any],
    *,
    max_recipients: int = 1000,
    max_size: int,
    max_total: int | None = None,
    now: datetime | None = None,
) -> list[Composed]:
    """Build the messages of `POST /v1/emails/bulk`: one per recipient, each with exactly one To, the
    templates filled from that recipient's `merge` values (HTML-escaped in html, line breaks dropped in
    subject and headers). The first bad recipient fails the whole request, naming `recipients[i]`."""
    req_map = _check_keys(req, BULK_KEYS, "")
    common = _common(req_map, max_size)
    subject = _Template.parse(_check_subject(req_map.get("subject"), "subject"))
    text, html_body = _bodies(req_map, max_size)
    text_t = None if text is None else _Template.parse(text)
    html_t = None if html_body is None else _Template.parse(html_body)
    header_ts = [(name, _Template.parse(value)) for name, value in _custom_headers(req_map.get("headers"))]
    recipients = req_map.get("recipients")
    if not isinstance(recipients, list) or not recipients:
        raise ComposeError("recipients", "is required: a list of at least one {'to': ..., 'merge': {...}}")
    if len(recipients) > max_recipients:
        raise ComposeError("recipients", f"has {len(recipients)} entries; at most {max_recipients} are allowed")
    static = _Static.build(common, _now(now))
    out = []
    total = 0
    for i, item in enumerate(recipients):
        field = f"recipients[{i}]"
        entry = _check_keys(item, frozenset({"to", "merge"}), field)
        if entry.get("to") is None:
            raise ComposeError(f"{field}.to", "is required: the recipient's address")
        to = _mailbox(entry["to"], f"{field}.to")
        raw = _merge_values(entry.get("merge"), field)
        flat = {k: _LINE_BREAKS.sub("", v) for k, v in raw.items()}
        escaped = {k: html.escape(v, quote=True) for k, v in raw.items()} if html_t is not None else {}
        parts = (text_t.length(raw) if text_t else 0) + (html_t.length(escaped) if html_t else 0)
        if parts > max_size:
            raise ComposeError(f"{field}.merge", f"the text and html filled in take {parts} characters, over the "
                               f"message size limit of {max_size} bytes")  # fmt: skip
        headers = [
            (name, _check_header_value(name, t.fill(flat, field, f"header {name}"), f"{field}.headers.{name}"))
            for name, t in header_ts
        ]
        body = static.assemble(
            to=to,
            subject=_check_subject(subject.fill(flat, field, "subject"), f"{field}.subject"),
            text=None if text_t is None else text_t.fill(raw, field, "text"),
            html_body=None if html_t is None else html_t.fill(escaped, field, "html"),
            headers=headers,
            max_size=max_size,
        )
        total += len(body)
        if max_total is not None and total > max_total:
            raise ComposeError(
                "recipients",
                f"the messages of this request take over {max_total} bytes together (at recipient {i}); "
                "send fewer recipients per request, or a link instead of a large attachment",
            )
        out.append(Composed(mail_from=common.sender.addr, rcpts=[to.addr], body=body, tags=common.tags))
    return out
