"""redact_url / redact_urls: what of a URL a log may keep (issue 18 item 6)."""

from __future__ import annotations

import pytest

from cmcd.redact import redact_url, redact_urls


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://hooks.example/x", "https://hooks.example/x"),
        ("https://hooks.example:8443/a/b", "https://hooks.example:8443/a/b"),
        ("https://hooks.example/x?token=SECRET", "https://hooks.example/x?REDACTED"),
        ("https://user:pass@hooks.example/x?token=SECRET#frag", "https://REDACTED@hooks.example/x?REDACTED#REDACTED"),
        ("https://user@hooks.example", "https://REDACTED@hooks.example"),
        ("http://[::1]:9/p#only-fragment", "http://[::1]:9/p#REDACTED"),
        ("https://a@b@hooks.example/p?q", "https://REDACTED@hooks.example/p?REDACTED"),
        ("https://hooks.example?SECRET/x", "https://hooks.example?REDACTED"),
        ("hooks.example/x?SECRET", "hooks.example/x?REDACTED"),
        ("", ""),
    ],
    ids=["plain", "port-and-path", "query", "userinfo-query-fragment", "user-only", "ipv6-fragment",
         "two-at-signs", "query-before-path", "no-scheme", "empty"],
)  # fmt: skip
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_urls_in_free_text() -> None:
    text = "'https://u:pass@h.example/x?token=SECRET': must not carry a user name; see http://h2.example/?k=v."
    out = redact_urls(text)
    assert "SECRET" not in out and "pass" not in out and "k=v" not in out
    assert "https://REDACTED@h.example/x?REDACTED" in out and "http://h2.example/?REDACTED" in out
    assert redact_urls("no url here: a@b.example") == "no url here: a@b.example"
