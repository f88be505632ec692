"""Data keys, address encryption (AES-256-GCM + HMAC index) and password hashing; no I/O but key files.

Remote replies are encrypted like addresses (seal_text/open_text): real MTAs echo the recipient
("550 5.1.1 <user@example.net>: ..."), so a reply at rest is an address at rest. Log lines cannot
be decrypted later, so they get addresses redacted instead (redact_addresses).

Password hashing (scrypt) is deliberately slow: callers run it in a thread, never on the
event loop.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import re
import secrets
import ssl
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cmcd import intl
from cmcd.errors import KeyFileError

_KEY_HEADER = "cmcd-data-key-v1"
# scrypt cost: n=2**15, r=8 uses 32 MiB per verification (about 50-100 ms here).
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**15, 8, 1
_SCRYPT_MAXMEM = 64 * 1024 * 1024


@dataclass(frozen=True)
class DataKeys:
    """The AES-256-GCM key for addresses and bodies at rest, and the separate HMAC index key."""

    enc_key: bytes
    index_key: bytes
    _aead: AESGCM = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_aead", AESGCM(self.enc_key))

    def encrypt(self, plaintext: str) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, plaintext.encode("utf-8"), None)

    def decrypt(self, blob: bytes) -> str:
        try:
            return self._aead.decrypt(blob[:12], blob[12:], None).decode("utf-8")
        except (InvalidTag, ValueError):
            raise KeyFileError("data key does not decrypt this value (wrong store.key_file?)") from None

    def encrypt_bytes(self, plaintext: bytes, aad: bytes = b"") -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def decrypt_bytes(self, blob: bytes, aad: bytes = b"") -> bytes:
        try:
            return self._aead.decrypt(blob[:12], blob[12:], aad)
        except (InvalidTag, ValueError):
            raise KeyFileError("data key does not decrypt this value (wrong store.key_file?)") from None

    def seal_text(self, text: str) -> bytes | None:
        """TEXT (a remote reply, a suppression reason) encrypted like an address; None for "", as
        most mail-log rows (every "accepted" one) have no reply."""
        return self.encrypt(text) if text else None

    def open_text(self, blob: bytes | None) -> str:
        """The text seal_text() sealed ("" for None)."""
        return self.decrypt(bytes(blob)) if blob else ""

    def index(self, address: str) -> bytes:
        """Keyed lookup index of an address; case-insensitive on the whole address, Unicode NFC and
        the domain as A-labels (cmcd.intl.index_form: an ASCII address hashes as it always has)."""
        return hmac.digest(self.index_key, intl.index_form(address).encode("utf-8"), "sha256")[:16]


#: anything that looks like an address: a quoted local part, or the whole run of characters before
#: "@" up to a separator (so every atext character, = { } ' included, is covered), then a domain
_ADDRESS_RE = re.compile(r'(?:"(?:[^"\\\r\n]|\\.)*"|[^\s<>()\[\],;:"@\\]+)@(?=[^\s<>@]*\w)')
#: a logfmt key in front of an address (a quoted value, or one of the keys that carry an address):
#: kept, it is no part of it; any other "word=" is taken as part of the local part (a BATV tag)
_LOG_KEY = re.compile(r"^(?:[a-z_][a-z0-9_]*='|(?:rcpt|sender|login|address|mail_from|from|to)=)")
REDACTED = "<redacted>"


def _redact_one(m: re.Match[str]) -> str:
    key = _LOG_KEY.match(m.group(0))
    return (key.group(0) if key else "") + REDACTED + "@"


def redact_addresses(text: str) -> str:
    """TEXT with the local part of everything that looks like an address replaced by <redacted>
    (the domain stays: it says which site answered). For log lines, which hold remote replies and
    cannot be encrypted: "550 5.1.1 <user@example.net>" becomes "550 5.1.1 <<redacted>@example.net>";
    "rcpt=a=b@x" becomes "rcpt=<redacted>@x"."""
    return _ADDRESS_RE.sub(_redact_one, text) if "@" in text else text


def generate_key_file(path: Path) -> None:
    """Write a new key file readable by its owner only; refuse to overwrite one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = f"{_KEY_HEADER}\nenc {secrets.token_hex(32)}\nindex {secrets.token_hex(32)}\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())


def read_key_file(path: Path) -> DataKeys:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: key file missing (store.key_file)") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"{path}: key file is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run: chmod 600 {path}"
        )
    try:
        lines = path.read_text().split("\n")
        if lines[0] != _KEY_HEADER:
            raise ValueError
        fields = dict(line.split(" ", 1) for line in lines[1:] if line)
        keys = DataKeys(bytes.fromhex(fields["enc"]), bytes.fromhex(fields["index"]))
        if len(keys.enc_key) != 32 or len(keys.index_key) != 32:
            raise ValueError
    except (ValueError, KeyError, UnicodeDecodeError):
        raise KeyFileError(f"{path}: not a cmcd data key file") from None
    return keys


def hash_password(password: str) -> str:
    """scrypt with a random salt, encoded as scrypt$n$r$p$salt$hash."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, maxmem=_SCRYPT_MAXMEM, dklen=32
    )
    b64 = base64.b64encode
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = encoded.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(
            password.encode("utf-8"),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=_SCRYPT_MAXMEM,
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


@functools.cache
def dummy_hash() -> str:
    """A hash of a random password, verified against when a login is unknown, so a failed
    AUTH for an unknown login costs the same as one for a known login."""
    return hash_password(secrets.token_hex(16))


def generate_password() -> str:
    return secrets.token_urlsafe(18)


def server_tls_context(cert: str, key: str) -> ssl.SSLContext:
    """The TLS context of cmcd's listeners (SMTP and the API): TLS 1.2 or later, OpenSSL's defaults."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx
