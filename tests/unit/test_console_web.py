"""The console's pure parts: the reader's language, CSRF tokens, where a redirect may go, and that
every text exists in both languages and every template names only texts that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from aiohttp import web

from cmcd.api.console import Console, i18n
from cmcd.api.console.web import csrf_token, safe_next

TEMPLATES = Path(i18n.__file__).parent / "templates"


@pytest.mark.parametrize(
    ("explicit", "header", "want"),
    [
        ("", "", "en"),
        ("", "ja", "ja"),
        ("", "ja-JP,ja;q=0.9,en-US;q=0.8", "ja"),
        ("", "en-US,en;q=0.9,ja;q=0.8", "en"),
        ("", "fr-FR,fr;q=0.9,ja;q=0.5", "ja"),
        ("", "fr", "en"),
        ("", "en;q=0.2, ja;q=0.8", "ja"),
        ("", "ja;q=0", "en"),
        ("", "ja;q=abc,en", "en"),
        ("en", "ja", "en"),
        ("ja", "en", "ja"),
        ("xx", "ja", "ja"),
    ],
    ids=[
        "nothing",
        "ja",
        "ja-first",
        "en-first",
        "first-of-ours",
        "none-of-ours",
        "by-q",
        "q-zero",
        "bad-q",
        "switch-en",
        "switch-ja",
        "unknown-switch",
    ],  # fmt: skip
)
def test_language(explicit: str, header: str, want: str) -> None:
    assert i18n.choose(explicit, header) == want


@pytest.mark.parametrize(
    ("target", "want"),
    [
        ("/mail?rcpt=a", "/mail?rcpt=a"),
        ("", "/"),
        (None, "/"),
        ("//evil.example/", "/"),
        ("https://evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("mail", "/"),
        ("/\r\nX-Evil: 1", "/"),
        ("/\t/evil.example", "/"),
        ("/mail?a b", "/"),
    ],
    ids=["local", "empty", "none", "scheme-relative", "absolute", "backslash", "relative", "crlf", "tab", "space"],
)
def test_redirects_stay_on_the_site(target: str | None, want: str) -> None:
    assert safe_next(target) == want


def test_csrf_token_is_bound_to_its_session() -> None:
    a, b = csrf_token("session-a"), csrf_token("session-b")
    assert a != b and a == csrf_token("session-a") and len(a) == 64 and "session-a" not in a


def _console() -> Console:
    console = Console(api=None)  # type: ignore[arg-type]  # routes only: no request is served
    console.add_routes(web.Application().router)
    return console


def test_every_text_is_in_both_languages() -> None:
    _console()  # every page module imported: their texts added
    en, ja = i18n._TEXT["en"], i18n._TEXT["ja"]
    assert sorted(set(en) - set(ja)) == []
    assert sorted(set(ja) - set(en)) == []
    for key in en:  # the same placeholders in both
        assert set(re.findall(r"{(\w+)}", en[key])) == set(re.findall(r"{(\w+)}", ja[key])), key


def test_templates_name_only_texts_that_exist() -> None:
    _console()
    for template in TEMPLATES.glob("*.html"):
        for key in re.findall(r"""\bt\(\s*["']([\w.]+)["']\s*[,)]""", template.read_text()):
            assert i18n.has(key), f"{template.name}: no text {key!r}"


def test_every_view_needs_a_role_except_sign_in() -> None:
    """Only the sign-in pages are open without a session; everything else names its role."""
    routes = _console().routes
    open_paths = {path for _, path, need in routes if need is None}
    assert open_paths == {"/login", "/login/code", "/enrol", "/enrol/confirm", "/logout", "/{tail:.*}"}
    assert all(need in ("read", "manage") for method, _, need in routes if need is not None)
    assert all(need == "manage" for method, path, need in routes if method == "POST" and need is not None
               and path not in ("/contact", "/account/password") and not path.startswith("/account"))  # fmt: skip
