"""A browser-less client of the console for tests: HTTPS with the test CA, a cookie jar, redirects
not followed (a test sees each 303), and the forms of a page read with html.parser (their CSRF
tokens included), so a test posts what a person's browser would."""

from __future__ import annotations

import html.parser
import http.cookiejar
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import pyotp


@dataclass
class Form:
    action: str
    method: str
    fields: dict[str, str] = field(default_factory=dict)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    text: str

    @property
    def location(self) -> str:
        return self.headers.get("Location", "")

    def forms(self) -> list[Form]:
        parser = _Forms()
        parser.feed(self.text)
        return parser.forms

    def form(self, action: str) -> Form:
        """The first form posting to ACTION."""
        for f in self.forms():
            if f.action == action:
                return f
        raise AssertionError(f"no form posting to {action!r} on the page:\n{self.text[:2000]}")


class _Forms(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[Form] = []
        self._select: str | None = None
        self._chosen: set[str] = set()  # selects whose value is set (by "selected", else by the first option)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append(Form(a.get("action", ""), a.get("method", "get").lower()))
        elif not self.forms:
            return
        elif tag == "input" and a.get("name"):
            if a.get("type") in ("checkbox", "radio") and "checked" not in a:
                return
            self.forms[-1].fields[a["name"]] = a.get("value", "on" if a.get("type") == "checkbox" else "")
        elif tag == "select" and a.get("name"):
            self._select = a["name"]
            self._chosen.discard(a["name"])
            self.forms[-1].fields.setdefault(a["name"], "")
        elif tag == "option" and self._select is not None:
            if "selected" in a or self._select not in self._chosen:
                self._chosen.add(self._select)
                self.forms[-1].fields[self._select] = a.get("value", "")
        elif tag == "textarea" and a.get("name"):
            self.forms[-1].fields[a["name"]] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "select":
            self._select = None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class ConsoleClient:
    """One browser: its own cookies."""

    def __init__(self, port: int, context: ssl.SSLContext, lang: str = "en") -> None:
        self.base = f"https://127.0.0.1:{port}"
        self.jar = http.cookiejar.CookieJar()
        self.lang = lang
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=context), urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect()
        )

    def request(self, method: str, path: str, data: dict[str, str] | None = None,
                headers: dict[str, str] | None = None) -> Reply:  # fmt: skip
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        req = urllib.request.Request(self.base + path, data=body, method=method)
        req.add_header("Accept-Language", self.lang)
        if body is not None:
            req.add_header("Content-Type", "application/x-www-form-urlencoded")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with self.opener.open(req, timeout=60) as resp:
                return Reply(resp.status, dict(resp.headers), resp.read().decode())
        except urllib.error.HTTPError as exc:
            return Reply(exc.code, dict(exc.headers), exc.read().decode())

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def post(self, path: str, data: dict[str, str]) -> Reply:
        return self.request("POST", path, data)

    def submit(self, page: Reply, action: str, **values: str) -> Reply:
        """Post the form of PAGE that posts to ACTION, with VALUES filled in (CSRF token as given)."""
        form = page.form(action)
        return self.post(action, form.fields | values)

    def sign_in(self, login: str, password: str, totp_secret: str | None = None, code: str | None = None) -> Reply:
        """Password, then CODE (else the current code of TOTP_SECRET) when the console asks for
        one; the reply that ends it."""
        got = self.submit(self.get("/login"), "/login", login=login, password=password)
        if got.status == 303 and got.location.startswith("/login/code"):
            assert totp_secret is not None or code is not None, "the console asks for a one-time code"
            code = code if code is not None else pyotp.TOTP(totp_secret or "").now()
            got = self.submit(self.get(got.location), "/login/code", code=code)
        return got

    def cookie(self, name: str) -> http.cookiejar.Cookie | None:
        return next((c for c in self.jar if c.name == name), None)
