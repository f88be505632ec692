"""The rules for what a tenant's API request may put into a message, field by field: addresses and
display names, subject, custom headers, tags, text and html, attachments, mail-merge values.

Each check returns the checked value or raises ComposeError naming the field JSON-pointer-ish
(``to[3]``, ``headers.X-Foo``, ``attachments[0].content``, ``recipients[7].merge.first_name``,
``size``). So no request can inject a header or override From/To/DKIM-Signature/Received:
custom headers are limited to X-* (except cmcd's own X-Cmcd-*: the stream is the request's
`stream` field) and a few List-*/threading headers, and no value may hold a line break. Never
writes a message (mime.py does) and applies no sending policy (submit/ does).
"""

from __future__ import annotations

import binascii
import functools
import math
import mimetypes
import re
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import MIMEPart
from typing import Any

from cmcd import intl
from cmcd.api.mime import MAX_LINE_OCTETS, Mailbox, attachment_part, fold_words
from cmcd.records import STREAMS
from cmcd.tenancy.rules import MAX_ADDRESS_OCTETS, MAX_LOCAL_PART_OCTETS, address_refusal, octets

MAX_SUBJECT_CHARS = 998
MAX_HEADER_VALUE_CHARS = 998
MAX_NAME_CHARS = 200  # display names
MAX_FILENAME_CHARS = 255
MAX_TAGS = 10
MAX_MERGE_KEYS = 50
MAX_MERGE_VALUE_CHARS = 10_000
LIST_HEADERS = ("List-Unsubscribe", "List-Unsubscribe-Post", "List-Id", "In-Reply-To", "References")

#: a dot-atom whose atext may also be any non-ASCII character (RFC 6532 §3.2: UTF8-non-ascii)
_UATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff-]+"
_LOCAL_PART = re.compile(rf"{_UATEXT}(?:\.{_UATEXT})*")
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})+")
_NAME_ADDR = re.compile(r"\s*(.*?)\s*<([^<>]*)>\s*", re.S)
_ADDRESS_CTL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# Anything str.splitlines() or a mail parser could take for a line break, plus the other controls (TAB is fine).
_HEADER_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_NAME_BAD = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_X_HEADER = re.compile(r"X-[A-Za-z0-9-]{1,70}", re.I)
_TAG = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_MIME_TOKEN = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
_CONTENT_TYPE = re.compile(rf"({_MIME_TOKEN})/({_MIME_TOKEN})")
_FILENAME_BAD = re.compile(r"[/\\\x00-\x1f\x7f-\x9f\u2028\u2029]")
_B64_SPACE = re.compile(r"[ \t\r\n]+")
_MERGE_KEY = re.compile(r"[A-Za-z0-9_]{1,64}")


class ComposeError(ValueError):
    """A request that cannot become a message: `field` says where (``to[3]``, ``headers.X-Foo``), `detail` what."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(field, detail)
        self.field = field
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.field}: {self.detail}" if self.field else self.detail


@dataclass(frozen=True)
class Common:
    """What every message of a request shares, checked once."""

    sender: Mailbox
    reply_to: Mailbox | None
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


def check_keys(req: object, allowed: frozenset[str], field: str) -> Mapping[str, Any]:
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
    """An address the one address rule takes (cmcd.tenancy.rules.address_refusal; UTF-8 as SMTP
    intake takes it with SMTPUTF8) that can also be written into a header as it is: one '@', a
    dot-atom local part (RFC 6532: printable non-ASCII characters too), a host name for the domain
    (a U-label name as its A-label form). Returns (local, domain) as written."""
    refusal = address_refusal(addr, smtputf8=True)
    if refusal is not None:
        raise ComposeError(field, _rule_fault(addr) or f"the address {_show(addr)}: {refusal.text}")
    local, _, domain = addr.rpartition("@")
    if "@" in local:
        raise ComposeError(field, f"the address {_show(addr)} has more than one '@'")
    if domain.startswith("["):
        raise ComposeError(field, f"the address {_show(addr)} is an address literal; use a domain name")
    if not _LOCAL_PART.fullmatch(local) or not local.isprintable():
        raise ComposeError(field, _bad_local(addr))
    try:
        host = intl.to_alabel(domain)
    except ValueError:
        raise ComposeError(field, _bad_domain(addr)) from None
    if len(host) > 253 or not _DOMAIN.fullmatch(host) or host.rpartition(".")[2].isdigit():
        raise ComposeError(field, _bad_domain(addr))
    return local, domain


def _rule_fault(addr: str) -> str:
    """What the address rule refused ADDR for, in the request's words (the rule decides; this says
    which part is at fault, more precisely than an SMTP reply does)."""
    if not addr:
        return "the address is empty"
    if octets(addr) > MAX_ADDRESS_OCTETS:
        return f"the address is {octets(addr)} octets long (in UTF-8); at most {MAX_ADDRESS_OCTETS} are allowed"
    if _ADDRESS_CTL.search(addr):
        return f"the address {_show(addr)} contains control characters"
    if " " in addr:
        return f"the address {_show(addr)} contains spaces"
    if "@" not in addr:
        return f"the address {_show(addr)} has no '@'; write local@domain"
    local = addr.rpartition("@")[0]
    if octets(local) > MAX_LOCAL_PART_OCTETS:
        return (
            f"the local part of {_show(addr)} is {octets(local)} octets long (in UTF-8); "
            f"at most {MAX_LOCAL_PART_OCTETS} are allowed"
        )
    return _bad_local(addr) if addr.startswith("@") else _bad_domain(addr)


def _bad_local(addr: str) -> str:
    return (
        f"the local part of {_show(addr)} is not valid (letters, digits, !#$%&'*+/=?^_`{{|}}~-, dots and "
        "printable non-ASCII characters)"
    )


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


def mailbox(value: object, field: str) -> Mailbox:
    """An address as "addr", "Name <addr>" or {"email": addr, "name": name}."""
    if isinstance(value, Mapping):
        check_keys(value, frozenset({"email", "name"}), field)
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
    return Mailbox(name, local, domain)


def mailboxes(req: Mapping[str, Any], key: str, *, required: bool, limit: int) -> list[Mailbox]:
    value = req.get(key)
    if value is None or value == []:
        if required:
            raise ComposeError(key, "is required: a list of at least one address")
        return []
    if not isinstance(value, list):
        raise ComposeError(key, f"must be a list of addresses, not {_kind(value)}")
    if len(value) > limit:
        raise ComposeError(key, f"has {len(value)} addresses; at most {limit} are allowed")
    return [mailbox(item, f"{key}[{i}]") for i, item in enumerate(value)]


def check_subject(subject: object, field: str) -> str:
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
    if name.lower() == "x-cmcd-stream":
        raise ComposeError(field, "the stream is chosen with the request's 'stream' field, not a header")
    if name.lower().startswith("x-cmcd-"):
        raise ComposeError(field, f"header {_show(name)} is reserved for cmcd")
    return name


def check_header_value(name: str, value: object, field: str) -> str:
    if not isinstance(value, str):
        raise ComposeError(field, f"the value must be a string, not {_kind(value)}")
    if len(value) > MAX_HEADER_VALUE_CHARS:
        raise ComposeError(field, f"the value is {len(value)} characters; at most {MAX_HEADER_VALUE_CHARS}")
    if _HEADER_BAD.search(value):
        raise ComposeError(field, "the value contains a line break (CR/LF), NUL or another control character")
    value = value.strip(" \t")
    if value.isascii():
        if any(len(line) > MAX_LINE_OCTETS for line in fold_words(name, value, 78)):
            raise ComposeError(field, f"the value has a word too long for a {MAX_LINE_OCTETS}-octet header line")
    elif name in LIST_HEADERS:
        raise ComposeError(field, "the value must be ASCII")
    return value


def custom_headers(value: object) -> list[tuple[str, str]]:
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
        out.append((name, check_header_value(name, raw_value, f"headers.{name}")))
    return out


def check_stream(value: object, default: str) -> str:
    """The request's `stream`: transactional or broadcast (DEFAULT when left out)."""
    if value is None:
        return default
    if not isinstance(value, str) or value not in STREAMS:
        raise ComposeError("stream", f"{_show(value)} is not a stream; expected one of {', '.join(STREAMS)}")
    return value


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


def bodies(req: Mapping[str, Any], max_size: int) -> tuple[str | None, str | None]:
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
    req = check_keys(item, frozenset({"filename", "content", "content_type"}), field)
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
    return attachment_part(data, maintype, subtype, filename)


def common_parts(req: Mapping[str, Any], max_size: int) -> Common:
    sender = req.get("from")
    if sender is None:
        raise ComposeError("from", "is required: the sender's address")
    reply_to = req.get("reply_to")
    attachments = req.get("attachments")
    if attachments is None:
        attachments = []
    if not isinstance(attachments, list):
        raise ComposeError("attachments", f"must be a list, not {_kind(attachments)}")
    return Common(
        sender=mailbox(sender, "from"),
        reply_to=None if reply_to is None else mailbox(reply_to, "reply_to"),
        attachments=tuple(_attachment(a, f"attachments[{i}]", max_size) for i, a in enumerate(attachments)),
        tags=_tags(req.get("tags")),
    )


def merge_values(value: object, field: str) -> dict[str, str]:
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
