"""Internationalised addresses (RFC 6531/6532): A-labels, the forms an address is indexed and sent in,
and which recipients a message cannot reach without SMTPUTF8; pure, never does I/O.

Domains are converted with UTS #46 processing (the `idna` package, non-transitional, so "ß" stays
"ß"): "例え.jp" is "xn--r8jz45g.jp" for DNS, DKIM d= and comparisons. An A-label domain is not an
internationalised one (RFC 6531 §3.2): "user@bücher.example" can travel to any server as
"user@xn--bcher-kva.example"; only a non-ASCII local part, or UTF-8 in the header of a message
submitted with SMTPUTF8, needs the next hop to offer SMTPUTF8.

Without it, the recipient bounces with 5.6.7 (RFC 6531 §3.5's "Non-ASCII addresses not permitted for
that sender/recipient") and is not deferred: §3.2 says a client MUST NOT send such a message to a
server that does not offer SMTPUTF8 and that a relay SHOULD reject it or send a non-delivery
notice (requeueing is only a MAY), and §3.7.2 expects every MX of a domain to agree, so a retry
rarely finds one that does (Postfix bounces too).

A message that came in with SMTPUTF8 says so in the WITH clause of the Received: field intake
wrote, the first one: UTF8SMTP, UTF8SMTPA, UTF8SMTPS or UTF8SMTPSA (RFC 6531 §4.3). The HTTP API has
no registered UTF-8 form of its protocol, so its field keeps the protocol it came in with and adds
the comment "(UTF8)": "with HTTPS (UTF8) id ...". Either way the mark is ours: no client can put a
Received: field above the one intake adds.

An address is written in a header in its ASCII form when it has one (header_form): only an address
whose local part is not ASCII puts UTF-8 into a header (RFC 6532), so a message needs SMTPUTF8 only
when it has to.

ASCII input always takes a fast path that gives exactly what cmcd did before SMTPUTF8 (a
lower-cased address, the domain as written), so no index of an ASCII address changes.
"""

from __future__ import annotations

import re
import unicodedata

import idna

#: the first Received: field's WITH protocol when the message came in with SMTPUTF8 (RFC 6531 §4.3:
#: UTF8SMTP, UTF8SMTPA, UTF8SMTPS, UTF8SMTPSA; UTF8LMTP and its forms likewise), or the API's mark
_UTF8_WITH = re.compile(rb"\swith\s+(?:UTF8(?:SMTP|LMTP)|HTTPS?\s+\(UTF8\))", re.I)
#: what the API's Received: field says after "with HTTPS" when the message carries UTF-8 addresses
API_UTF8_MARK = "(UTF8)"
_RECEIVED = re.compile(rb"(?:^|\r\n)received[ \t]*:", re.I)


def to_alabel(domain: str) -> str:
    """DOMAIN with every U-label as its A-label, lower-cased, without a trailing dot.

    ASCII is returned lower-cased and otherwise as given (the address rules check its syntax);
    a non-ASCII name UTS #46 does not take (a disallowed code point, an empty or overlong label,
    bad bidi) raises ValueError."""
    domain = domain.rstrip(".")
    if domain.isascii():
        return domain.lower()
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError) as exc:
        raise ValueError(f"{domain!r} is not a valid internationalised domain name: {exc}") from None


def domain_key(address: str) -> str:
    """The lower-case A-label domain of ADDRESS (what routing, MX lookup and per-domain limits key
    on); the lower-cased domain as written when it has no A-label form."""
    domain = address.rpartition("@")[2]
    try:
        return to_alabel(domain)
    except ValueError:
        return domain.lower().rstrip(".")


def index_form(address: str) -> str:
    """ADDRESS as the keyed index hashes it: case-insensitive, Unicode NFC, the domain as A-labels.

    "User@Bücher.Example", its NFD spelling and "user@xn--bcher-kva.example" give one form; an
    ASCII address gives address.strip().lower(), as before SMTPUTF8."""
    address = address.strip()
    if address.isascii():
        return address.lower()
    local, at, domain = unicodedata.normalize("NFC", address).rpartition("@")
    if not at:
        return domain.lower()
    try:
        domain = to_alabel(domain)
    except ValueError:
        domain = domain.lower()
    return f"{local.lower()}@{domain}"


def ascii_form(address: str) -> str | None:
    """ADDRESS with its domain as A-labels, for a server without SMTPUTF8; None when the local part is
    not ASCII (no ASCII form exists: RFC 6531 §3.2) or the domain has no A-label form."""
    if address.isascii():
        return address
    local, at, domain = address.rpartition("@")
    if not local.isascii():
        return None
    try:
        return f"{local}{at}{to_alabel(domain)}"
    except ValueError:
        return None


def header_form(address: str) -> str:
    """ADDRESS as a header field writes it: its ASCII form (the domain as A-labels) when it has one,
    else as written, in UTF-8 (RFC 6532)."""
    return ascii_form(address) or address


def submitted_with_smtputf8(body: bytes) -> bool:
    """True when the first Received: field of BODY (the one intake wrote) says the message came in
    with SMTPUTF8 (RFC 6531 §4.3), or through the API with UTF-8 addresses ("with HTTPS (UTF8)")."""
    end = body.find(b"\r\n\r\n")
    head = body if end < 0 else body[:end]
    m = _RECEIVED.search(head)
    if m is None:
        return False
    field_end = m.end()
    while True:  # the field runs to the first line that does not start with white space
        nl = head.find(b"\r\n", field_end)
        if nl < 0 or head[nl + 2 : nl + 3] not in (b" ", b"\t"):
            field_end = len(head) if nl < 0 else nl
            break
        field_end = nl + 2
    return _UTF8_WITH.search(head, m.end(), field_end) is not None


def utf8_header(body: bytes) -> bool:
    """True when BODY's header block holds UTF-8 (RFC 6532) and the message came in with SMTPUTF8.

    A header with 8-bit bytes from a client that did not ask for SMTPUTF8 is sent on as before
    (it never needed the extension to get here, and bouncing it now would change old behaviour)."""
    end = body.find(b"\r\n\r\n")
    head = body if end < 0 else body[:end]
    return not head.isascii() and submitted_with_smtputf8(body)


def refused_without_smtputf8(sender: str, rcpts: list[str], body: bytes) -> frozenset[int] | None:
    """What a server without SMTPUTF8 cannot be sent (RFC 6531 §3.2): None when the whole message
    needs SMTPUTF8 (a non-ASCII local part in the sender, or a UTF-8 header: utf8_header), else the
    indexes in RCPTS of the recipients whose local part is not ASCII (empty: nothing needs it)."""
    if not sender.rpartition("@")[0].isascii() or utf8_header(body):
        return None
    return frozenset(i for i, r in enumerate(rcpts) if not r.rpartition("@")[0].isascii())


def needs_smtputf8(sender: str, rcpts: list[str], body: bytes) -> bool:
    """True when the message should be sent with the SMTPUTF8 parameter (where it is offered): a
    non-ASCII address anywhere in the envelope, or a UTF-8 header of a message that came in with it."""
    if not sender.isascii() or not all(r.isascii() for r in rcpts):
        return True
    return utf8_header(body)
