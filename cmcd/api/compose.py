"""Turn tenant API JSON into RFC 5322 messages (one, or a mail merge); never applies policy or touches the spool.

The HTTP handler passes the decoded JSON body; what comes back is an envelope (sender, recipients) and CRLF bytes
ready for the same intake path as SMTP, where limits, suppression and DKIM happen. Each field is checked by
fields.py's rules (so no request can inject a header or override From/To/DKIM-Signature/Received), the message
is written by mime.py, and the result's size and line lengths are checked here. Bcc recipients reach the envelope
only. Errors are ComposeError naming the offending field (``to[3]``, ``recipients[7].merge.first_name``,
``size``). No I/O.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cmcd.api.fields import (
    ComposeError,
    bodies,
    check_header_value,
    check_keys,
    check_stream,
    check_subject,
    common_parts,
    custom_headers,
    mailbox,
    mailboxes,
    merge_values,
)
from cmcd.api.mime import MAX_LINE_OCTETS, Static, render
from cmcd.records import Stream

__all__ = ["BULK_KEYS", "ONE_KEYS", "ComposeError", "Composed", "compose_bulk", "compose_one"]

ONE_KEYS = frozenset(
    {"from", "to", "cc", "bcc", "reply_to", "subject", "text", "html", "attachments", "headers", "tags", "stream"}
)
BULK_KEYS = frozenset(
    {"from", "reply_to", "subject", "text", "html", "attachments", "headers", "tags", "recipients", "stream"}
)
# What a merge value loses in a header context: every line break str.splitlines() knows.
_LINE_BREAKS = re.compile(r"[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
_PLACEHOLDER = re.compile(r"\{\{[ \t]*([A-Za-z0-9_]{1,64})[ \t]*\}\}")


@dataclass(frozen=True)
class Composed:
    """One message for the intake path: envelope, CRLF bytes and the stream the request chose."""

    mail_from: str
    rcpts: list[str]  # to+cc+bcc, deduplicated case-insensitively, order kept
    body: bytes  # CRLF line endings, ready for SMTP
    tags: tuple[str, ...]
    stream: str = Stream.TRANSACTIONAL
    #: its header carries an address in UTF-8 (RFC 6532): it needs SMTPUTF8 on the way, as if it had
    #: come in with it (the Received: field says so: cmcd.intl)
    smtputf8: bool = False


def _utf8_header(body: bytes) -> bool:
    end = body.find(b"\r\n\r\n")
    return not (body if end < 0 else body[:end]).isascii()


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
    """Build the message of `POST /v1/emails`; `now` (aware, default the clock) dates it. Its stream is
    transactional unless the request says broadcast, and a broadcast has one recipient: its
    unsubscribe link is that recipient's (a list goes through compose_bulk)."""
    req_map = check_keys(req, ONE_KEYS, "")
    stream = check_stream(req_map.get("stream"), Stream.TRANSACTIONAL)
    common = common_parts(req_map, max_size)
    to = mailboxes(req_map, "to", required=True, limit=max_rcpts_per_field)
    cc = mailboxes(req_map, "cc", required=False, limit=max_rcpts_per_field)
    bcc = mailboxes(req_map, "bcc", required=False, limit=max_rcpts_per_field)
    if stream == Stream.BROADCAST and len(_dedup([m.addr for m in (*to, *cc, *bcc)])) > 1:
        raise ComposeError(
            "to",
            "a broadcast goes to one recipient (to, cc and bcc together), whose unsubscribe link it carries; "
            "send it to many with POST /v1/emails/bulk",
        )
    subject = check_subject(req_map.get("subject"), "subject")
    text, html_body = bodies(req_map, max_size)
    headers = custom_headers(req_map.get("headers"))
    body = render(
        common.sender,
        common.reply_to,
        common.attachments,
        to=to,
        cc=cc,
        subject=subject,
        text=text,
        html_body=html_body,
        headers=headers,
        now=_now(now),
    )
    body = _checked(body, max_size)
    rcpts = _dedup([m.addr for m in (*to, *cc, *bcc)])
    return Composed(
        mail_from=common.sender.addr, rcpts=rcpts, body=body, tags=common.tags, stream=stream,
        smtputf8=_utf8_header(body),
    )  # fmt: skip


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
    subject and headers), broadcast unless the request says transactional. The first bad recipient fails
    the whole request, naming `recipients[i]`."""
    req_map = check_keys(req, BULK_KEYS, "")
    stream = check_stream(req_map.get("stream"), Stream.BROADCAST)
    common = common_parts(req_map, max_size)
    subject = _Template.parse(check_subject(req_map.get("subject"), "subject"))
    text, html_body = bodies(req_map, max_size)
    text_t = None if text is None else _Template.parse(text)
    html_t = None if html_body is None else _Template.parse(html_body)
    header_ts = [(name, _Template.parse(value)) for name, value in custom_headers(req_map.get("headers"))]
    recipients = req_map.get("recipients")
    if not isinstance(recipients, list) or not recipients:
        raise ComposeError("recipients", "is required: a list of at least one {'to': ..., 'merge': {...}}")
    if len(recipients) > max_recipients:
        raise ComposeError("recipients", f"has {len(recipients)} entries; at most {max_recipients} are allowed")
    static = Static.build(common.sender, common.reply_to, common.attachments, _now(now))
    out = []
    total = 0
    for i, item in enumerate(recipients):
        field = f"recipients[{i}]"
        entry = check_keys(item, frozenset({"to", "merge"}), field)
        if entry.get("to") is None:
            raise ComposeError(f"{field}.to", "is required: the recipient's address")
        to = mailbox(entry["to"], f"{field}.to")
        raw = merge_values(entry.get("merge"), field)
        flat = {k: _LINE_BREAKS.sub("", v) for k, v in raw.items()}
        escaped = {k: html.escape(v, quote=True) for k, v in raw.items()} if html_t is not None else {}
        parts = (text_t.length(raw) if text_t else 0) + (html_t.length(escaped) if html_t else 0)
        if parts > max_size:
            raise ComposeError(f"{field}.merge", f"the text and html filled in take {parts} characters, over the "
                               f"message size limit of {max_size} bytes")  # fmt: skip
        headers = [
            (name, check_header_value(name, t.fill(flat, field, f"header {name}"), f"{field}.headers.{name}"))
            for name, t in header_ts
        ]
        body = static.assemble(
            to=to,
            subject=check_subject(subject.fill(flat, field, "subject"), f"{field}.subject"),
            text=None if text_t is None else text_t.fill(raw, field, "text"),
            html_body=None if html_t is None else html_t.fill(escaped, field, "html"),
            headers=headers,
        )
        body = _checked(body, max_size)
        total += len(body)
        if max_total is not None and total > max_total:
            raise ComposeError(
                "recipients",
                f"the messages of this request take over {max_total} bytes together (at recipient {i}); "
                "send fewer recipients per request, or a link instead of a large attachment",
            )
        utf8 = _utf8_header(body)
        out.append(Composed(common.sender.addr, [to.addr], body, common.tags, stream, smtputf8=utf8))
    return out
