"""Data keys, address encryption, the HMAC index, key files and password hashes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cmcd import crypto
from cmcd.errors import KeyFileError


@pytest.fixture(scope="module")
def keys() -> crypto.DataKeys:
    return crypto.DataKeys(os.urandom(32), os.urandom(32))


@pytest.mark.parametrize(
    "plaintext",
    ["rcpt@dst.test", "", "Ünïcødé@exämple.test", "x" * 10_000],
    ids=["address", "empty", "non-ascii", "long"],
)
def test_encrypt_decrypt_roundtrip(keys: crypto.DataKeys, plaintext: str) -> None:
    blob = keys.encrypt(plaintext)
    assert keys.decrypt(blob) == plaintext
    assert plaintext.encode() not in blob or not plaintext
    assert keys.encrypt(plaintext) != blob, "each encryption uses a fresh nonce"


@pytest.mark.parametrize(
    ("plaintext", "aad"),
    [(b"body\r\n", b""), (b"\x00\xff" * 100, b"queue-id"), (b"", b"aad")],
    ids=["no-aad", "binary-with-aad", "empty-with-aad"],
)
def test_encrypt_bytes_roundtrip(keys: crypto.DataKeys, plaintext: bytes, aad: bytes) -> None:
    blob = keys.encrypt_bytes(plaintext, aad)
    assert keys.decrypt_bytes(blob, aad) == plaintext
    with pytest.raises(KeyFileError):
        keys.decrypt_bytes(blob, aad + b"other")


def _flip(blob: bytes, i: int) -> bytes:
    return blob[:i] + bytes([blob[i] ^ 0x01]) + blob[i + 1 :]


@pytest.mark.parametrize(
    "tamper",
    [
        lambda b: _flip(b, 0),
        lambda b: _flip(b, 14),
        lambda b: _flip(b, len(b) - 1),
        lambda b: b[:-1],
        lambda b: b + b"\x00",
        lambda b: b[:20],
        lambda b: b[:5],
        lambda b: b"",
    ],
    ids=[
        "nonce-bit",
        "ciphertext-bit",
        "tag-bit",
        "tag-truncated",
        "byte-appended",
        "cut-to-20-bytes",
        "cut-inside-nonce",
        "empty",
    ],
)
def test_tampered_ciphertext_raises_key_file_error(keys: crypto.DataKeys, tamper) -> None:  # type: ignore[no-untyped-def]
    blob = keys.encrypt("rcpt@dst.test")
    with pytest.raises(KeyFileError):
        keys.decrypt(tamper(blob))


def test_wrong_key_raises_key_file_error(keys: crypto.DataKeys) -> None:
    other = crypto.DataKeys(os.urandom(32), keys.index_key)
    with pytest.raises(KeyFileError, match="wrong store.key_file"):
        other.decrypt(keys.encrypt("rcpt@dst.test"))


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("Rcpt@Dst.Test", "rcpt@dst.test", True),
        ("RCPT@DST.TEST", "rcpt@dst.test", True),
        (" rcpt@dst.test\t", "rcpt@dst.test", True),
        ("rcpt@dst.test", "rcpt2@dst.test", False),
        ("rcpt@dst.test", "rcpt@dst.tes", False),
        ("J\u00f6ran@B\u00fccher.Example", "jo\u0308ran@bu\u0308cher.example", True),
        ("user@b\u00fccher.example", "user@xn--bcher-kva.example", True),
        ("\u30e6\u30fc\u30b6\u30fc@\u4f8b\u3048.jp", "\u30e6\u30fc\u30b6\u30fc@xn--r8jz45g.jp", True),
        ("j\u00f6ran@example.com", "joran@example.com", False),
    ],
    ids=[
        "mixed-case",
        "upper-case",
        "surrounding-space",
        "other-local-part",
        "other-domain",
        "nfc-and-nfd-and-case",
        "u-label-and-a-label",
        "utf8-local-part-a-label",
        "accent-matters",
    ],
)
def test_index_is_case_insensitive(keys: crypto.DataKeys, a: str, b: str, same: bool) -> None:
    assert (keys.index(a) == keys.index(b)) is same
    assert len(keys.index(a)) == 16


def test_index_depends_on_the_index_key(keys: crypto.DataKeys) -> None:
    other = crypto.DataKeys(keys.enc_key, os.urandom(32))
    assert other.index("rcpt@dst.test") != keys.index("rcpt@dst.test")
    assert b"rcpt" not in keys.index("rcpt@dst.test")


# -- key files ---------------------------------------------------------------------------------


def test_key_file_created_0600_and_readable(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "data.key"
    crypto.generate_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    k = crypto.read_key_file(path)
    assert len(k.enc_key) == 32 and len(k.index_key) == 32 and k.enc_key != k.index_key
    assert k.decrypt(k.encrypt("x@y.test")) == "x@y.test"
    assert crypto.read_key_file(path) == k


def test_key_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "data.key"
    crypto.generate_key_file(path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        crypto.generate_key_file(path)
    assert path.read_bytes() == before


def test_two_key_files_differ(tmp_path: Path) -> None:
    crypto.generate_key_file(tmp_path / "a.key")
    crypto.generate_key_file(tmp_path / "b.key")
    assert crypto.read_key_file(tmp_path / "a.key") != crypto.read_key_file(tmp_path / "b.key")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o601], ids=["0644", "0640", "0604", "0660", "0601"])
def test_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "data.key"
    crypto.generate_key_file(path)
    path.chmod(mode)
    with pytest.raises(KeyFileError) as err:
        crypto.read_key_file(path)
    assert str(path) in str(err.value)
    assert f"mode {mode:04o}" in str(err.value)
    assert "chmod 600" in str(err.value)


@pytest.mark.parametrize("mode", [0o600, 0o400], ids=["0600", "0400"])
def test_private_key_file_modes_are_accepted(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "data.key"
    crypto.generate_key_file(path)
    path.chmod(mode)
    assert len(crypto.read_key_file(path).enc_key) == 32


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="key file missing"):
        crypto.read_key_file(tmp_path / "absent.key")


@pytest.mark.parametrize(
    "content",
    [
        "",
        "not a key\n",
        "cmcd-data-key-v1\n",
        "cmcd-data-key-v1\nenc 00\nindex 00\n",
        "cmcd-data-key-v1\nenc " + "zz" * 32 + "\nindex " + "00" * 32 + "\n",
        "cmcd-data-key-v2\nenc " + "00" * 32 + "\nindex " + "00" * 32 + "\n",
    ],
    ids=["empty", "wrong-header", "no-keys", "short-keys", "not-hex", "future-version"],
)
def test_corrupt_key_file_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "data.key"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="not a cmcd data key file"):
        crypto.read_key_file(path)


# -- passwords ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hashed() -> str:
    return crypto.hash_password("correct horse battery")


def test_hash_format_and_salt(hashed: str) -> None:
    scheme, n, r, p, salt, digest = hashed.split("$")
    assert (scheme, n, r, p) == ("scrypt", str(2**15), "8", "1")
    assert "correct horse" not in hashed
    assert crypto.hash_password("correct horse battery") != hashed, "a fresh salt each time"


@pytest.mark.parametrize(
    ("password", "ok"),
    [("correct horse battery", True), ("correct horse battery ", False), ("Correct horse battery", False), ("", False)],
    ids=["right", "trailing-space", "case", "empty"],
)
def test_verify_password(hashed: str, password: str, ok: bool) -> None:
    assert crypto.verify_password(password, hashed) is ok


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        "garbage",
        "bcrypt$16$8$1$c2FsdA==$ZGlnZXN0",
        "scrypt$x$8$1$c2FsdA==$ZGlnZXN0",
        "scrypt$16$8$1$c2FsdA==$###",
        "scrypt$16$8$1$c2FsdA==$",
        "scrypt$15$8$1$c2FsdA==$ZGlnZXN0",
        "scrypt$1099511627776$8$1$c2FsdA==$ZGlnZXN0",
        "scrypt$16$8$1$c2FsdA==$ZGlnZXN0$extra",
    ],
    ids=[
        "empty",
        "no-fields",
        "other-scheme",
        "n-not-int",
        "digest-not-base64",
        "empty-digest",
        "n-not-power-of-2",
        "n-too-costly",
        "extra-field",
    ],
)
def test_verify_with_malformed_hash_returns_false(encoded: str) -> None:
    assert crypto.verify_password("anything", encoded) is False


def test_dummy_hash_is_stable_and_matches_nothing_common() -> None:
    assert crypto.dummy_hash() == crypto.dummy_hash()
    assert crypto.verify_password("", crypto.dummy_hash()) is False


def test_generated_passwords_differ() -> None:
    a, b = crypto.generate_password(), crypto.generate_password()
    assert a != b and len(a) >= 20
