"""Header block tables: where it ends, which headers exist, From: domains, and byte-exact insertion."""

from __future__ import annotations

import pytest

from cmcd.submit import headers

RECEIVED = b"Received: by mx.test;\r\n"
ADDED = b"Message-ID: <q@mx.test>\r\n"


@pytest.mark.parametrize(
    ("body", "from_values", "has_mid", "has_date", "header_end"),
    [
        (b"From: a@acme.test\r\nSubject: s\r\n\r\nbody\r\n", (" a@acme.test",), False, False, 31),
        (
            b"From: a@acme.test\r\nMessage-ID: <x@y>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nb",
            (" a@acme.test",),
            True,
            True,
            76,
        ),
        (b"FROM: a@acme.test\r\nMESSAGE-ID: <x@y>\r\nDATE: now\r\n\r\n", (" a@acme.test",), True, True, 49),
        (b"From : a@acme.test\r\nDate : now\r\n\r\n", (" a@acme.test",), False, True, 32),
        (b"X-Date: now\r\nResent-Message-ID: <x@y>\r\n\r\n", (), False, False, 39),
        (b"Subject: s\r\n\r\nFrom: a@acme.test\r\nMessage-ID: <x@y>\r\n", (), False, False, 12),
        (b"\r\nFrom: a@acme.test\r\n", (), False, False, 0),
        (b"\r\n\r\nbody", (), False, False, 0),
        (b"", (), False, False, 0),
        (b"From: a@acme.test\r\nSubject: s\r\n", (" a@acme.test",), False, False, 31),
        (b"From: a@acme.test", (" a@acme.test",), False, False, 17),
        (b"From: Alice\r\n <a@acme.test>\r\n\r\nx", (" Alice <a@acme.test>",), False, False, 29),
        (b"From: a@acme.test,\r\n\tb@beta.test\r\n\r\n", (" a@acme.test,\tb@beta.test",), False, False, 34),
        (b"From: a@acme.test\r\nFrom: b@beta.test\r\n\r\n", (" a@acme.test", " b@beta.test"), False, False, 38),
        (b"Date: Mon,\r\n 1 Jan 2024\r\n\r\n", (), False, True, 25),
        (b" continuation first\r\nFrom: a@acme.test\r\n\r\n", (" a@acme.test",), False, False, 40),
    ],
    ids=[
        "simple",
        "message-id-and-date",
        "uppercase-names",
        "space-before-colon",
        "lookalike-names",
        "headers-in-body-ignored",
        "starts-with-blank-line",
        "only-blank-lines",
        "empty",
        "no-blank-line",
        "no-final-crlf",
        "folded-from",
        "folded-mailbox-list",
        "two-from-headers",
        "folded-date",
        "leading-continuation-line",
    ],
)
def test_parse(body: bytes, from_values: tuple[str, ...], has_mid: bool, has_date: bool, header_end: int) -> None:
    info = headers.parse(body)
    assert (info.from_values, info.has_message_id, info.has_date, info.header_end) == (
        from_values,
        has_mid,
        has_date,
        header_end,
    )
    if has_mid:
        assert info.message_id == "<x@y>"
    if header_end:
        # header_end is where added headers go: right after the last header's CRLF
        assert body[:header_end].endswith(b"\r\n") or header_end == len(body)


@pytest.mark.parametrize(
    ("from_header", "domains"),
    [
        (b"From: a@acme.test", ["acme.test"]),
        (b"From: Alice <a@ACME.Test.>", ["acme.test"]),
        (b"From: a@acme.test, b@beta.test", ["acme.test", "beta.test"]),
        (b"From: Alice\r\n <a@acme.test>", ["acme.test"]),
        (b'From: "b@beta.test" <a@acme.test>', ["acme.test"]),
        (b"From: a@acme.test (b@beta.test)", ["acme.test"]),
        (b"From: a@acme.test\r\nFrom: b@beta.test", ["acme.test", "beta.test"]),
        (b"From: group: a@acme.test, b@beta.test;", ["acme.test", "beta.test"]),
        (b"From: nobody", [""]),
        (b"From: @acme.test", [""]),
        (b"From: undisclosed-recipients:;", [""]),
        (b"Subject: no from", []),
    ],
    ids=[
        "bare-address",
        "display-name-case-and-dot",
        "mailbox-list",
        "folded",
        "quoted-at-in-display-name",
        "comment",
        "two-headers",
        "group",
        "no-at",
        "no-local-part",
        "empty-group",
        "no-from",
    ],
)
def test_from_domains(from_header: bytes, domains: list[str]) -> None:
    info = headers.parse(from_header + b"\r\n\r\nbody\r\n")
    assert headers.from_domains(info) == domains


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"From: a@acme.test\r\n\r\nhi\r\n", RECEIVED + b"From: a@acme.test\r\n" + ADDED + b"\r\nhi\r\n"),
        (
            b"From: a@acme.test\r\nSubject: s\r\n\r\nl1\r\n\r\nl2\r\n",
            RECEIVED + b"From: a@acme.test\r\nSubject: s\r\n" + ADDED + b"\r\nl1\r\n\r\nl2\r\n",
        ),
        (b"\r\nhi\r\n", RECEIVED + ADDED + b"\r\nhi\r\n"),
        (b"", RECEIVED + ADDED),
        (b"From: a@acme.test\r\n", RECEIVED + b"From: a@acme.test\r\n" + ADDED),
        (b"From: a@acme.test", RECEIVED + b"From: a@acme.test\r\n" + ADDED),
        (b"From: Alice\r\n <a@acme.test>\r\n\r\nx", RECEIVED + b"From: Alice\r\n <a@acme.test>\r\n" + ADDED + b"\r\nx"),
    ],
    ids=[
        "simple",
        "blank-lines-in-body",
        "starts-with-blank-line",
        "empty",
        "no-blank-line",
        "no-final-crlf",
        "folded-last-header",
    ],
)
def test_insert(body: bytes, expected: bytes) -> None:
    assert headers.insert(body, headers.parse(body), RECEIVED, ADDED) == expected


@pytest.mark.parametrize(
    "body",
    [b"From: a@acme.test\r\n\r\nhi\r\n", b"\r\nhi\r\n", b"From: a@acme.test\r\n", b""],
    ids=["simple", "starts-with-blank-line", "no-blank-line", "empty"],
)
def test_insert_with_nothing_to_append_only_prepends(body: bytes) -> None:
    assert headers.insert(body, headers.parse(body), RECEIVED, b"") == RECEIVED + body


@pytest.mark.parametrize(
    "body",
    [b"From: a@acme.test\r\n\r\nhi\r\n", b"\r\nhi\r\n", b"From: a@acme.test\r\nSubject: s\r\n\r\n\r\n\r\n"],
    ids=["simple", "starts-with-blank-line", "trailing-blank-lines"],
)
def test_insert_never_changes_the_body_bytes(body: bytes) -> None:
    info = headers.parse(body)
    out = headers.insert(body, info, RECEIVED, ADDED)
    assert out.endswith(body[info.header_end :])
    assert headers.parse(out).has_message_id
