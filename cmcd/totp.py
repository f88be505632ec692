"""Two-factor codes for tenant-admin login: RFC 4226 HOTP, RFC 6238 TOTP, otpauth URIs and recovery codes.

Pure functions over bytes and numbers: nothing here reads the clock, stores a secret or remembers a used
code. The caller passes the time ``t`` (Unix seconds) and the last accepted time step, and stores the step
that ``verify`` returns as the new ``last_step``; that is what makes a code single-use.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
from urllib.parse import quote

SECRET_BYTES = 20  # 160 bits, the HMAC-SHA1 block output size RFC 4226 recommends
DEFAULT_DIGITS = 6
DEFAULT_STEP_S = 30

_ALGORITHMS = ("sha1", "sha256", "sha512")
_MIN_DIGITS, _MAX_DIGITS = 6, 10  # dynamic truncation yields 31 bits, at most 10 decimal digits

# 32 characters (60 bits per 12-character code) with no l/1 or o/0 to misread on paper.
RECOVERY_ALPHABET = "23456789abcdefghijkmnpqrstuvwxyz"
_RECOVERY_GROUPS, _RECOVERY_GROUP_LEN = 3, 4


def new_secret() -> bytes:
    """A fresh random 160-bit shared secret."""
    return secrets.token_bytes(SECRET_BYTES)


def b32(secret: bytes) -> str:
    """The secret as upper-case base32 without '=' padding, the form authenticator apps take."""
    return base64.b32encode(secret).decode("ascii").rstrip("=")


def _digest(algorithm: str) -> str:
    """The hashlib name for ``algorithm`` ('sha1', 'SHA256', ...), or ValueError."""
    name = algorithm.lower()
    if name not in _ALGORITHMS:
        raise ValueError(f"unknown TOTP algorithm {algorithm!r}; use one of {', '.join(_ALGORITHMS)}")
    return name


def _check_digits(digits: int) -> None:
    if not _MIN_DIGITS <= digits <= _MAX_DIGITS:
        raise ValueError(f"digits must be {_MIN_DIGITS}..{_MAX_DIGITS}, not {digits}")


def hotp(secret: bytes, counter: int, digits: int = DEFAULT_DIGITS, algorithm: str = "sha1") -> str:
    """The RFC 4226 one-time code for ``counter``, zero-padded to ``digits``."""
    _check_digits(digits)
    if not 0 <= counter < 2**64:
        raise ValueError(f"HOTP counter must fit in 64 unsigned bits, not {counter}")
    mac = hmac.new(secret, struct.pack(">Q", counter), _digest(algorithm)).digest()
    offset = mac[-1] & 0x0F  # dynamic truncation (RFC 4226 section 5.3)
    value = int.from_bytes(mac[offset : offset + 4], "big") & 0x7FFF_FFFF
    return str(value % 10**digits).zfill(digits)


def time_step(t: float, step: int = DEFAULT_STEP_S) -> int:
    """The RFC 6238 time step number T for Unix time ``t`` (T0 = 0)."""
    if step <= 0:
        raise ValueError(f"TOTP step must be a positive number of seconds, not {step}")
    if t < 0:
        raise ValueError(f"TOTP time must not be before 1970, got {t}")
    return int(t // step)


def totp(
    secret: bytes, t: float, step: int = DEFAULT_STEP_S, digits: int = DEFAULT_DIGITS, algorithm: str = "sha1"
) -> str:
    """The RFC 6238 code valid at Unix time ``t``."""
    return hotp(secret, time_step(t, step), digits, algorithm)


def verify(
    secret: bytes,
    code: str,
    t: float,
    last_step: int,
    window: int = 1,
    step: int = DEFAULT_STEP_S,
    *,
    digits: int = DEFAULT_DIGITS,
    algorithm: str = "sha1",
) -> int | None:
    """The time step ``code`` belongs to, within ``window`` steps of ``t`` and after ``last_step``; else None.

    Spaces in the code are ignored; anything else but exactly ``digits`` ASCII digits is refused. A step at
    or before ``last_step`` is never accepted, so a used code (or an older one) cannot be replayed: store the
    returned step as the new ``last_step`` (use -1 before the first login). Every candidate is compared in
    constant time, and all of them are computed, whichever matches.
    """
    if window < 0:
        raise ValueError(f"TOTP window must not be negative, got {window}")
    _check_digits(digits)
    candidate = code.replace(" ", "")
    if len(candidate) != digits or not (candidate.isascii() and candidate.isdigit()):
        return None
    now = time_step(t, step)
    matched: int | None = None
    for s in range(max(now - window, last_step + 1, 0), now + window + 1):
        if hmac.compare_digest(hotp(secret, s, digits, algorithm), candidate):
            matched = s  # keep the latest match: the stricter replay guard
    return matched


def provisioning_uri(
    secret: bytes,
    account: str,
    issuer: str,
    *,
    digits: int = DEFAULT_DIGITS,
    step: int = DEFAULT_STEP_S,
    algorithm: str = "sha1",
) -> str:
    """The ``otpauth://totp/...`` URI (Google Authenticator key URI format) an authenticator app scans.

    The issuer and account may not contain ':', which separates them in the label.
    """
    if not issuer or not account:
        raise ValueError("a provisioning URI needs both an issuer and an account name")
    if ":" in issuer or ":" in account:
        raise ValueError(f"issuer {issuer!r} and account {account!r} may not contain ':'")
    _check_digits(digits)
    _digest(algorithm)
    label = f"{quote(issuer, safe='')}:{quote(account, safe='')}"
    params = {
        "secret": b32(secret),
        "issuer": issuer,
        "algorithm": algorithm.upper(),
        "digits": str(digits),
        "period": str(step),
    }
    query = "&".join(f"{key}={quote(value, safe='')}" for key, value in params.items())
    return f"otpauth://totp/{label}?{query}"


def recovery_codes(n: int = 10) -> list[str]:
    """``n`` fresh single-use recovery codes like ``k7mq-2xhd-rp9c`` (60 random bits each)."""
    return [
        "-".join(
            "".join(secrets.choice(RECOVERY_ALPHABET) for _ in range(_RECOVERY_GROUP_LEN))
            for _ in range(_RECOVERY_GROUPS)
        )
        for _ in range(n)
    ]


def normalise_recovery(code: str) -> str:
    """A recovery code as typed, lower-cased with spaces and dashes removed."""
    return code.strip().lower().replace(" ", "").replace("-", "")


def hash_recovery(code: str) -> str:
    """The SHA-256 hex digest of the normalised recovery code, the form to store and compare."""
    return hashlib.sha256(normalise_recovery(code).encode("utf-8")).hexdigest()
