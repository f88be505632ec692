"""DKIM signing (cmcd.dkim): RFC 8463 test vectors, verification by dkimpy and OpenDKIM, keys and errors.

Nothing here touches DNS: dkimpy gets a dnsfunc answering from DkimKey.dns_txt(), OpenDKIM
a TestPublicKeys file.
"""

from __future__ import annotations

import base64
import hashlib
import random
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from dkim.canonicalization import Relaxed
from hypothesis import given
from hypothesis import strategies as st

from cmcd import dkim
from cmcd.dkim import DkimError, DkimKey
from tests.conftest import REQUIRE_PEERS, need

DOMAIN = "example.com"


@pytest.fixture(scope="module")
def rsa_key() -> DkimKey:
    return DkimKey.generate_rsa(DOMAIN, "rsa2048")


@pytest.fixture(scope="module")
def ed_key() -> DkimKey:
    return DkimKey.generate_ed25519(DOMAIN, "ed")


@pytest.fixture(scope="module")
def keys(rsa_key: DkimKey, ed_key: DkimKey) -> list[DkimKey]:
    return [rsa_key, ed_key]


def dnsfunc_for(*keys: DkimKey) -> Callable[..., bytes | None]:
    records = {f"{k.dns_name}.".encode(): k.dns_txt().encode() for k in keys}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)

    return dnsfunc


def need_nacl() -> None:
    """dkimpy verifies Ed25519 through PyNaCl; without it only the RSA signatures are checked by dkimpy."""
    try:
        import nacl.signing  # noqa: F401
    except ImportError:
        if REQUIRE_PEERS:
            pytest.fail("PyNaCl is not installed (dkimpy needs it to verify ed25519-sha256)")
        pytest.skip("PyNaCl is not installed (dkimpy needs it to verify ed25519-sha256)")


def verify_all(message: bytes, keys: list[DkimKey]) -> list[bool]:
    """dkimpy's verdict on each DKIM-Signature in turn (index 0 is the topmost)."""
    d = dkimpy.DKIM(message)
    dnsfunc = dnsfunc_for(*keys)
    verdicts = []
    for i in range(len(keys)):
        try:
            verdicts.append(bool(d.verify(idx=i, dnsfunc=dnsfunc)))
        except dkimpy.DKIMException:  # DKIM.verify raises on a body hash mismatch
            verdicts.append(False)
    return verdicts


def tags(signed: bytes, idx: int = 0) -> dict[str, str]:
    """The tags of the idx-th DKIM-Signature field, FWS removed."""
    fields = re.findall(rb"^DKIM-Signature:(.*?)\r\n(?![ \t])", signed, re.M | re.S)
    value = re.sub(r"\s+", "", fields[idx].decode())
    return dict(t.split("=", 1) for t in value.split(";") if t)


# --- messages -------------------------------------------------------------------------------

HEAD = (
    b"From: Joe SixPack <joe@example.com>\r\n"
    b"To: Suzie Q <suzie@shopping.example.net>\r\n"
    b"Subject: Is dinner ready?\r\n"
    b"Date: Fri, 11 Jul 2003 21:00:37 -0700\r\n"
    b"Message-ID: <20030712040037.46341.5F8J@example.com>\r\n"
)

PLAIN = HEAD + b"\r\nHi.\r\n\r\nWe lost the game.  Are you hungry yet?\r\n\r\nJoe.\r\n"

MULTIPART = (
    HEAD + b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n'
    b"List-Id: Dinner <dinner.lists.example.com>\r\n"
    b"List-Unsubscribe: <mailto:leave@lists.example.com>\r\n"
    b"\r\n"
    b"This is a MIME message.\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n" + "Grüße, see the attachment.\r\n".encode() + b"--b1\r\n"
    b'Content-Type: application/octet-stream; name="data.bin"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b'Content-Disposition: attachment; filename="data.bin"\r\n'
    b"\r\n"
    + b"\r\n".join(
        base64.b64encode(bytes(random.Random(1).randrange(256) for _ in range(3000)))[i : i + 76]
        for i in range(0, 4000, 76)
    )
    + b"\r\n--b1--\r\n"
)

UTF8_HEADERS = (
    "From: Jürgen Müller <jürgen@example.com>\r\n"
    "To: Zoë <zoë@example.net>\r\n"
    "Subject: Grüße aus Köln — ☕\r\n"
    "Date: Fri, 11 Jul 2003 21:00:37 -0700\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    "Schöne Grüße!\r\n"
).encode()

RFC2047_HEADERS = (
    b"From: =?UTF-8?Q?J=C3=BCrgen_M=C3=BCller?= <juergen@example.com>\r\n"
    b"To: =?ISO-8859-1?Q?Zo=EB?= <zoe@example.net>\r\n"
    b"Subject: =?UTF-8?B?R3LDvMOfZSBhdXMgS8O2bG4=?=\r\n"
    b"Date: Fri, 11 Jul 2003 21:00:37 -0700\r\n"
    b"\r\n"
    b"Hello.\r\n"
)

LONG_FOLDED = (
    b"Received: from a.example (a.example [192.0.2.1])\r\n\tby b.example; Fri, 11 Jul 2003 21:00:37 -0700\r\n"
    b"From: Joe <joe@example.com>\r\n"
    b"To: " + b",\r\n\t".join(b"person%d <p%d@example.net>" % (i, i) for i in range(30)) + b"\r\n"
    b"Cc: one@example.net,   \r\n     two@example.net\t,\r\n three@example.net   \r\n"
    b"Subject: a subject that goes on and on and on and on and on and on and on and on\r\n"
    b"  and continues on the next line\t\twith tabs  \r\n"
    b"References: " + b"\r\n ".join(b"<%d.ref@example.com>" % i for i in range(20)) + b"\r\n"
    b"In-Reply-To: <19.ref@example.com>\r\n"
    b"Date: Fri, 11 Jul 2003 21:00:37 -0700\r\n"
    b"\r\n"
    b"Body.\r\n"
)

NO_FINAL_CRLF = HEAD + b"\r\nHi.\r\n\r\nThe last line has no CRLF."
EMPTY_BODY = HEAD + b"\r\n"
ONLY_BLANK_LINES = HEAD + b"\r\n\r\n\r\n\r\n"
TRAILING_WSP = HEAD + b"\r\nline with trailing spaces   \r\ntabs\t\tinside\t \r\n \t \r\n\r\nend \t\r\n\r\n\r\n"
ODD_SPACING = b"FROM:Joe <joe@example.com>\r\nSUBJECT:no space\r\nto:\t a@example.net \t\r\n\r\nx\r\n"

MESSAGES = {
    "plain": PLAIN,
    "multipart-attachment": MULTIPART,
    "utf8-raw-headers": UTF8_HEADERS,
    "rfc2047-headers": RFC2047_HEADERS,
    "long-folded-headers": LONG_FOLDED,
    "body-without-final-crlf": NO_FINAL_CRLF,
    "empty-body": EMPTY_BODY,
    "only-blank-lines": ONLY_BLANK_LINES,
    "trailing-whitespace": TRAILING_WSP,
    "odd-header-spacing": ODD_SPACING,
}


# --- RFC 8463 Appendix A ------------------------------------------------------------------------

RFC8463_SEED = "nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A="
RFC8463_ED_PUBLIC = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
RFC8463_RSA_PUBLIC = (
    "MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDkHlOQoBTzWRiGs5V6NpP3idY6Wk08a5qhdR6wy5bdOKb2jLQiY/"
    "J16JYi0Qvx/byYzCNb3W91y3FutACDfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqMKrM3rG4hstT5QjvHO9PzoxZyVYLzBfO2EeC3Ip3G+"
    "2kryOTIKT+l/K4w3QIDAQAB"
)
RFC8463_MESSAGE = (
    b"From: Joe SixPack <joe@football.example.com>\r\n"
    b"To: Suzie Q <suzie@shopping.example.net>\r\n"
    b"Subject: Is dinner ready?\r\n"
    b"Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n"
    b"Message-ID: <20030712040037.46341.5F8J@football.example.com>\r\n"
    b"\r\n"
    b"Hi.\r\n"
    b"\r\n"
    b"We lost the game.  Are you hungry yet?\r\n"
    b"\r\n"
    b"Joe.\r\n"
)
RFC8463_BH = "2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8="
RFC8463_ED_SIG = (
    b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;\r\n"
    b" d=football.example.com; i=@football.example.com;\r\n"
    b" q=dns/txt; s=brisbane; t=1528637909; h=from : to :\r\n"
    b" subject : date : message-id : from : subject : date;\r\n"
    b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
    b" b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus\r\n"
    b" Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==\r\n"
)
RFC8463_RSA_SIG = (
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;\r\n"
    b" d=football.example.com; i=@football.example.com;\r\n"
    b" q=dns/txt; s=test; t=1528637909; h=from : to : subject :\r\n"
    b" date : message-id : from : subject : date;\r\n"
    b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
    b" b=F45dVWDfMbQDGHJFlXUNB2HKfbCeLRyhDXgFpEL8GwpsRe0IeIixNTe3\r\n"
    b" DhCVlUrSjV4BwcVcOF6+FF3Zo9Rpo1tFOeS9mPYQTnGdaSGsgeefOsk2Jz\r\n"
    b" dA+L10TeYt9BgDfQNZtKdN1WO//KgIqXP7OdEFE4LjFYNcUxZQ4FADY+8=\r\n"
)
RFC8463_H = ["from", "to", "subject", "date", "message-id", "from", "subject", "date"]


def rfc8463_dns(name: bytes, timeout: int = 5) -> bytes | None:
    return {
        b"brisbane._domainkey.football.example.com.": f"v=DKIM1; k=ed25519; p={RFC8463_ED_PUBLIC}".encode(),
        b"test._domainkey.football.example.com.": f"v=DKIM1; k=rsa; p={RFC8463_RSA_PUBLIC}".encode(),
    }.get(name)


def rfc8463_key() -> DkimKey:
    seed = base64.b64decode(RFC8463_SEED)
    return DkimKey("football.example.com", "brisbane", ed25519.Ed25519PrivateKey.from_private_bytes(seed))


def rfc8463_signing_input(sig_field: bytes) -> bytes:
    """RFC 6376 §3.7 for the RFC's own field: the selected headers, then the field with b= emptied."""
    fields, _ = dkim._split(RFC8463_MESSAGE)
    names, block = dkim._select(fields, ["From", "To", "Subject", "Date", "Message-ID"], ["From", "Subject", "Date"])
    assert sorted(n.decode() for n in names) == sorted(RFC8463_H)
    unsigned = re.sub(rb"(\sb=)[^;]*$", rb"\1", sig_field.rstrip(b"\r\n"), flags=re.S)
    return block + dkim.canonicalize_header(unsigned)[:-2]


def test_rfc8463_body_hash() -> None:
    _, body = RFC8463_MESSAGE.split(b"\r\n\r\n", 1)
    assert base64.b64encode(dkim.body_hash(body)).decode() == RFC8463_BH


def test_rfc8463_key_and_record() -> None:
    key = rfc8463_key()
    assert key.algorithm == "ed25519-sha256"
    assert key.dns_txt() == f"v=DKIM1; k=ed25519; p={RFC8463_ED_PUBLIC}"
    assert DkimKey.from_pem(key.domain, key.selector, key.private_pem()).dns_txt() == key.dns_txt()


def test_rfc8463_ed25519_signature_reproduced() -> None:
    """Ed25519 is deterministic: our canonical signing input, signed with the RFC key, is the RFC's b=."""
    data = rfc8463_signing_input(RFC8463_ED_SIG)
    private = rfc8463_key().private_key
    assert isinstance(private, ed25519.Ed25519PrivateKey)
    sig = private.sign(hashlib.sha256(data).digest())
    expected = "/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11BusFa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw=="
    assert base64.b64encode(sig).decode() == expected


def test_rfc8463_rsa_signature_checks_over_our_canonical_input() -> None:
    public = serialization.load_der_public_key(base64.b64decode(RFC8463_RSA_PUBLIC))
    assert isinstance(public, rsa.RSAPublicKey)
    b = re.search(rb"\sb=(.*)$", RFC8463_RSA_SIG, re.S)
    assert b is not None
    signature = base64.b64decode(re.sub(rb"\s", b"", b.group(1)))
    public.verify(signature, rfc8463_signing_input(RFC8463_RSA_SIG), padding.PKCS1v15(), hashes.SHA256())


def test_rfc8463_signed_message_verifies_with_dkimpy() -> None:
    """Checks the transcription of the vectors above (and the verifier) against the RFC's own signatures."""
    need_nacl()
    d = dkimpy.DKIM(RFC8463_ED_SIG + RFC8463_RSA_SIG + RFC8463_MESSAGE)
    assert d.verify(idx=0, dnsfunc=rfc8463_dns)
    assert d.verify(idx=1, dnsfunc=rfc8463_dns)


def test_rfc8463_message_signed_by_us() -> None:
    need_nacl()
    signed = dkim.sign(RFC8463_MESSAGE, [rfc8463_key()], timestamp=1528637909)
    t = tags(signed)
    assert (t["a"], t["d"], t["s"], t["t"], t["bh"]) == (
        "ed25519-sha256",
        "football.example.com",
        "brisbane",
        "1528637909",
        RFC8463_BH,
    )
    assert dkimpy.verify(signed, dnsfunc=rfc8463_dns)


def test_rfc6376_canonicalization_example() -> None:
    """RFC 6376 §3.4.6."""
    message = b"A: X\r\nB : Y\t\r\n\tZ  \r\n\r\n C \r\nD \t E\r\n\r\n\r\n"
    fields, body = dkim._split(message)
    assert [dkim.canonicalize_header(f) for f in fields] == [b"a:X\r\n", b"b:Y Z\r\n"]
    # (selection is by the exact name before the colon, as verifiers do it: "B :" is written "B:" here)
    _, block = dkim._select([b"From:  f ", fields[0], fields[1].replace(b" :", b":")], ["from", "a", "b"], [])
    assert block == b"from:f\r\na:X\r\nb:Y Z\r\n"
    assert dkim.canonicalize_body(body) == b" C\r\nD E\r\n"


@pytest.mark.parametrize(
    ("body", "canonical"),
    [
        (b"", b""),
        (b"\r\n", b""),
        (b"\r\n\r\n \t\r\n", b""),
        (b"x", b"x\r\n"),
        (b"x \t ", b"x\r\n"),
        (b"x\r\n\r\n\r\n", b"x\r\n"),
        (b"a  b\t\tc \t\r\n", b"a b c\r\n"),
        (b"  lead\r\n", b" lead\r\n"),
        (b"x\r\r\n", b"x\r\r\n"),
        (b"x\r\n" + b"\r\n" * 1000, b"x\r\n"),
        (b"x\r\n" + b"\r\n" * 600 + b"\r", b"x\r\n" + b"\r\n" * 600 + b"\r\r\n"),
        (b"bare\nlf \n", b"bare\nlf \n\r\n"),
        ("8-bit  ü\r\n".encode(), "8-bit ü\r\n".encode()),
    ],
)
def test_canonicalize_body(body: bytes, canonical: bytes) -> None:
    assert dkim.canonicalize_body(body) == canonical


@given(st.lists(st.sampled_from([b"a", b"\xc3\xbc", b" ", b"\t", b"\r\n", b"\r", b"\n", b"  \r\n"]), max_size=40))
def test_canonicalize_body_matches_dkimpy(pieces: list[bytes]) -> None:
    body = b"".join(pieces)
    transmitted = body if not body or body.endswith(b"\r\n") else body + b"\r\n"  # as SMTP sends it
    assert dkim.canonicalize_body(body) == Relaxed.canonicalize_body(transmitted)


@given(st.lists(st.sampled_from([b"a", b"\xc3\xbc", b":", b" ", b"\t", b"\r\n ", b"\r\n\t"]), max_size=30))
def test_canonicalize_header_matches_dkimpy(pieces: list[bytes]) -> None:
    value = b"".join(pieces)
    [(name, canonical)] = Relaxed.canonicalize_headers([(b"Subject", value)])
    assert dkim.canonicalize_header(b"Subject:" + value) == name + b":" + canonical
    fields = [b"From: a@example.com", b"Subject:" + value]
    assert dkim._select(fields, ["From", "Subject"], [])[1] == b"from:a@example.com\r\n" + name + b":" + canonical


# --- sign, then verify with dkimpy --------------------------------------------------------------


@pytest.mark.parametrize("message", list(MESSAGES.values()), ids=list(MESSAGES))
def test_both_signatures_verify_with_dkimpy(message: bytes, keys: list[DkimKey]) -> None:
    need_nacl()
    signed = dkim.sign(message, keys)
    assert signed.endswith(message)
    assert verify_all(signed, keys) == [True, True]
    a, b = tags(signed, 0), tags(signed, 1)
    assert (a["a"], b["a"]) == ("rsa-sha256", "ed25519-sha256")
    assert a["bh"] == b["bh"] and a["h"] == b["h"] and a["t"] == b["t"]


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
@pytest.mark.parametrize(
    "message", [PLAIN, MULTIPART, NO_FINAL_CRLF, EMPTY_BODY], ids=["plain", "mime", "no-crlf", "empty"]
)
def test_single_key_verifies_with_dkimpy(message: bytes, algorithm: str, rsa_key: DkimKey, ed_key: DkimKey) -> None:
    key = rsa_key if algorithm == "rsa" else ed_key
    if algorithm == "ed25519":
        need_nacl()
    assert dkimpy.verify(dkim.sign(message, [key]), dnsfunc=dnsfunc_for(key))


def test_order_follows_keys(keys: list[DkimKey]) -> None:
    need_nacl()
    signed = dkim.sign(PLAIN, keys[::-1])
    assert [tags(signed, i)["a"] for i in (0, 1)] == ["ed25519-sha256", "rsa-sha256"]
    assert verify_all(signed, keys[::-1]) == [True, True]


def test_signature_fields_prepend_to_sign(rsa_key: DkimKey) -> None:
    fields = dkim.signature_fields(PLAIN, [rsa_key], timestamp=1_700_000_000)
    assert fields.startswith(b"DKIM-Signature: ") and fields.endswith(b"\r\n")
    assert dkim.sign(PLAIN, [rsa_key], timestamp=1_700_000_000) == fields + PLAIN  # RSA PKCS#1 v1.5 is deterministic


def test_signed_headers_and_oversigning(keys: list[DkimKey]) -> None:
    message = b"To: second@example.net\r\n" + MULTIPART
    t = tags(dkim.sign(message, keys))
    assert t["h"].split(":") == [
        "from",
        "from",
        "to",
        "to",
        "to",
        "subject",
        "subject",
        "date",
        "date",
        "message-id",
        "mime-version",
        "content-type",
        "list-id",
        "list-unsubscribe",
        "list-unsubscribe",  # oversigned: a copy added on top of a one-click field breaks the signature
        "list-unsubscribe-post",  # absent: listed once, so none can be added
    ]
    assert (t["v"], t["c"], t["d"], t["s"]) == ("1", "relaxed/relaxed", DOMAIN, "rsa2048")
    # Absent To/Subject/Date are listed once (nulled); absent Cc etc. are not listed at all.
    t = tags(dkim.sign(b"From: a@example.com\r\n\r\nx\r\n", keys))
    assert t["h"] == "from:from:to:subject:date:list-unsubscribe:list-unsubscribe-post"


def test_space_before_colon_is_not_the_field(keys: list[DkimKey]) -> None:
    """OpenDKIM and dkimpy know a field by the exact name before the colon; so does the signer."""
    signed = dkim.sign(b"From: a@example.com\r\nSubject : s\r\n\r\nx\r\n", keys)
    assert tags(signed)["h"] == "from:from:to:subject:date:list-unsubscribe:list-unsubscribe-post"
    with pytest.raises(DkimError, match="no From header"):
        dkim.sign(b"From : a@example.com\r\n\r\nx\r\n", keys)


def test_custom_headers(rsa_key: DkimKey) -> None:
    message = b"X-Tag: one\r\nX-Tag: two\r\n" + PLAIN
    signed = dkim.sign(message, [rsa_key], headers=["From", "X-Tag", "X-*"], oversign=["from"])
    assert tags(signed)["h"] == "from:from:x-tag:x-tag"
    assert verify_all(signed, [rsa_key]) == [True]
    swapped = signed.replace(b"X-Tag: one\r\nX-Tag: two", b"X-Tag: two\r\nX-Tag: one")
    assert verify_all(swapped, [rsa_key]) == [False]


def test_timestamps(rsa_key: DkimKey) -> None:
    t = tags(dkim.sign(PLAIN, [rsa_key], timestamp=1_700_000_000, expire_after=3600))
    assert (t["t"], t["x"]) == ("1700000000", "1700003600")
    t = tags(dkim.sign(PLAIN, [rsa_key]))
    assert "x" not in t and abs(int(t["t"]) - __import__("time").time()) < 60
    with pytest.raises(ValueError, match="expire_after"):
        dkim.sign(PLAIN, [rsa_key], expire_after=0)


def test_field_folding(keys: list[DkimKey]) -> None:
    signed = dkim.sign(LONG_FOLDED, keys, expire_after=86400)
    block = signed[: signed.index(b"Received:")]
    lines = block.split(b"\r\n")[:-1]
    assert lines[0].startswith(b"DKIM-Signature: ")
    assert all(len(line) <= 78 for line in lines), [line for line in lines if len(line) > 78]
    assert all(line.startswith((b"DKIM-Signature: ", b" ")) for line in lines)


# --- what must break the signature, and what must not ------------------------------------------


@pytest.mark.parametrize(
    "tamper",
    [
        lambda m: b"From: Mallory <ceo@example.com>\r\n" + m,
        lambda m: b"Subject: Urgent: wire money\r\n" + m,
        lambda m: b"Date: Sat, 12 Jul 2003 09:00:00 -0700\r\n" + m,
        lambda m: m.replace(b"Subject: Is dinner ready?", b"Subject: Is lunch ready?"),
        lambda m: m.replace(b"hungry", b"angry"),
        lambda m: m + b"P.S. click here\r\n",
    ],
    ids=["second-from", "second-subject", "second-date", "changed-subject", "changed-body", "appended"],
)
def test_tampering_breaks_both(tamper: Callable[[bytes], bytes], keys: list[DkimKey]) -> None:
    need_nacl()
    signed = dkim.sign(PLAIN, keys)
    assert verify_all(signed, keys) == [True, True]
    assert verify_all(tamper(signed), keys) == [False, False]


def test_added_to_breaks_when_absent(keys: list[DkimKey]) -> None:
    need_nacl()
    signed = dkim.sign(b"From: a@example.com\r\nSubject: s\r\n\r\nx\r\n", keys)
    assert verify_all(signed, keys) == [True, True]
    assert verify_all(b"To: victim@example.net\r\n" + signed, keys) == [False, False]


@pytest.mark.parametrize(
    "mangle",
    [
        lambda m: m.replace(b"Subject: Is dinner ready?", b"subject:   Is dinner\r\n\tready?  "),
        lambda m: m.replace(b"game.  Are", b"game.\t Are   "),
        lambda m: m + b"\r\n\r\n",
        lambda m: m.replace(b"Hi.\r\n", b"Hi.   \r\n"),
        lambda m: b"Received: by relay.example\r\n" + m,
        lambda m: m.replace(b"Message-ID: <", b"X-Unsigned: yes\r\nMessage-ID: <"),
    ],
    ids=["refolded-header", "body-whitespace", "trailing-blank-lines", "trailing-space", "received", "unsigned-header"],
)
def test_relaxed_changes_keep_both_valid(mangle: Callable[[bytes], bytes], keys: list[DkimKey]) -> None:
    need_nacl()
    assert verify_all(mangle(dkim.sign(PLAIN, keys)), keys) == [True, True]


def test_unterminated_last_line_signs_as_transmitted(keys: list[DkimKey]) -> None:
    """SMTP ends DATA with CRLF: a final line without one, even with trailing WSP, verifies once sent."""
    need_nacl()
    message = HEAD + b"\r\nHi.\r\nlast line with trailing space  \t"
    signed = dkim.sign(message, keys)
    assert verify_all(signed + b"\r\n", keys) == [True, True]


# --- OpenDKIM ------------------------------------------------------------------------------------


def opendkim_results(tmp_path: Path, signed: bytes, keys: list[DkimKey]) -> tuple[str, list[str]]:
    """Offline OpenDKIM verification: (its verdict line, the dkim= results of its Authentication-Results)."""
    opendkim = need("opendkim")
    keyfile = tmp_path / "keys"
    keyfile.write_text("".join(f"{k.dns_name} {k.dns_txt()}\n" for k in keys))
    conf = tmp_path / "opendkim.conf"
    conf.write_text(f"Mode v\nTestPublicKeys {keyfile}\nSyslog no\n")
    message = tmp_path / "message.eml"
    message.write_bytes(signed)
    proc = subprocess.run(
        [opendkim, "-x", str(conf), "-t", str(message), "-vvv"], capture_output=True, text=True, timeout=60
    )
    verdicts = re.findall(r"verification \(.*\) (?:succeeded|failed.*)", proc.stdout + proc.stderr)
    assert len(verdicts) == 1, proc.stdout + proc.stderr
    results = re.findall(r"dkim=(\w+).*?header\.a=([\w-]+)", proc.stdout)
    return verdicts[0], [f"{a}={r}" for r, a in results]


@pytest.mark.parametrize(
    "message",
    [PLAIN, MULTIPART, UTF8_HEADERS, LONG_FOLDED, EMPTY_BODY, TRAILING_WSP, NO_FINAL_CRLF + b"\r\n"],
    ids=["plain", "multipart", "utf8", "long-folded", "empty-body", "trailing-wsp", "crlf-added"],
)
def test_opendkim_verifies(tmp_path: Path, message: bytes, keys: list[DkimKey]) -> None:
    verdict, results = opendkim_results(tmp_path, dkim.sign(message, keys, expire_after=3600), keys)
    assert verdict.endswith("succeeded"), verdict
    assert results == ["rsa-sha256=pass", "ed25519-sha256=pass"]


def test_opendkim_rejects_tampering(tmp_path: Path, keys: list[DkimKey]) -> None:
    signed = b"From: Mallory <ceo@example.com>\r\n" + dkim.sign(PLAIN, keys)
    verdict, results = opendkim_results(tmp_path, signed, keys)
    assert "failed" in verdict
    assert results == ["rsa-sha256=fail", "ed25519-sha256=fail"]


# --- keys ----------------------------------------------------------------------------------------


def small_rsa_key(bits: int = 512) -> rsa.RSAPrivateKey:
    """An RSA key too short for DKIM (cryptography refuses to generate one, but loads it)."""
    rng = random.Random(bits)

    def probable_prime(nbits: int) -> int:
        while True:
            n = rng.getrandbits(nbits) | (1 << (nbits - 1)) | 1
            if all(pow(rng.randrange(2, n - 1), n - 1, n) == 1 for _ in range(20)):
                return n

    e = 65537
    while True:
        p, q = probable_prime(bits // 2), probable_prime(bits // 2)
        phi = (p - 1) * (q - 1)
        if p != q and phi % e:
            break
    d = pow(e, -1, phi)
    numbers = rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), rsa.RSAPublicNumbers(e, p * q))
    return numbers.private_key()


def test_from_pem_roundtrip(rsa_key: DkimKey, ed_key: DkimKey) -> None:
    for key in (rsa_key, ed_key):
        pem = key.private_pem()
        assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
        loaded = DkimKey.from_pem(key.domain, key.selector, pem)
        assert (loaded.algorithm, loaded.dns_txt()) == (key.algorithm, key.dns_txt())
    pkcs1 = rsa_key.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    assert DkimKey.from_pem(DOMAIN, "x", pkcs1).algorithm == "rsa-sha256"


def test_from_pem_refusals() -> None:
    weak = small_rsa_key().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ValueError, match="512 bits is too short"):
        DkimKey.from_pem(DOMAIN, "s", weak)
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ValueError, match="unsupported DKIM key type"):
        DkimKey.from_pem(DOMAIN, "s", ec_pem)
    encrypted = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    )
    with pytest.raises(ValueError, match="encrypted"):
        DkimKey.from_pem(DOMAIN, "s", encrypted)
    with pytest.raises(ValueError, match="not a readable PEM"):
        DkimKey.from_pem(DOMAIN, "s", b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match="too short"):
        DkimKey.generate_rsa(DOMAIN, "s", bits=768)


@pytest.mark.parametrize("domain", ["", "exa mple.com", "example.com.", "bücher.example", "-a.example", "a;b"])
def test_bad_domain_or_selector(domain: str, ed_key: DkimKey) -> None:
    with pytest.raises(ValueError, match="domain name"):
        DkimKey(domain, "s", ed_key.private_key)
    with pytest.raises(ValueError, match="selector"):
        DkimKey(DOMAIN, domain, ed_key.private_key)


def test_dns_records(rsa_key: DkimKey, ed_key: DkimKey) -> None:
    assert rsa_key.dns_name == "rsa2048._domainkey.example.com"
    txt = rsa_key.dns_txt()
    assert txt.startswith("v=DKIM1; k=rsa; p=")
    spki = serialization.load_der_public_key(base64.b64decode(txt.split("p=", 1)[1]))
    assert isinstance(spki, rsa.RSAPublicKey) and spki.key_size == 2048
    strings = rsa_key.dns_txt_strings()
    assert len(strings) == 2 and "".join(strings) == txt
    assert all(len(s.encode()) <= 255 for s in strings)

    txt = ed_key.dns_txt()
    assert txt.startswith("v=DKIM1; k=ed25519; p=")
    raw = base64.b64decode(txt.split("p=", 1)[1])
    assert raw == ed_key.private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert len(raw) == 32 and ed_key.dns_txt_strings() == [txt]


def test_repr_hides_the_private_key(rsa_key: DkimKey) -> None:
    assert "private_key" not in repr(rsa_key) and "rsa-sha256" in repr(rsa_key)
    with pytest.raises(AttributeError):
        rsa_key.domain = "other.example"  # type: ignore[misc]


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (b"To: a@example.net\r\nSubject: s\r\n\r\nbody\r\n", "no From header"),
        (b"From: a@example.com\r\nSubject: s\r\n", "no header/body separator"),
        (b"From: a@example.com\nSubject: s\n\nbody\n", "no header/body separator"),
        (b"\r\nFrom: a@example.com\r\n\r\nbody\r\n", "no header fields"),
        (b"", "no header/body separator"),
        (b"X-From: a@example.com\r\nResent-From: b@example.com\r\n\r\nx", "no From header"),
    ],
)
def test_unsignable_messages(message: bytes, match: str, keys: list[DkimKey]) -> None:
    with pytest.raises(DkimError, match=match):
        dkim.sign(message, keys)


def test_bad_arguments(rsa_key: DkimKey) -> None:
    with pytest.raises(ValueError, match="no DKIM keys"):
        dkim.sign(PLAIN, [])
    with pytest.raises(ValueError, match="must include From"):
        dkim.sign(PLAIN, [rsa_key], headers=["Subject"])
    with pytest.raises(ValueError, match="not a header field name"):
        dkim.sign(PLAIN, [rsa_key], headers=["From", "Bad Name"])
    with pytest.raises(TypeError):
        dkim.sign(PLAIN, [rsa_key], headers="From")
