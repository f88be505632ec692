"""One-click unsubscribe (RFC 8058 over RFC 2369): the token in a broadcast message's URL, and its header fields.

A broadcast message gets, before it is signed (so both fields are in the DKIM signature's h=):

    List-Unsubscribe: <https://PUBLIC_URL/u/TOKEN>, <mailto:...>   (the tenant's own mailto:, if it set one)
    List-Unsubscribe-Post: List-Unsubscribe=One-Click

The token is opaque and authenticated: the tenant id, the stream and the recipient's address,
sealed with AES-256-GCM under a key derived from the data key for this use alone. Nobody reads an
address in it, and nobody makes or alters one without the key: an altered token does not open,
so it changes nothing. It never expires: an unsubscribe link must work as long as the message
is kept. The HTTP endpoint that takes it is cmcd/api/unsubscribe.py.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cmcd.crypto import DataKeys
from cmcd.records import STREAMS

#: the first byte of every token: the format, so a later one can be told apart
_VERSION = b"\x01"
_INFO = b"cmcd one-click unsubscribe token v1"
_AAD = b"cmcd-unsubscribe"
#: RFC 8058 section 3.1: the body of the POST a mailbox provider sends
ONE_CLICK = "List-Unsubscribe=One-Click"
#: the path the URL's token follows, on the API listener
PATH = "/u/"
#: a tenant's mailto: URI, kept beside ours: RFC 6068 characters only (none of <>," or spaces, which
#: would let a second URI of the tenant's own ride inside it), at most _MAILTO_MAX of them
_MAILTO = re.compile(r"<\s*(mailto:[A-Za-z0-9!#$%&'*+\-./:;=?@^_`{|}~\[\]()]{1,256})\s*>", re.IGNORECASE)
_MAILTO_MAX = 2


@dataclass(frozen=True)
class Subscription:
    """Who a token unsubscribes, from what."""

    tenant_id: int
    stream: str
    address: str


class Tokens:
    def __init__(self, keys: DataKeys):
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(keys.enc_key)
        self._aead = AESGCM(key)

    def make(self, sub: Subscription) -> str:
        """SUB's token: URL-safe base64 without padding, about 60 characters plus the address's length."""
        nonce = os.urandom(12)
        plain = f"{sub.tenant_id}\n{sub.stream}\n{sub.address}".encode()
        sealed = _VERSION + nonce + self._aead.encrypt(nonce, plain, _AAD)
        return base64.urlsafe_b64encode(sealed).rstrip(b"=").decode("ascii")

    def read(self, token: str) -> Subscription | None:
        """The subscription TOKEN names, or None for anything this key did not make (altered,
        cut short, another installation's, not a token at all)."""
        if not token or len(token) > 2048 or not token.isascii():
            return None
        try:
            sealed = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            return None
        # the decoder skips characters outside the alphabet and the unused bits of the last one:
        # only the one spelling make() gives opens, so a token changed anywhere opens to nothing
        if base64.urlsafe_b64encode(sealed).rstrip(b"=").decode("ascii") != token:
            return None
        if len(sealed) < 1 + 12 + 16 or sealed[:1] != _VERSION:
            return None
        try:
            plain = self._aead.decrypt(sealed[1:13], sealed[13:], _AAD).decode()
        except (InvalidTag, UnicodeDecodeError):
            return None
        tenant, stream, address = plain.split("\n", 2)
        if not tenant.isdigit() or stream not in STREAMS:  # sealed by us: cannot happen, never trusted blindly
            return None
        return Subscription(int(tenant), stream, address)


def url(public_url: str, token: str) -> str:
    return f"{public_url}{PATH}{token}"


def mailto_uris(list_unsubscribe: str) -> list[str]:
    """The mailto: URIs of a tenant's own List-Unsubscribe: value (kept beside ours; its https:
    ones are not: a second one-click URL would be the tenant's to honour, and ours is the one cmcd keeps)."""
    return _MAILTO.findall(list_unsubscribe)[:_MAILTO_MAX]


def header_fields(link: str, mailtos: list[str]) -> bytes:
    """The two fields RFC 8058 section 3.1 asks for, CRLF-terminated; the URIs are folded one a line."""
    uris = ",\r\n ".join(f"<{u}>" for u in [link, *mailtos])
    return (f"List-Unsubscribe: {uris}\r\nList-Unsubscribe-Post: {ONE_CLICK}\r\n").encode()
