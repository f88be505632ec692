"""cmcd.totp: RFC 4226/6238 vectors, verify() window and replay guard, otpauth URIs, recovery codes, pyotp."""

from __future__ import annotations

import datetime
import hashlib
import math
import re
from types import ModuleType
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmcd import totp as otp

# RFC 6238 Appendix B: the seed is the ASCII digits repeated to the hash's output length.
SEED = {
    "sha1": b"12345678901234567890",
    "sha256": b"12345678901234567890123456789012",
    "sha512": b"1234567890123456789012345678901234567890123456789012345678901234",
}
RFC6238 = [
    (59, "94287082", "46119246", "90693936"),
    (1111111109, "07081804", "68084774", "25091201"),
    (1111111111, "14050471", "67062674", "99943326"),
    (1234567890, "89005924", "91819424", "93441116"),
    (2000000000, "69279037", "90698825", "38618901"),
    (20000000000, "65353130", "77737706", "47863826"),
]
RFC6238_CASES = [
    pytest.param(t, algorithm, codes[i], id=f"{algorithm}-{t}")
    for t, *codes in RFC6238
    for i, algorithm in enumerate(("sha1", "sha256", "sha512"))
]

# RFC 4226 Appendix D: secret "12345678901234567890", counters 0..9, 6 digits.
RFC4226 = ["755224", "287082", "359152", "969429", "338314", "254676", "287922", "162583", "399871", "520489"]

SECRET = SEED["sha1"]
NOW = 1_700_000_015.0  # mid-step, so +-1 s never crosses a step boundary
NOW_STEP = int(NOW // 30)


@pytest.mark.parametrize(("t", "algorithm", "expected"), RFC6238_CASES)
def test_rfc6238_vectors(t: int, algorithm: str, expected: str) -> None:
    assert otp.totp(SEED[algorithm], t, step=30, digits=8, algorithm=algorithm) == expected


@pytest.mark.parametrize(("counter", "expected"), list(enumerate(RFC4226)), ids=[f"c{c}" for c in range(10)])
def test_rfc4226_vectors(counter: int, expected: str) -> None:
    assert otp.hotp(SECRET, counter) == expected


def test_codes_are_zero_padded() -> None:
    assert otp.totp(SECRET, 1111111109, digits=8) == "07081804"
    assert all(len(otp.hotp(SECRET, c)) == 6 for c in range(200))
    assert any(otp.hotp(SECRET, c).startswith("0") for c in range(200))


def test_algorithm_name_is_case_insensitive() -> None:
    assert otp.totp(SEED["sha256"], 59, digits=8, algorithm="SHA256") == "46119246"


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda: otp.hotp(SECRET, 0, algorithm="md5"), id="unknown-algorithm"),
        pytest.param(lambda: otp.hotp(SECRET, 0, digits=5), id="too-few-digits"),
        pytest.param(lambda: otp.hotp(SECRET, 0, digits=11), id="too-many-digits"),
        pytest.param(lambda: otp.hotp(SECRET, -1), id="negative-counter"),
        pytest.param(lambda: otp.hotp(SECRET, 2**64), id="counter-over-64-bits"),
        pytest.param(lambda: otp.totp(SECRET, -1.0), id="time-before-1970"),
        pytest.param(lambda: otp.totp(SECRET, NOW, step=0), id="zero-step"),
        pytest.param(lambda: otp.verify(SECRET, "123456", NOW, -1, window=-1), id="negative-window"),
    ],
)
def test_bad_arguments_raise(call: object) -> None:
    assert callable(call)
    with pytest.raises(ValueError):
        call()


def test_new_secret_and_b32() -> None:
    secret = otp.new_secret()
    assert len(secret) == 20 and secret != otp.new_secret()
    encoded = otp.b32(secret)
    assert encoded == encoded.upper() and "=" not in encoded and len(encoded) == 32
    assert otp.b32(b"\x00" * 10) == "AAAAAAAAAAAAAAAA"
    assert otp.b32(b"12345") == "GEZDGNBV"
    assert otp.b32(b"1") == "GE"  # would be "GE======" with padding


@pytest.mark.parametrize(
    ("offset", "window", "accepted"),
    [
        pytest.param(0, 1, True, id="now"),
        pytest.param(-1, 1, True, id="one-step-behind"),
        pytest.param(1, 1, True, id="one-step-ahead"),
        pytest.param(-2, 1, False, id="two-steps-behind"),
        pytest.param(2, 1, False, id="two-steps-ahead"),
        pytest.param(-2, 2, True, id="two-behind-window-2"),
        pytest.param(1, 0, False, id="one-ahead-window-0"),
        pytest.param(0, 0, True, id="now-window-0"),
    ],
)
def test_verify_window(offset: int, window: int, accepted: bool) -> None:
    code = otp.hotp(SECRET, NOW_STEP + offset)
    expected = NOW_STEP + offset if accepted else None
    assert otp.verify(SECRET, code, NOW, last_step=-1, window=window) == expected


def test_verify_at_step_boundaries() -> None:
    start = NOW_STEP * 30.0
    code = otp.hotp(SECRET, NOW_STEP)
    assert otp.verify(SECRET, code, start, -1, window=0) == NOW_STEP
    assert otp.verify(SECRET, code, start - 0.001, -1, window=0) is None
    assert otp.verify(SECRET, code, start + 29.999, -1, window=0) == NOW_STEP
    assert otp.verify(SECRET, code, start + 30.0, -1, window=0) is None


def test_verify_near_epoch_does_not_use_negative_steps() -> None:
    assert otp.verify(SECRET, otp.hotp(SECRET, 0), 5.0, -1, window=1) == 0


def test_replay_of_same_step_refused() -> None:
    code = otp.totp(SECRET, NOW)
    last = otp.verify(SECRET, code, NOW, last_step=-1)
    assert last == NOW_STEP
    assert otp.verify(SECRET, code, NOW, last_step=last) is None
    assert otp.verify(SECRET, code, NOW + 20, last_step=last) is None  # still inside the window


def test_older_step_refused_after_newer_used() -> None:
    newer = otp.verify(SECRET, otp.hotp(SECRET, NOW_STEP), NOW, last_step=-1)
    assert newer == NOW_STEP
    assert otp.verify(SECRET, otp.hotp(SECRET, NOW_STEP - 1), NOW, last_step=newer) is None


def test_next_step_accepted_after_current_used() -> None:
    assert otp.verify(SECRET, otp.hotp(SECRET, NOW_STEP + 1), NOW, last_step=NOW_STEP) == NOW_STEP + 1


def test_spaces_in_code_are_ignored() -> None:
    code = otp.totp(SECRET, NOW)
    assert otp.verify(SECRET, f" {code[:3]} {code[3:]} ", NOW, -1) == NOW_STEP


@pytest.mark.parametrize(
    "garble",
    [
        pytest.param(lambda c: "", id="empty"),
        pytest.param(lambda c: c[:5], id="too-short"),
        pytest.param(lambda c: c + "0", id="too-long"),
        pytest.param(lambda c: c[:2] + "a" + c[3:], id="letter"),
        pytest.param(lambda c: c[:3] + "-" + c[3:], id="dash"),
        pytest.param(lambda c: "+" + c[1:], id="sign"),
        pytest.param(lambda c: c.translate({ord(d): ord(d) + 0xFEE0 for d in "0123456789"}), id="fullwidth-digits"),
        pytest.param(lambda c: c[:5] + str((int(c[5]) + 1) % 10), id="wrong-last-digit"),
        pytest.param(lambda c: c[::-1] if c != c[::-1] else "000000", id="reversed"),
    ],
)
def test_garbled_or_wrong_codes_refused(garble: object) -> None:
    assert callable(garble)
    code = otp.totp(SECRET, NOW)
    assert otp.verify(SECRET, garble(code), NOW, -1) is None


def test_wrong_secret_refused() -> None:
    assert otp.verify(b"another secret 12345", otp.totp(SECRET, NOW), NOW, -1) is None


def test_provisioning_uri_fields() -> None:
    secret = otp.new_secret()
    account, issuer = "alice+admin@example.com", "Example Mail & Co/EU?"
    uri = otp.provisioning_uri(secret, account, issuer)
    parts = urlsplit(uri)
    assert parts.scheme == "otpauth"
    assert parts.netloc == "totp"
    assert parts.fragment == ""
    raw_issuer, raw_account = parts.path.removeprefix("/").split(":")
    assert unquote(raw_issuer) == issuer and unquote(raw_account) == account
    assert " " not in uri and "&" not in parts.path and "?" not in parts.path
    query = parse_qs(parts.query, strict_parsing=True)
    assert query == {
        "secret": [otp.b32(secret)],
        "issuer": [issuer],
        "algorithm": ["SHA1"],
        "digits": ["6"],
        "period": ["30"],
    }
    assert uri.startswith("otpauth://totp/Example%20Mail%20%26%20Co%2FEU%3F:alice%2Badmin%40example.com?secret=")


@pytest.mark.parametrize(
    ("account", "issuer"),
    [
        pytest.param("alice", "Evil:Issuer", id="colon-in-issuer"),
        pytest.param("al:ice", "Issuer", id="colon-in-account"),
        pytest.param("", "Issuer", id="empty-account"),
        pytest.param("alice", "", id="empty-issuer"),
    ],
)
def test_provisioning_uri_refuses_bad_label(account: str, issuer: str) -> None:
    with pytest.raises(ValueError):
        otp.provisioning_uri(SECRET, account, issuer)


def test_recovery_codes_shape_and_entropy() -> None:
    codes = otp.recovery_codes()
    assert len(codes) == 10 and len(set(codes)) == 10
    alphabet = otp.RECOVERY_ALPHABET
    assert len(set(alphabet)) == len(alphabet) and not set(alphabet) & set("01lo")
    assert alphabet == alphabet.lower()
    pattern = re.compile(rf"[{alphabet}]{{4}}-[{alphabet}]{{4}}-[{alphabet}]{{4}}")
    assert all(pattern.fullmatch(code) for code in codes)
    assert 12 * math.log2(len(alphabet)) >= 60
    assert len(otp.recovery_codes(3)) == 3 and otp.recovery_codes(0) == []


def test_recovery_normalise_and_hash() -> None:
    assert otp.normalise_recovery(" ABCD-efgh ijKL ") == "abcdefghijkl"
    expected = hashlib.sha256(b"abcdefghijkl").hexdigest()
    for typed in ("abcd-efgh-ijkl", "ABCD EFGH IJKL", "abcdefghijkl", "Ab-Cd-eFgH-ijkl"):
        assert otp.hash_recovery(typed) == expected
    assert otp.hash_recovery("abcd-efgh-ijkm") != expected


# --- a second implementation: pyotp (optional; these tests skip without it) ---


@pytest.fixture(scope="module")
def pyotp() -> ModuleType:
    return pytest.importorskip("pyotp")


DIGESTS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha512": hashlib.sha512}
_LAST_UTC_SECOND = 253402300799  # 9999-12-31T23:59:59Z, the end of datetime's range


@settings(max_examples=150, deadline=None)
@given(
    secret=st.binary(min_size=16, max_size=64),
    t=st.floats(min_value=0, max_value=_LAST_UTC_SECOND, allow_nan=False),
    step=st.sampled_from([30, 60]),
    digits=st.sampled_from([6, 8]),
    algorithm=st.sampled_from(sorted(DIGESTS)),
)
def test_totp_matches_pyotp(pyotp: ModuleType, secret: bytes, t: float, step: int, digits: int, algorithm: str) -> None:
    reference = pyotp.TOTP(otp.b32(secret), digits=digits, digest=DIGESTS[algorithm], interval=step)
    when = datetime.datetime.fromtimestamp(int(t), tz=datetime.UTC)  # avoids local-time conversions
    assert otp.totp(secret, t, step=step, digits=digits, algorithm=algorithm) == reference.at(when)


@settings(max_examples=100, deadline=None)
@given(secret=st.binary(min_size=16, max_size=64), counter=st.integers(min_value=0, max_value=2**63 - 1))
def test_hotp_matches_pyotp(pyotp: ModuleType, secret: bytes, counter: int) -> None:
    assert otp.hotp(secret, counter) == pyotp.HOTP(otp.b32(secret)).at(counter)


@settings(max_examples=50, deadline=None)
@given(secret=st.binary(min_size=16, max_size=64), t=st.integers(min_value=0, max_value=2**33))
def test_pyotp_code_verifies(pyotp: ModuleType, secret: bytes, t: int) -> None:
    code = pyotp.TOTP(otp.b32(secret)).at(datetime.datetime.fromtimestamp(t, tz=datetime.UTC))
    assert otp.verify(secret, code, float(t), last_step=-1, window=0) == t // 30


def test_pyotp_parses_provisioning_uri(pyotp: ModuleType) -> None:
    secret = otp.new_secret()
    parsed = pyotp.parse_uri(otp.provisioning_uri(secret, "alice@example.com", "Example Mail"))
    assert isinstance(parsed, pyotp.TOTP)
    assert parsed.secret == otp.b32(secret)
    assert parsed.name == "alice@example.com" and parsed.issuer == "Example Mail"
    assert parsed.digits == 6 and parsed.interval == 30
    assert parsed.at(NOW) == otp.totp(secret, NOW)
