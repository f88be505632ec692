"""One-click unsubscribe without sockets: the token opens only as it was made (any change, a cut,
another installation's key or garbage opens to nothing), the header fields and the tenant's
mailto: URIs, the header reader and remover intake uses for X-Cmcd-Stream and List-Unsubscribe,
what the endpoint takes as RFC 8058's body, how it masks an address, and the store's unsubscribe
(one suppression and one mail-log row, however often it is asked)."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from cmcd import crypto, unsubscribe
from cmcd.api.unsubscribe import mask, one_click
from cmcd.errors import NotFound
from cmcd.store import open_store
from cmcd.submit import headers
from cmcd.unsubscribe import Subscription, Tokens

KEYS = crypto.DataKeys(os.urandom(32), os.urandom(32))
ASCII = Subscription(7, "broadcast", "bob@example.net")
UTF8 = Subscription(12, "broadcast", "ユーザー.名前@例え.テスト")


@pytest.mark.parametrize("sub", [ASCII, UTF8, Subscription(1, "transactional", "x@y")], ids=["ascii", "utf8", "short"])
def test_a_token_opens_to_what_it_was_made_of(sub: Subscription) -> None:
    tokens = Tokens(KEYS)
    token = tokens.make(sub)
    assert token.isascii() and all(c.isalnum() or c in "-_" for c in token)  # URL-safe, no padding
    assert tokens.read(token) == sub
    assert Tokens(KEYS).read(token) == sub  # the key is derived, not random: another process opens it
    assert tokens.make(sub) != token  # a fresh nonce each time: two links never match
    assert sub.address not in token and sub.address.encode() not in base64.urlsafe_b64decode(token + "==")


def _flip(token: str, i: int) -> str:
    c = token[i]
    return token[:i] + ("A" if c != "A" else "B") + token[i + 1 :]


@pytest.mark.parametrize("where", [0, 1, 5, 13, 20, -17, -2, -1], ids=lambda w: f"at-{w}")
def test_a_token_with_one_character_changed_opens_to_nothing(where: int) -> None:
    tokens = Tokens(KEYS)
    token = tokens.make(ASCII)
    changed = _flip(token, where % len(token))
    assert changed != token
    assert tokens.read(changed) is None


@pytest.mark.parametrize("keep", [0, 1, 10, 29, -16, -1], ids=lambda k: f"keep-{k}")
def test_a_token_cut_short_opens_to_nothing(keep: int) -> None:
    tokens = Tokens(KEYS)
    token = tokens.make(UTF8)
    assert tokens.read(token[:keep]) is None


@pytest.mark.parametrize("n", range(40))
def test_only_the_spelling_make_gives_opens(n: int) -> None:
    """The decoder would skip a character outside the alphabet and the unused bits of the last
    character; neither kind of change opens (addresses of every length: every length of remainder)."""
    tokens = Tokens(KEYS)
    token = tokens.make(Subscription(3, "broadcast", "a" * n + "@x.test"))
    last = token[-1]
    spellings = {token[:-1] + c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"} - {token}
    assert all(tokens.read(t) is None for t in spellings), last
    for odd in (token[:10] + "!" + token[10:], token + "=", token + "==", token[:5] + "\n" + token[5:], " " + token):
        assert tokens.read(odd) is None, odd


def test_another_installations_token_opens_to_nothing() -> None:
    theirs = Tokens(crypto.DataKeys(os.urandom(32), os.urandom(32))).make(ASCII)
    assert Tokens(KEYS).read(theirs) is None


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "not a token",
        "!!!!",
        "トークン",
        "A" * 3000,
        base64.urlsafe_b64encode(b"\x01" + os.urandom(60)).decode().rstrip("="),  # right version, no tag of ours
        base64.urlsafe_b64encode(b"\x02" + os.urandom(60)).decode().rstrip("="),  # a format we never made
        "AQ",
    ],
    ids=["empty", "words", "punctuation", "non-ascii", "too-long", "random-v1", "random-v2", "version-only"],
)
def test_garbage_opens_to_nothing(garbage: str) -> None:
    assert Tokens(KEYS).read(garbage) is None


def test_the_header_fields_carry_our_link_then_the_tenants_mailtos_folded() -> None:
    link = unsubscribe.url("https://mail.example.com", "TOKEN")
    assert link == "https://mail.example.com/u/TOKEN"
    assert unsubscribe.header_fields(link, []) == (
        b"List-Unsubscribe: <https://mail.example.com/u/TOKEN>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    )
    assert unsubscribe.header_fields(link, ["mailto:leave@acme.test?subject=stop", "mailto:b@acme.test"]) == (
        b"List-Unsubscribe: <https://mail.example.com/u/TOKEN>,\r\n <mailto:leave@acme.test?subject=stop>,\r\n"
        b" <mailto:b@acme.test>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("<mailto:leave@acme.test?subject=stop>, <https://acme.test/out>", ["mailto:leave@acme.test?subject=stop"]),
        ("<https://acme.test/out>", []),
        ("< MAILTO:a@acme.test >,<mailto:b@acme.test>", ["MAILTO:a@acme.test", "mailto:b@acme.test"]),
        ("mailto:bare@acme.test", []),  # RFC 2369 wants angle brackets
        ("", []),
        # a second URI of the tenant's own smuggled inside a mailto: is no mailto: at all
        ("<mailto:x,<https://evil.example/u>", []),
        ('<mailto:"a b"@acme.test>', []),
        ("<mailto:j\u00f6rg@acme.test>", []),  # RFC 6068: percent-encoded, never raw UTF-8
        (
            "<mailto:a@acme.test>, <mailto:b@acme.test>, <mailto:c@acme.test>",
            ["mailto:a@acme.test", "mailto:b@acme.test"],
        ),
    ],
    ids=[
        "mailto-and-https",
        "https-only",
        "spaced-and-cased",
        "no-brackets",
        "empty",
        "smuggled-uri",
        "quoted",
        "raw-utf8",
        "at-most-two",
    ],
)
def test_the_tenants_own_mailto_uris_are_kept(value: str, expected: list[str]) -> None:
    assert unsubscribe.mailto_uris(value) == expected


@pytest.mark.parametrize(
    ("block", "stream", "list_unsubscribe", "fields"),
    [
        (b"From: a@acme.test\r\n", None, "", False),
        (b"X-Cmcd-Stream:  Broadcast \r\nFrom: a@acme.test\r\n", "broadcast", "", False),
        (b"x-cmcd-stream: bulk\r\nX-Cmcd-Stream: broadcast\r\n", "bulk", "", False),  # the first one counts
        (b"X-Cmcd-Stream:\r\n broadcast\r\n", "broadcast", "", False),  # folded
        (b"List-Unsubscribe: <mailto:a@acme.test>,\r\n\t<https://acme.test/x>\r\n", None,
         "<mailto:a@acme.test>, <https://acme.test/x>", True),
        (b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n", None, "", True),
    ],
    ids=["none", "stream", "first-stream-wins", "stream-folded", "list-unsubscribe-folded", "post-only"],
)  # fmt: skip
def test_parse_reads_the_stream_and_the_tenants_list_unsubscribe(
    block: bytes, stream: str | None, list_unsubscribe: str, fields: bool
) -> None:
    info = headers.parse(block + b"Subject: s\r\n\r\nbody\r\n")
    assert (info.stream, info.list_unsubscribe, info.unsubscribe_fields) == (stream, list_unsubscribe, fields)


NAMES = frozenset({"x-cmcd-stream", "list-unsubscribe", "list-unsubscribe-post"})


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"From: a@acme.test\r\nX-Cmcd-Stream: broadcast\r\nSubject: s\r\n\r\nX-Cmcd-Stream: body\r\n",
         b"From: a@acme.test\r\nSubject: s\r\n\r\nX-Cmcd-Stream: body\r\n"),
        (b"List-Unsubscribe: <mailto:a@acme.test>,\r\n <https://acme.test/x>\r\nFrom: a@acme.test\r\n"
         b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n\r\nbody",
         b"From: a@acme.test\r\n\r\nbody"),
        (b"From: a@acme.test\r\nSubject: folded\r\n\tstays\r\nx-cmcd-STREAM: broadcast\r\n\tgoes\r\n\r\n",
         b"From: a@acme.test\r\nSubject: folded\r\n\tstays\r\n\r\n"),
        (b"From: a@acme.test\r\nX-Cmcd-Stream: broadcast", b"From: a@acme.test"),  # last field, no CRLF, no body
        (b"From: a@acme.test\r\nX-Cmcd-Stream: broadcast\r\n", b"From: a@acme.test\r\n"),  # no blank line
        (b"X-Cmcd-Streams: kept\r\nX-Cmcd-Stream : goes\r\n\r\n", b"X-Cmcd-Streams: kept\r\n\r\n"),
    ],
    ids=["stream-not-body", "unsubscribe-fields-folded", "folds-go-with-their-field", "last-field-no-crlf",
         "no-blank-line", "only-that-name"],
)  # fmt: skip
def test_remove_takes_out_the_named_fields_and_nothing_else(body: bytes, expected: bytes) -> None:
    assert headers.remove(body, headers.parse(body), NAMES) == expected


@pytest.mark.parametrize(
    ("address", "shown"),
    [
        ("bob@example.net", "b***@example.net"),
        ("b@example.net", "b***@example.net"),
        ("ユーザー@例え.テスト", "ユ***@例え.テスト"),
        ('"a@b"@example.net', '"***@example.net'),
        ("nodomain", "n***"),
    ],
    ids=["ascii", "one-letter", "utf8", "quoted-at", "no-at"],
)
def test_mask_shows_one_character_and_the_domain(address: str, shown: str) -> None:
    assert mask(address) == shown


FORM = "application/x-www-form-urlencoded"
MULTI = "multipart/form-data"


def _multipart(*parts: tuple[str, bytes], boundary: str = "xYz") -> tuple[str, bytes]:
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value + b"\r\n"
        for name, value in parts
    )
    return f"{MULTI}; boundary={boundary}", body + f"--{boundary}--\r\n".encode()


@pytest.mark.parametrize(
    ("ctype", "header", "raw", "expected"),
    [
        (FORM, FORM, b"List-Unsubscribe=One-Click", True),
        (FORM, FORM, b"List-Unsubscribe=One-Click\r\n", True),
        (MULTI, *_multipart(("List-Unsubscribe", b"One-Click")), True),
        (FORM, FORM, b"", False),
        (FORM, FORM, b"List-Unsubscribe=Nope", False),
        (FORM, FORM, b"list-unsubscribe=one-click", False),
        (FORM, FORM, b"List-Unsubscribe=One-Click&more=1", False),
        (FORM, FORM, b"List-Unsubscribe=One-Click&List-Unsubscribe=One-Click", False),
        (FORM, FORM, b"List-Unsubscribe=One-Click\xff", False),
        (MULTI, *_multipart(("List-Unsubscribe", b"One-Click"), ("x", b"y")), False),
        (MULTI, *_multipart(("Other", b"One-Click")), False),
        (MULTI, f"{MULTI}; boundary=xYz", b"--xYz\r\nno end", False),
        (MULTI, MULTI, b"List-Unsubscribe=One-Click", False),  # no boundary
        ("text/plain", "text/plain", b"List-Unsubscribe=One-Click", None),
        ("application/json", "application/json", b'{"List-Unsubscribe": "One-Click"}', None),
    ],
    ids=["form", "form-trailing-crlf", "multipart", "empty", "other-value", "other-case", "extra-field",
         "twice", "not-ascii", "multipart-extra-part", "multipart-other-name", "multipart-unterminated",
         "multipart-no-boundary", "text-plain", "json"],
)  # fmt: skip
def test_only_rfc_8058s_body_is_a_one_click(ctype: str, header: str, raw: bytes, expected: bool | None) -> None:
    assert one_click(ctype, header, raw) is expected


def test_the_store_unsubscribes_once_with_one_mail_log_row(tmp_path: Path) -> None:
    store = open_store(tmp_path / "cmcd.db", tmp_path / "data.key")
    try:
        t = store.tenant_add("acme")
        assert store.unsubscribed(t.id, "Bob@Dst.test", "broadcast") == ("acme", False)
        assert store.unsubscribe(t.id, "Bob@Dst.test", "broadcast", "unsubscribed (one-click)", 1000.0) is True
        assert store.unsubscribe(t.id, "bob@dst.test", "broadcast", "again", 1001.0) is False
        assert store.unsubscribed(t.id, "bob@dst.test", "broadcast") == ("acme", True)
        assert store.unsubscribed(t.id, "bob@dst.test", "transactional") == ("acme", False)
        assert store.unsubscribed(t.id + 1, "bob@dst.test", "broadcast") is None
        assert [(e[0], e[2]) for e in store.suppression_index()] == [(t.id, "broadcast")]
        rows = store.log_page("mail", tenant_id=t.id)
        assert [(r["event"], r["status"], r["rcpt"], r["rcpt_domain"], r["queue_id"], r["response"]) for r in rows] == [
            ("unsubscribed", "unsubscribed", "Bob@Dst.test", "dst.test", "", "unsubscribed (one-click)")
        ]
        stream = store.conn.execute("SELECT stream, rcpt_hmac FROM mail_log").fetchall()
        assert stream == [("broadcast", store.keys.index("bob@dst.test"))]
        with pytest.raises(NotFound):
            store.unsubscribe(t.id + 1, "bob@dst.test", "broadcast", "r", 1002.0)
    finally:
        store.close()
