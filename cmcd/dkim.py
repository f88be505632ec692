"""DKIM signing (RFC 6376) with RSA-SHA256 and Ed25519-SHA256 (RFC 8463), relaxed/relaxed.

One call signs a message with several keys: the message is split and the body canonicalized
and hashed once, the selected header fields are canonicalized once, and each key then only
hashes its own DKIM-Signature field and runs its private-key operation (through
`cryptography`, so OpenSSL).

Messages are bytes with CRLF line ends, as cmcd spools them; 8-bit bytes anywhere are
signed as they are. Only CRLF ends a line: a bare LF or CR is ordinary content.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from cmcd.errors import CmcdError

__all__ = [
    "DEFAULT_HEADERS",
    "MIN_RSA_BITS",
    "OVERSIGN",
    "Algorithm",
    "DkimError",
    "DkimKey",
    "body_hash",
    "canonicalize_body",
    "canonicalize_header",
    "sign",
    "signature_fields",
]

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

MIN_RSA_BITS = 1024  # RFC 8301 §3.2: signers MUST use at least 1024 bits (2048 recommended)

# Header fields signed when present (RFC 6376 §5.4.1); a name ending in "*" matches every
# field whose name starts with the rest (each distinct name is listed on its own).
DEFAULT_HEADERS: tuple[str, ...] = (
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "In-Reply-To",
    "References",
    "List-*",
)
# Listed once more than they occur (once when absent), so that a copy added later on top of
# the message breaks the signature (RFC 6376 §5.4.2 and §8.15).
OVERSIGN: tuple[str, ...] = ("From", "To", "Subject", "Date", "List-Unsubscribe", "List-Unsubscribe-Post")

_LINE = 78  # fold the DKIM-Signature field to this many characters per line (RFC 5322 §2.1.1)
_CRLF_BLOCK = b"\r\n" * 256
_FIELD_SPLIT = re.compile(rb"\r\n(?![ \t])")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_FIELD_NAME_RE = re.compile(r"[!-9;-~]+\*?")  # printable ASCII but ":" (RFC 5322 ftext)
_FIELD_NAME_BYTES_RE = re.compile(rb"[!-9;-~]+")


class DkimError(CmcdError, ValueError):
    """The message cannot be signed as it is (no From field, no header/body separator)."""


@dataclass(frozen=True, eq=False)
class DkimKey:
    """A signing key for one domain and selector; `algorithm` follows from the key's type.

    Equality is identity: two objects loaded from the same PEM are different keys to `==`.
    """

    domain: str
    selector: str
    private_key: PrivateKey = field(repr=False)
    algorithm: Algorithm = field(init=False)

    def __post_init__(self) -> None:
        for what, name in (("domain", self.domain), ("selector", self.selector)):
            if not isinstance(name, str) or len(name) > 253 or not _DOMAIN_RE.fullmatch(name):
                raise ValueError(f"DKIM {what} {name!r} is not an ASCII domain name (use the A-label form)")
        algorithm: Algorithm
        if isinstance(self.private_key, rsa.RSAPrivateKey):
            if self.private_key.key_size < MIN_RSA_BITS:
                raise ValueError(
                    f"RSA key of {self.private_key.key_size} bits is too short for DKIM "
                    f"(at least {MIN_RSA_BITS}, RFC 8301; 2048 recommended)"
                )
            algorithm = "rsa-sha256"
        elif isinstance(self.private_key, ed25519.Ed25519PrivateKey):
            algorithm = "ed25519-sha256"
        else:
            raise ValueError(
                f"unsupported DKIM key type {type(self.private_key).__name__}: only RSA and Ed25519 are supported"
            )
        object.__setattr__(self, "algorithm", algorithm)

    @classmethod
    def from_pem(cls, domain: str, selector: str, pem: bytes) -> DkimKey:
        """Load an unencrypted PEM private key (PKCS#8, or PKCS#1 for RSA): RSA >= 1024 bits or Ed25519."""
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except TypeError as e:  # encrypted PEM without a password
            raise ValueError(f"DKIM private key PEM is encrypted; decrypt it first ({e})") from e
        except ValueError as e:
            raise ValueError(f"DKIM private key is not a readable PEM private key ({e})") from e
        if not isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
            raise ValueError(f"unsupported DKIM key type {type(key).__name__}: only RSA and Ed25519 are supported")
        return cls(domain, selector, key)

    @classmethod
    def generate_rsa(cls, domain: str, selector: str, bits: int = 2048) -> DkimKey:
        if bits < MIN_RSA_BITS:
            raise ValueError(f"RSA key of {bits} bits is too short for DKIM (at least {MIN_RSA_BITS})")
        return cls(domain, selector, rsa.generate_private_key(public_exponent=65537, key_size=bits))

    @classmethod
    def generate_ed25519(cls, domain: str, selector: str) -> DkimKey:
        return cls(domain, selector, ed25519.Ed25519PrivateKey.generate())

    def private_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM (the caller encrypts it at rest)."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def public_key_b64(self) -> str:
        """The p= value: base64 SubjectPublicKeyInfo for RSA, the raw 32-byte key for Ed25519 (RFC 8463 §4)."""
        if isinstance(self.private_key, rsa.RSAPrivateKey):
            raw = self.private_key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        else:
            raw = self.private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(raw).decode("ascii")

    @property
    def dns_name(self) -> str:
        """Where the public key is published: SELECTOR._domainkey.DOMAIN."""
        return f"{self.selector}._domainkey.{self.domain}"

    def dns_txt(self) -> str:
        """The TXT record value, e.g. 'v=DKIM1; k=rsa; p=MIIBIj...'."""
        k = "rsa" if self.algorithm == "rsa-sha256" else "ed25519"
        return f"v=DKIM1; k={k}; p={self.public_key_b64()}"

    def dns_txt_strings(self) -> list[str]:
        """dns_txt() cut into character-strings of at most 255 bytes (concatenated by verifiers)."""
        txt = self.dns_txt()
        return [txt[i : i + 255] for i in range(0, len(txt), 255)]


def _collapse_wsp(data: bytes) -> bytes:
    """Every run of SP and HTAB reduced to one SP (C-speed passes; a run of n needs log2(n) of them)."""
    if b"\t" in data:
        data = data.replace(b"\t", b" ")
    while b"  " in data:
        data = data.replace(b"  ", b" ")
    return data


def canonicalize_header(field_bytes: bytes) -> bytes:
    """Relaxed header canonicalization (RFC 6376 §3.4.2) of one field, folds included; ends in CRLF."""
    name, _, value = field_bytes.partition(b":")
    if b"\r\n" in value:
        value = value.replace(b"\r\n", b"")
    return name.rstrip(b" \t").lower() + b":" + _collapse_wsp(value).strip(b" ") + b"\r\n"


def canonicalize_body(body: bytes) -> bytes:
    """Relaxed body canonicalization (RFC 6376 §3.4.4).

    A non-empty body that does not end in CRLF is first given one (as SMTP transmission does),
    so trailing whitespace on that last line is dropped like on any other line.
    """
    if not body:
        return b""
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    body = _collapse_wsp(body)
    if b" \r\n" in body:
        body = body.replace(b" \r\n", b"\r\n")
    # Drop the empty lines at the end: the longest run of CRLF pairs, then put one CRLF back.
    end = len(body) - 2
    if end > 0 and not body.endswith(b"\r\n", 0, end):
        return body  # the usual case: exactly one CRLF at the end
    while body.endswith(_CRLF_BLOCK, 0, end):
        end -= len(_CRLF_BLOCK)
    while body.endswith(b"\r\n", 0, end):
        end -= 2
    return body[:end] + b"\r\n" if end else b""


def body_hash(body: bytes) -> bytes:
    """SHA-256 of the relaxed-canonicalized body (the bh= value, not yet base64)."""
    return hashlib.sha256(canonicalize_body(body)).digest()


def _split(message: bytes) -> tuple[list[bytes], bytes]:
    """Header fields (each with its folds, without the final CRLF) and the body."""
    if message.startswith(b"\r\n"):
        raise DkimError("message has no header fields (it starts with the empty line): it needs a From field")
    end = message.find(b"\r\n\r\n")
    if end < 0:
        raise DkimError("message has no header/body separator (an empty line ending in CRLF after the header)")
    return _FIELD_SPLIT.split(message[:end]), message[end + 4 :]


def _names(names: Sequence[str], what: str) -> tuple[bytes, ...]:
    out = []
    for name in names:
        if not isinstance(name, str) or not _FIELD_NAME_RE.fullmatch(name):
            raise ValueError(f"{what}: {name!r} is not a header field name (a trailing * matches a prefix)")
        out.append(name.lower().encode("ascii"))
    return tuple(out)


class _Plan(NamedTuple):
    wanted: tuple[tuple[bytes, bool, bool], ...]  # (lowercased name or prefix, is a prefix, is oversigned)
    over: frozenset[bytes]  # oversigned names
    over_prefixes: tuple[bytes, ...]  # oversigned prefixes ("List-*" -> b"list-")


@functools.lru_cache(maxsize=32)
def _plan(headers: tuple[str, ...], oversign: tuple[str, ...]) -> _Plan:
    """The checked, lowercased names to sign (then oversigned ones not among them), and the oversigned ones."""
    wanted = _names(headers, "headers")
    if b"from" not in wanted:
        raise ValueError("headers must include From (RFC 6376 §5.4)")
    over = _names(oversign, "oversign")
    exact = frozenset(o for o in over if not o.endswith(b"*"))
    prefixes = tuple(o[:-1] for o in over if o.endswith(b"*"))
    names = dict.fromkeys(wanted + tuple(exact))
    return _Plan(
        tuple(
            (n[:-1], True, False) if n.endswith(b"*") else (n, False, n in exact or n.startswith(prefixes))
            for n in names
        ),
        exact,
        prefixes,
    )


def _select(fields: list[bytes], headers: Sequence[str], oversign: Sequence[str]) -> tuple[list[bytes], bytes]:
    """The h= names and the canonicalized fields they select, in h= order (RFC 6376 §5.4.2)."""
    if isinstance(headers, str | bytes) or isinstance(oversign, str | bytes):
        raise TypeError("headers and oversign must be sequences of header names, not one string")
    plan = _plan(tuple(headers), tuple(oversign))
    # A field is known by the exact name before its colon: "From :" (obsolete syntax, RFC 5322
    # §4.5) is not From to OpenDKIM or dkimpy, so it is not signed as From here either.
    by_name: dict[bytes, list[bytes]] = {}
    for f in fields:
        name, colon, value = f.partition(b":")
        if not colon:
            continue  # not a header field (no colon): nothing a verifier could select
        name = name.lower()
        if name in by_name:
            by_name[name].append(value)
        else:
            by_name[name] = [value]
    if b"from" not in by_name:
        raise DkimError(
            "message has no From header field (a name with white space before the colon does not count):"
            " DKIM signs From (RFC 6376 §5.4), so it cannot be signed"
        )

    # The i-th listing of a name selects its i-th instance from the bottom; a listing beyond the
    # instances present selects nothing (the "null string" of §5.4.2): that is oversigning.
    names: list[bytes] = []
    parts: list[bytes] = []
    seen: set[bytes] = set()
    for pattern, is_prefix, is_over in plan.wanted:
        if is_prefix:
            matched = [
                (n, n in plan.over or n.startswith(plan.over_prefixes))
                for n in by_name
                if n.startswith(pattern) and n not in seen and _FIELD_NAME_BYTES_RE.fullmatch(n)
            ]
        elif pattern in seen:
            continue
        else:
            matched = [(pattern, is_over)]
        for name, oversigned in matched:
            seen.add(name)
            values = by_name.get(name)
            if values is None:
                if oversigned:
                    names.append(name)
                continue
            for value in reversed(values):
                if b"\r\n" in value:
                    value = value.replace(b"\r\n", b"")
                parts += (name, b":", value.lstrip(b" \t"), b"\r\n")
            names += [name] * (len(values) + oversigned)
    # Relaxed canonicalization (§3.4.2) of all selected fields at once: names are lowercased and
    # the values unfolded and left-stripped above; here WSP runs become one SP and the SP before
    # each CRLF goes (no field contains a CRLF any more, and no name contains WSP).
    block = _collapse_wsp(b"".join(parts))
    if b" \r\n" in block:
        block = block.replace(b" \r\n", b"\r\n")
    return names, block


def _fold(pieces: list[tuple[str, str]]) -> str:
    """Join (separator, text) pieces onto lines of at most _LINE characters; a fold replaces the separator."""
    lines: list[str] = []
    line = "DKIM-Signature:"
    for sep, text in pieces:
        if len(line) + len(sep) + len(text) <= _LINE:
            line += sep + text
        else:
            lines.append(line)
            line = " " + text
    lines.append(line)
    return "\r\n".join(lines)


def _fold_b64(value: str, first: int) -> str:
    """A base64 value wrapped with CRLF SP; the first line has `first` characters left."""
    out = [value[:first]]
    out += [" " + value[i : i + _LINE - 1] for i in range(first, len(value), _LINE - 1)]
    return "\r\n".join(out)


def signature_fields(
    message: bytes,
    keys: Sequence[DkimKey],
    *,
    timestamp: int | None = None,
    expire_after: int | None = None,
    headers: Sequence[str] = DEFAULT_HEADERS,
    oversign: Sequence[str] = OVERSIGN,
) -> bytes:
    """The DKIM-Signature fields for `message`, one per key in order, each ending in CRLF.

    Prepending them to the message gives the signed message (that is what sign() does).
    """
    if not keys:
        raise ValueError("no DKIM keys to sign with")
    if expire_after is not None and expire_after <= 0:
        raise ValueError(f"expire_after must be positive seconds, not {expire_after}")
    t = int(time.time()) if timestamp is None else int(timestamp)
    fields, body = _split(message)
    names, signed_fields = _select(fields, headers, oversign)
    bh = base64.b64encode(body_hash(body)).decode("ascii")

    # h= may fold after each colon (RFC 6376 §3.5: FWS is allowed around the colons).
    h_pieces = [("", n.decode("ascii") + ":") for n in names]
    h_pieces[0] = (" ", "h=" + h_pieces[0][1])
    h_pieces[-1] = (h_pieces[-1][0], h_pieces[-1][1][:-1] + ";")
    out = []
    for key in keys:
        tags = ["v=1;", f"a={key.algorithm};", "c=relaxed/relaxed;", f"d={key.domain};", f"s={key.selector};"]
        tags.append(f"t={t};")
        if expire_after is not None:
            tags.append(f"x={t + expire_after};")
        pieces = [(" ", tag) for tag in tags] + h_pieces + [(" ", f"bh={bh};")]
        # b= starts a line of its own; the signed form is the field with b= empty (§3.5, §3.7).
        unsigned = _fold(pieces) + "\r\n b="
        data = signed_fields + canonicalize_header(unsigned.encode("ascii"))[:-2]
        if key.algorithm == "rsa-sha256":
            assert isinstance(key.private_key, rsa.RSAPrivateKey)
            sig = key.private_key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        else:
            assert isinstance(key.private_key, ed25519.Ed25519PrivateKey)
            sig = key.private_key.sign(hashlib.sha256(data).digest())  # RFC 8463 §3: Ed25519 over the hash
        b = base64.b64encode(sig).decode("ascii")
        out.append(unsigned + _fold_b64(b, _LINE - len(" b=")) + "\r\n")
    return "".join(out).encode("ascii")


def sign(
    message: bytes,
    keys: Sequence[DkimKey],
    *,
    timestamp: int | None = None,
    expire_after: int | None = None,
    headers: Sequence[str] = DEFAULT_HEADERS,
    oversign: Sequence[str] = OVERSIGN,
) -> bytes:
    """`message` with one DKIM-Signature field per key prepended, in the order of `keys`.

    The body is canonicalized and hashed once for all keys (relaxed/relaxed). `timestamp`
    is t= (default: now), `expire_after` seconds give x=. `headers` are signed when present
    (each occurrence); `oversign` names are listed once more than present. Raises DkimError
    for a message without a From field or without the empty line ending the header.
    """
    return (
        signature_fields(
            message, keys, timestamp=timestamp, expire_after=expire_after, headers=headers, oversign=oversign
        )
        + message
    )
