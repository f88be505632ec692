"""API message building: JSON in, RFC 5322 out, parsed back with the email package to check what a reader sees."""

from __future__ import annotations

import base64
import email
import email.policy
import re
import time
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.message import EmailMessage
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmcd.api.compose import Composed, ComposeError, compose_bulk, compose_one

NOW = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
MAX = 1_000_000


def req(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "from": "Acme <news@acme.test>",
        "to": ["bob@example.test"],
        "subject": "Hi",
        "text": "hello",
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def one(**over: Any) -> Composed:
    return compose_one(req(**over), max_size=MAX, now=NOW)


def parse(body: bytes) -> EmailMessage:
    msg = email.message_from_bytes(body, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert not msg.defects
    return msg


def text_of(part: Any) -> str:
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def display_name(body: bytes, header: str) -> str:
    """The display name as an RFC 2047 reader sees it. Python 3.11's parser keeps the space between adjacent
    encoded-words in a phrase (RFC 2047 6.2 drops it), so such phrases are decoded with the legacy API."""
    parsed = parse(body)[header].addresses[0].display_name
    found = re.search(rb"\r\n" + header.encode() + rb":[ \t]*(.*?)\r\n(?![ \t])", b"\r\n" + body, re.S)
    assert found is not None
    phrase = found.group(1).replace(b"\r\n", b"").decode("ascii").rpartition("<")[0].strip()
    if "=?" in phrase and '"' not in phrase:
        return str(make_header(decode_header(phrase)))
    assert isinstance(parsed, str)
    return parsed


def error(fn: Any, *args: Any, **kwargs: Any) -> ComposeError:
    with pytest.raises(ComposeError) as info:
        fn(*args, **kwargs)
    return info.value


def assert_wire_clean(body: bytes) -> None:
    assert body.count(b"\n") == body.count(b"\r\n") == body.count(b"\r")
    assert max(len(line) for line in body.split(b"\r\n")) <= 998


# --- structure ---------------------------------------------------------------------------------------------------


def test_text_only() -> None:
    c = one()
    msg = parse(c.body)
    assert c.mail_from == "news@acme.test"
    assert c.rcpts == ["bob@example.test"]
    assert c.tags == ()
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content_charset() == "utf-8"
    assert msg["Content-Transfer-Encoding"] == "7bit"
    assert text_of(msg) == "hello\n"
    assert msg["From"] == "Acme <news@acme.test>"
    assert msg["To"] == "bob@example.test"
    assert msg["Date"] == "Tue, 02 Jan 2024 03:04:05 +0000"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Message-ID"].startswith("<") and msg["Message-ID"].endswith("@acme.test>")
    assert_wire_clean(c.body)


def test_html_only() -> None:
    msg = parse(one(text=None, html="<p>caf\u00e9</p>").body)
    assert msg.get_content_type() == "text/html"
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert text_of(msg) == "<p>caf\u00e9</p>\n"


def test_text_and_html_make_multipart_alternative() -> None:
    msg = parse(one(text="plain", html="<b>rich</b>").body)
    assert msg.get_content_type() == "multipart/alternative"
    plain, rich = msg.iter_parts()
    assert (plain.get_content_type(), text_of(plain)) == ("text/plain", "plain\n")
    assert (rich.get_content_type(), text_of(rich)) == ("text/html", "<b>rich</b>\n")


def test_attachments_make_multipart_mixed() -> None:
    pdf, blob = b"%PDF-1.7\x00\xff" * 50, bytes(range(256))
    b64 = base64.b64encode(blob).decode()
    attachments = [
        {"filename": "r\u00e9sum\u00e9.pdf", "content": base64.b64encode(pdf).decode()},
        {"filename": "data.bin", "content": "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))},
        {"filename": "notes", "content": "", "content_type": "text/csv"},
    ]
    msg = parse(one(text="see attached", html="<p>see attached</p>", attachments=attachments).body)
    assert msg.get_content_type() == "multipart/mixed"
    body, *atts = msg.iter_parts()
    assert body.get_content_type() == "multipart/alternative"
    assert [(a.get_content_type(), a.get_filename(), a.get_payload(decode=True)) for a in atts] == [
        ("application/pdf", "r\u00e9sum\u00e9.pdf", pdf),
        ("application/octet-stream", "data.bin", blob),
        ("text/csv", "notes", b""),
    ]
    assert all(a.get_content_disposition() == "attachment" for a in atts)


@pytest.mark.parametrize(
    "name",
    [
        "Jos\u00e9 M\u00fcller",
        "\u5c71\u7530 \u592a\u90ce",
        'Ann "The Boss" Lee',
        "Doe, John",
        "J. R. Bob",
        "\u00e9" * 150,
    ],
    ids=["latin1", "cjk", "quotes", "comma", "dots", "long-non-ascii"],
)
def test_display_names_and_subject_round_trip(name: str) -> None:
    subject = f"Gr\u00fc\u00dfe an {name} \U0001f600" + " lang" * 40
    c = one(
        **{"from": {"email": "news@acme.test", "name": name}, "to": [f"{name} <bob@example.test>"], "subject": subject}
    )
    msg = parse(c.body)
    assert display_name(c.body, "From") == name
    assert msg["From"].addresses[0].addr_spec == "news@acme.test"
    assert display_name(c.body, "To") == name
    assert msg["Subject"] == subject
    assert_wire_clean(c.body)


def test_quoted_display_name_string_form() -> None:
    msg = parse(one(to=['"Doe, \\"JD\\" John" <jd@example.test>']).body)
    assert msg["To"].addresses[0].display_name == 'Doe, "JD" John'


def test_bcc_goes_to_envelope_only_and_rcpts_are_deduplicated() -> None:
    c = one(
        to=["a@x.test", "B@X.test"],
        cc=["b@x.test", "c@x.test"],
        bcc=["hidden@y.test", "A@x.TEST", "hidden@Y.test"],
        reply_to="Help <help@acme.test>",
    )
    assert c.rcpts == ["a@x.test", "B@X.test", "c@x.test", "hidden@y.test"]
    msg = parse(c.body)
    assert "Bcc" not in msg
    assert b"hidden" not in c.body
    assert msg["Cc"] == "b@x.test, c@x.test"
    assert msg["Reply-To"] == "Help <help@acme.test>"


def test_custom_headers_kept_verbatim() -> None:
    unsub = "<https://acme.test/unsubscribe/" + "tok3n" * 40 + ">, <mailto:unsub@acme.test?subject=u>"
    headers = {
        "List-Unsubscribe": unsub,
        "list-unsubscribe-post": "List-Unsubscribe=One-Click",
        "X-Campaign-ID": "spring-2024",
        "X-Note": "gr\u00fc\u00df dich",
        "References": " ".join(f"<m{i}@acme.test>" for i in range(30)),
        "X-Encodedish": "=?utf-8?q?not_decoded?=",
    }
    c = one(headers=headers, tags=["news", "spring:2024"])
    msg = parse(c.body)
    assert msg["List-Unsubscribe"] == unsub  # not turned into an encoded-word
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg["X-Campaign-ID"] == "spring-2024"
    assert msg["X-Note"] == "gr\u00fc\u00df dich"
    assert msg["References"] == headers["References"]
    assert b"X-Encodedish: =?utf-8?q?not_decoded?=\r\n" in c.body
    assert c.tags == ("news", "spring:2024")
    assert_wire_clean(c.body)


# --- refusals ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "From",
        "To",
        "Subject",
        "DKIM-Signature",
        "Received",
        "Bcc",
        "Content-Type",
        "X-Foo\r\nBcc",
        "Return-Path",
        "Message-ID",
        "X-",
        "X-Foo Bar",
        "X-Cmcd-Queue-ID",
    ],
)
def test_forbidden_header_names_are_refused(name: str) -> None:
    e = error(compose_one, req(headers={name: "x"}), max_size=MAX)
    assert e.field.startswith("headers.")
    assert repr(name)[:30] in e.detail or "reserved" in e.detail


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"subject": "Hi\r\nBcc: victim@x.test"}, "subject"),
        ({"subject": "Hi\nthere"}, "subject"),
        ({"subject": "Hi\u2028there"}, "subject"),
        ({"subject": "x" * 999}, "subject"),
        ({"headers": {"X-Foo": "a\r\nBcc: victim@x.test"}}, "headers.X-Foo"),
        ({"headers": {"X-Foo": "a\rb"}}, "headers.X-Foo"),
        ({"headers": {"X-Foo": "a\x00b"}}, "headers.X-Foo"),
        ({"headers": {"X-Foo": "x" * 999}}, "headers.X-Foo"),
        ({"headers": {"List-Id": "caf\u00e9"}}, "headers.List-Id"),
        ({"headers": {"X-Foo": 3}}, "headers.X-Foo"),
        ({"headers": {"X-Foo": "a", "x-foo": "b"}}, "headers.x-foo"),
        ({"to": [f"u{i}@x.test" for i in range(11)]}, "to"),
        ({"cc": [f"u{i}@x.test" for i in range(11)]}, "cc"),
        ({"to": []}, "to"),
        ({"to": "bob@example.test"}, "to"),
        ({"to": None}, "to"),
        ({"from": None}, "from"),
        ({"subject": None}, "subject"),
        ({"text": None}, "text"),
        ({"text": 5}, "text"),
        ({"priority": "high"}, "priority"),
        ({"attachments": [{"filename": "a.txt", "content": "!!notbase64"}]}, "attachments[0].content"),
        ({"attachments": [{"filename": "a.txt", "content": "YWJ"}]}, "attachments[0].content"),
        ({"attachments": [{"filename": "a.txt", "content": "YW\u00e9J"}]}, "attachments[0].content"),
        ({"attachments": [{"filename": "../etc/passwd", "content": ""}]}, "attachments[0].filename"),
        ({"attachments": [{"filename": "a\\b", "content": ""}]}, "attachments[0].filename"),
        ({"attachments": [{"filename": "a\x00b", "content": ""}]}, "attachments[0].filename"),
        ({"attachments": [{"filename": "a", "content": "", "content_type": "text"}]}, "attachments[0].content_type"),
        (
            {"attachments": [{"filename": "a", "content": "", "content_type": "message/rfc822"}]},
            "attachments[0].content_type",
        ),
        ({"attachments": [{"filename": "a", "content": "", "size": 1}]}, "attachments[0].size"),
        ({"tags": ["ok", "no spaces"]}, "tags[1]"),
        ({"tags": [f"t{i}" for i in range(11)]}, "tags"),
        ({"reply_to": ["a@x.test"]}, "reply_to"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_requests_name_the_field(over: dict[str, Any], field: str) -> None:
    e = error(compose_one, req(**over), max_size=MAX)
    assert e.field == field, str(e)
    assert e.detail and len(e.detail) < 300
    assert str(e) == f"{field}: {e.detail}"


@pytest.mark.parametrize(
    ("address", "words"),
    [
        ("bob.example.test", "no '@'"),
        ("bob@[192.0.2.1]", "address literal"),
        ("bob smith@example.test", "spaces"),
        ("j\u00f6rg\u200b@example.test", "printable non-ASCII"),  # UTF-8 is taken (RFC 6532), not a format char
        ("bob@b\u00fc-.test", "domain"),  # an IDN without an A-label form
        ("a@b@example.test", "more than one"),
        ("bob@localhost", "domain"),
        ("bob@-x.test", "domain"),
        ("bob@192.0.2.1", "domain"),
        ("bob@example.test.", "domain"),
        (".bob@example.test", "local part"),
        ('"bob"@example.test', "local part"),
        ("bob\x00@example.test", "control"),
        ("Bob <bob@example.test", "neither"),
        ("Bob <>", "empty"),
        ("Bob\r\n <bob@example.test>", "control"),
        ({"email": "bob@example.test", "nmae": "Bob"}, "unknown key"),
        (42, "must be an address"),
    ],
)
def test_bad_addresses_are_refused(address: object, words: str) -> None:
    e = error(compose_one, req(to=["ok@example.test", "ok2@example.test", "ok3@example.test", address]), max_size=MAX)
    assert e.field.startswith("to[3]")
    assert words in e.detail


def test_huge_values_are_not_echoed() -> None:
    e = error(compose_one, req(headers={"X-" + "a" * 5000: "v"}), max_size=MAX)
    assert len(str(e)) < 400


def test_size_limit() -> None:
    small = compose_one(req(text="x" * 1000), max_size=5000)
    e = error(compose_one, req(text="x" * 1000), max_size=len(small.body) - 30)  # Message-IDs vary a little
    assert e.field == "size"
    content = base64.b64encode(b"\0" * 10_000).decode()
    assert error(compose_one, req(attachments=[{"filename": "z", "content": content}]), max_size=5000).field == "size"
    assert error(compose_one, req(text="x" * 6000), max_size=5000).field == "size"


def test_error_pickles_and_is_a_value_error() -> None:
    import pickle

    e = pickle.loads(pickle.dumps(ComposeError("to[3]", "bad")))
    assert isinstance(e, ComposeError) and issubclass(ComposeError, ValueError)
    assert (e.field, e.detail) == ("to[3]", "bad")


# --- the wire form, for any body ---------------------------------------------------------------------------------

bodies = st.lists(
    st.one_of(
        st.text(max_size=120),
        st.text(alphabet="ab =.\t", min_size=900, max_size=1500),
        st.text(alphabet=st.characters(min_codepoint=0x80, max_codepoint=0x2FFF), min_size=200, max_size=500),
    ),
    max_size=4,
).map("\n".join)


def normalized(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text if text.endswith("\n") else text + "\n"


@settings(max_examples=25, deadline=None)
@given(text=bodies, html=bodies)
def test_any_body_is_crlf_and_short_lined_and_decodes_back(text: str, html: str) -> None:
    c = one(text=text, html=html)
    assert_wire_clean(c.body)
    plain, rich = parse(c.body).iter_parts()
    assert text_of(plain) == normalized(text)
    assert text_of(rich) == normalized(html)
    [bulk] = compose_bulk(
        {"from": "news@acme.test", "subject": "s", "text": text, "html": html, "recipients": [{"to": "b@x.test"}]},
        max_size=MAX,
    )
    assert_wire_clean(bulk.body)
    plain, rich = parse(bulk.body).iter_parts()
    assert text_of(plain) == normalized(text)
    assert text_of(rich) == normalized(html)


subjects = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=300)


@settings(max_examples=30, deadline=None)
@given(subject=subjects, name=st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=60))
def test_any_subject_and_name_round_trip_in_both_paths(subject: str, name: str) -> None:
    to = {"email": "bob@example.test", "name": name}
    c = compose_one(req(subject=subject, to=[to]), max_size=MAX)
    [b] = compose_bulk(
        {"from": "news@acme.test", "subject": subject, "text": "t", "recipients": [{"to": to}]}, max_size=MAX
    )
    for body in (c.body, b.body):
        assert_wire_clean(body)
        msg = parse(body)
        assert " ".join(msg["Subject"].split()) == " ".join(subject.split())
        assert " ".join(display_name(body, "To").split()) == " ".join(name.split())
        assert msg["To"].addresses[0].addr_spec == "bob@example.test"


@pytest.mark.parametrize(
    "name", ["000" + "\u0800" * 14 + " : \u00a1", "Zoë  two  spaces", "=?not?encoded?=", ("日本語 " * 12).strip()]
)
def test_a_display_name_split_over_encoded_words_keeps_every_space(name: str) -> None:
    # found by the property above: the email package folded such a name between two encoded words
    # at a space, and a decoder drops white space there ("A : B" came back as "A: B")
    to = {"email": "bob@example.test", "name": name}
    c = compose_one(req(to=[to], cc=[to]), max_size=MAX)
    [b] = compose_bulk(
        {"from": "news@acme.test", "subject": "s", "text": "t", "recipients": [{"to": to}]}, max_size=MAX
    )
    for body in (c.body, b.body):
        assert_wire_clean(body)
        assert display_name(body, "To") == name


# --- mail merge --------------------------------------------------------------------------------------------------


def bulk(recipients: list[dict[str, Any]], **over: Any) -> list[Composed]:
    base: dict[str, Any] = {
        "from": "Acme <news@acme.test>",
        "subject": "Hello {{name}}",
        "text": "Dear {{ name }}, order {{order}}.",
        "html": "<p>Dear {{name}}, order {{  order }}.</p>",
        "recipients": recipients,
    }
    base.update(over)
    return compose_bulk({k: v for k, v in base.items() if v is not None}, max_size=MAX, now=NOW)


def test_merge_substitutes_escapes_html_and_keeps_text_literal() -> None:
    evil = '<script>&"'
    [c] = bulk(
        [{"to": "Bob <bob@example.test>", "merge": {"name": evil, "order": 42}}], headers={"X-Order": "o-{{order}}"}
    )
    msg = parse(c.body)
    plain, rich = msg.iter_parts()
    assert text_of(plain) == f"Dear {evil}, order 42.\n"
    assert text_of(rich) == "<p>Dear &lt;script&gt;&amp;&quot;, order 42.</p>\n"
    assert msg["Subject"] == f"Hello {evil}"
    assert msg["X-Order"] == "o-42"
    assert msg["To"] == "Bob <bob@example.test>"
    assert c.rcpts == ["bob@example.test"] and c.mail_from == "news@acme.test"


def test_merge_values_lose_line_breaks_in_headers_only() -> None:
    value = "Bob\r\nBcc: victim@x.test\n"
    [c] = bulk([{"to": "bob@example.test", "merge": {"name": value, "order": 1}}], headers={"X-N": "{{name}}"})
    msg = parse(c.body)
    assert msg["Subject"] == "Hello BobBcc: victim@x.test"
    assert msg["X-N"] == "BobBcc: victim@x.test"
    assert "Bcc" not in msg
    assert text_of(next(msg.iter_parts())) == "Dear Bob\nBcc: victim@x.test\n, order 1.\n"


def test_braces_that_are_not_placeholders_stay_literal() -> None:
    text = "a {b} }} {{ not-a-name }} {{0}} {{name}}{{name}} {{{name}}}"
    [c] = bulk([{"to": "b@x.test", "merge": {"name": "N", "0": "zero"}}], text=text, html=None, subject="s")
    assert text_of(parse(c.body)) == "a {b} }} {{ not-a-name }} zero NN {N}\n"


def test_missing_merge_value_names_recipient_and_field() -> None:
    e = error(
        bulk, [{"to": "a@x.test", "merge": {"name": "A", "order": 1}}, {"to": "b@x.test", "merge": {"name": "B"}}]
    )
    assert e.field == "recipients[1].merge.order"
    assert "{{order}}" in e.detail


@pytest.mark.parametrize(
    ("recipient", "field"),
    [
        ({"to": "a@x.test", "merge": {"name": True, "order": 1}}, "recipients[0].merge.name"),
        ({"to": "a@x.test", "merge": {"name": ["x"], "order": 1}}, "recipients[0].merge.name"),
        ({"to": "a@x.test", "merge": {"name": "x" * 10_001, "order": 1}}, "recipients[0].merge.name"),
        ({"to": "a@x.test", "merge": {"name": "x", "order": float("nan")}}, "recipients[0].merge.order"),
        ({"to": "a@x.test", "merge": {f"k{i}": "v" for i in range(51)}}, "recipients[0].merge"),
        ({"to": "a@x.test", "merge": {"bad key": "v"}}, "recipients[0].merge"),
        ({"to": "a@x.test", "cc": "b@x.test"}, "recipients[0].cc"),
        ({"merge": {"name": "x", "order": 1}}, "recipients[0].to"),
        ({"to": "no-at", "merge": {"name": "x", "order": 1}}, "recipients[0].to"),
        ({"to": "a@x.test", "merge": {"name": "x" * 995, "order": 1}}, "recipients[0].subject"),
    ],
)
def test_bad_recipients_name_their_index(recipient: dict[str, Any], field: str) -> None:
    assert error(bulk, [recipient]).field == field


def test_bulk_request_limits() -> None:
    assert error(bulk, []).field == "recipients"
    assert error(compose_bulk, {"from": "a@x.test", "subject": "s", "text": "t", "recipients": [{"to": "b@x.test"}] * 3}, max_recipients=2, max_size=MAX).field == "recipients"  # fmt: skip
    assert error(bulk, [{"to": "b@x.test"}], to=["c@x.test"]).field == "to"
    assert (
        error(bulk, [{"to": "b@x.test", "merge": {"name": "n", "order": 1}}], headers={"Bcc": "{{name}}"}).field
        == "headers.Bcc"
    )


def test_bulk_matches_compose_one() -> None:
    """The fast bulk assembler and the email package path give the same message to a reader."""
    att = [{"filename": "a.txt", "content": base64.b64encode(b"attached").decode()}]
    common: dict[str, Any] = {
        "from": {"email": "news@acme.test", "name": "Caf\u00e9 Acme"},
        "reply_to": "help@acme.test",
        "subject": "Gr\u00fc\u00dfe " + "word " * 30,
        "text": "line\n" + "long " * 300,
        "html": "<p>\u00e9</p>",
        "headers": {"X-Campaign": "c1", "List-Unsubscribe": "<https://acme.test/" + "u" * 120 + ">"},
        "attachments": att,
        "tags": ["t1"],
    }
    to = {"email": "bob@example.test", "name": "Bob \u00c9"}
    c = compose_one({**common, "to": [to]}, max_size=MAX, now=NOW)
    [b] = compose_bulk({**common, "recipients": [{"to": to}]}, max_size=MAX, now=NOW)
    assert (b.mail_from, b.rcpts, b.tags) == (c.mail_from, c.rcpts, c.tags)
    assert_wire_clean(b.body)

    def shape(body: bytes) -> list[Any]:
        msg = parse(body)
        headers = [(k, str(v)) for k, v in msg.items() if k != "Message-ID"]
        parts = []
        for part in msg.walk():
            content = part.get_content() if not part.is_multipart() else None
            if isinstance(content, str):
                content = content.replace("\r\n", "\n")
            ct = part.get_content_type()
            parts.append((ct, part.get("Content-Transfer-Encoding"), part.get_filename(), content))
        return [[h for h in headers if h[0] != "Content-Type"], parts]

    assert shape(b.body) == shape(c.body)


def test_one_thousand_recipients_get_one_message_each() -> None:
    text = ("Dear {{ name }}, your order {{order}} ships today. We hope you enjoy it. " * 14)[:1000]
    html = ("<p>Dear <b>{{name}}</b>, your order {{ order }} ships today.</p>\n" * 16)[:1000]
    recipients = [
        {"to": f"User {i} <user{i}@example.test>", "merge": {"name": f"User {i}", "order": i}} for i in range(1000)
    ]
    start = time.perf_counter()
    out = compose_bulk(
        {"from": "news@acme.test", "subject": "Order {{order}}", "text": text, "html": html, "recipients": recipients},
        max_size=MAX,
    )
    elapsed = time.perf_counter() - start
    print(f"compose_bulk: 1000 recipients, {len(text) + len(html)}-char template, {elapsed * 1000:.0f} ms")
    assert len(out) == 1000
    assert len({c.body.split(b"\r\nTo: ")[1].split(b"\r\n")[0] for c in out}) == 1000
    assert [c.rcpts for c in out[:2]] == [["user0@example.test"], ["user1@example.test"]]
    assert len({parse(c.body)["Message-ID"] for c in out[:50]}) == 50
    msg = parse(out[999].body)
    assert msg["Subject"] == "Order 999"
    assert "Dear User 999, your order 999" in text_of(next(msg.iter_parts()))
