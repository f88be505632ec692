"""The tenant console over real HTTPS on loopback, driven as a browser would drive it (forms, cookies,
CSRF tokens, redirects) by tests/console_client.py: sign-in with password and TOTP, enrolment,
sign-out, the security headers, forged forms, and that a tenant sees only its own data."""

from __future__ import annotations

import itertools
import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyotp
import pytest

from tests.conftest import Cmcd, wait_until
from tests.console_client import ConsoleClient, Reply

_names = itertools.count(1)


@dataclass
class Person:
    tenant: str
    login: str
    password: str
    totp: str | None = None  # base32 secret
    recovery: list[str] = field(default_factory=list)  # recovery codes not used yet
    last_step: int = 0  # the TOTP step of the last code used to sign in (a code works once)


@dataclass
class World:
    d: Cmcd
    acme_admin: Person
    beta_admin: Person

    def browser(self, lang: str = "en") -> ConsoleClient:
        return ConsoleClient(self.d.api_port, self.d.client_context(), lang)

    def person(self, tenant: str, role: str, *, totp: bool | None = None) -> Person:
        """A new user of TENANT with ROLE, with TOTP set up when TOTP says so (default: an admin's,
        who signs in to the console only with it)."""
        login = f"{tenant}-{role}{next(_names)}"
        password = f"{login} long secret"
        self.d.admin("user.add", tenant=tenant, login=login, role=role, password=password)
        secret = None
        if totp or (totp is None and role == "admin"):
            secret = self.d.admin("user.otp-enroll", tenant=tenant, login=login)["secret"]
            code = pyotp.TOTP(secret).at(time.time() - 30)
            recovery = self.d.admin("user.otp-confirm", tenant=tenant, login=login, code=code)["recovery_codes"]
            return Person(tenant, login, password, secret, list(recovery))
        return Person(tenant, login, password, secret)

    def signed_in(self, who: Person, lang: str = "en") -> ConsoleClient:
        """A browser signed in as WHO: with the current one-time code, or, when it was used
        already (a code works once), with one of WHO's recovery codes."""
        b = self.browser(lang)
        code = None
        if who.totp is not None:
            step = int(time.time() // 30)
            if step <= who.last_step:
                code = who.recovery.pop()
            else:
                who.last_step, code = step, pyotp.TOTP(who.totp).at(step * 30)
        got = b.sign_in(who.login, who.password, who.totp, code)
        assert got.status == 303 and got.location == "/", (got.status, got.text[:500])
        return b


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, ca: Any) -> Iterator[World]:
    d = Cmcd(tmp_path_factory.mktemp("console"), ca, {"api": {"listen": "127.0.0.1:0"}})
    d.start().provision()
    w = World(d, Person("acme", "", ""), Person("beta", "", ""))
    w.acme_admin = w.person("acme", "admin", totp=True)
    w.beta_admin = w.person("beta", "admin", totp=True)
    yield w
    d.stop()


def _text(reply: Reply) -> str:
    """The page's text without tags, for asserting on what a person reads."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", reply.text))


# -- sign-in ------------------------------------------------------------------------------------


def test_sign_in_with_password_and_totp_then_sign_out(world: World) -> None:
    admin = world.person("acme", "admin", totp=True)
    b = world.browser()
    first = b.get("/")
    assert first.status == 303 and first.location.startswith("/login?")
    login_page = b.get("/login")
    assert login_page.status == 200 and 'autocomplete="current-password"' in login_page.text
    got = b.submit(login_page, "/login", login=admin.login, password=admin.password)
    assert got.status == 303 and got.location.startswith("/login/code")
    pending = b.cookie("__Host-cmcd_session")
    assert pending is not None and pending.secure
    assert b.get("/").location == "/login/code"  # no page before the code
    code_page = b.get(got.location)
    done = b.submit(code_page, "/login/code", code=pyotp.TOTP(admin.totp or "").now())
    assert done.status == 303 and done.location == "/"
    session = b.cookie("__Host-cmcd_session")
    assert session is not None and session.value != pending.value  # a new id once signed in
    set_cookie = done.headers.get("Set-Cookie", "")
    assert "Secure" in set_cookie and "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
    wait_until(
        lambda: any(r["login"] == admin.login and r["mechanism"] == "CONSOLE" and r["result"] == "ok"
                    for r in world.d.login_log()),
        "the console sign-in in the login log",
    )  # fmt: skip
    home = b.get("/")
    assert home.status == 200
    out = b.submit(home, "/logout")
    assert out.status == 303 and out.location.startswith("/login")
    assert b.get("/").status == 303  # the session ended in the store, not only in the browser
    reused = world.browser()
    reused.jar.set_cookie(session)
    assert reused.get("/").status == 303


def test_wrong_password_and_wrong_code_fail_alike_and_are_logged(world: World) -> None:
    b = world.browser()
    bad = b.submit(b.get("/login"), "/login", login=world.acme_admin.login, password="not the password")
    assert bad.status == 401 and "Sign-in failed" in _text(bad)
    unknown = b.submit(b.get("/login"), "/login", login="nobody-here", password="whatever it is")
    assert unknown.status == 401 and _text(unknown) == _text(bad)
    got = b.submit(b.get("/login"), "/login", login=world.acme_admin.login, password=world.acme_admin.password)
    wrong = b.submit(b.get(got.location), "/login/code", code="000000")
    assert wrong.status == 401


def test_a_sender_cannot_sign_in(world: World) -> None:
    b = world.browser()
    got = b.submit(b.get("/login"), "/login", login="alice", password="correct horse battery")
    assert got.status == 401 and b.cookie("__Host-cmcd_session") is None


def test_a_viewer_without_totp_signs_in_and_reads_only(world: World) -> None:
    viewer = world.person("acme", "viewer")
    b = world.signed_in(viewer)
    assert b.get("/").status == 200


def test_required_otp_takes_the_user_to_enrolment_first(world: World) -> None:
    admin = world.person("acme", "viewer")
    world.d.admin("tenant.set", name="acme", console_otp=True)
    try:
        b = world.browser()
        got = b.submit(b.get("/login"), "/login", login=admin.login, password=admin.password)
        assert got.status == 303 and got.location == "/enrol"
        assert b.get("/").location == "/enrol"  # nothing else before enrolment
        start = b.get("/enrol")
        shown = b.submit(start, "/enrol")
        assert shown.status == 303
        page = b.get("/enrol")
        secret = re.search(r'<code id="otp-secret">([A-Z2-7]+)</code>', page.text)
        assert secret is not None and "data:image/svg+xml;base64," in page.text
        bad = b.submit(page, "/enrol/confirm", code="000000")
        assert bad.status == 400
        codes = b.submit(bad, "/enrol/confirm", code=pyotp.TOTP(secret.group(1)).now())
        assert codes.status == 200 and len(re.findall(r"<li><code>", codes.text)) >= 8
        assert b.get("/").status == 200
    finally:
        world.d.admin("tenant.set", name="acme", console_otp=False)


# -- the front door -------------------------------------------------------------------------------


def test_every_page_has_the_security_headers(world: World) -> None:
    b = world.signed_in(world.person("acme", "viewer"))
    for path in ("/login", "/"):
        got = b.get(path)
        csp = got.headers["Content-Security-Policy"]
        assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
        assert got.headers["X-Frame-Options"] == "DENY" and got.headers["X-Content-Type-Options"] == "nosniff"
        assert got.headers["Cache-Control"] == "no-store"
        assert "<script>" not in got.text and " style=" not in got.text and " on" + "click=" not in got.text


def test_a_forged_form_changes_nothing(world: World) -> None:
    b = world.signed_in(world.person("acme", "admin"))
    home = b.get("/")
    no_token = b.post("/logout", {})
    assert no_token.status == 403
    other = world.signed_in(world.person("beta", "admin"))
    foreign = b.post("/logout", {"csrf": other.get("/").form("/logout").fields["csrf"]})
    assert foreign.status == 403
    cross_origin = b.request("POST", "/logout", home.form("/logout").fields, {"Origin": "https://evil.example"})
    assert cross_origin.status == 403
    assert b.get("/").status == 200  # still signed in: none of them signed out


def test_language_follows_the_browser_and_the_switch(world: World) -> None:
    ja = world.browser("ja,en;q=0.5")
    page = ja.get("/login")
    assert 'lang="ja"' in page.text and "サインイン" in page.text
    switched = ja.get("/lang?to=en&next=/login")
    assert switched.status == 303 and switched.location == "/login"
    assert 'lang="en"' in ja.get("/login").text
    assert world.browser().get("/lang?to=en&next=//evil.example/").location == "/"


def test_a_page_the_console_does_not_have_is_its_404_and_the_api_keeps_its_own(world: World) -> None:
    b = world.browser()
    page = b.get("/no-such-page")
    assert page.status == 404 and "text/html" in page.headers["Content-Type"] and "no such page" in page.text
    assert page.headers["X-Frame-Options"] == "DENY"
    status, headers, body = world.d.http("GET", "/v1/no-such-endpoint")
    assert status == 404 and headers["Content-Type"].startswith("application/problem+json"), body


def test_an_admin_without_totp_enrols_before_anything_else(world: World) -> None:
    """As the API's session login: an admin's password alone manages nothing."""
    admin = world.person("acme", "admin", totp=False)
    b = world.browser()
    got = b.submit(b.get("/login"), "/login", login=admin.login, password=admin.password)
    assert got.status == 303 and got.location == "/enrol"
    for path in ("/", "/keys", "/users", "/account"):
        assert b.get(path).location == "/enrol", path
    home = b.get("/enrol")
    assert b.post("/keys", {"csrf": home.form("/enrol").fields["csrf"], "login": "alice"}).location == "/enrol"
    assert not [k for k in world.d.admin("apikey.list", tenant="acme") if k["login"] == "alice" and not k["revoked"]]


def test_a_requirement_set_while_signed_in_holds_from_the_next_request(world: World) -> None:
    viewer = world.person("acme", "viewer")
    b = world.signed_in(viewer)
    assert b.get("/").status == 200
    world.d.admin("user.otp-require", tenant="acme", login=viewer.login, required=True)
    assert b.get("/").location == "/enrol"
    world.d.admin("user.otp-require", tenant="acme", login=viewer.login, required=False)
    assert b.get("/").status == 200


def _console_sessions(world: World, login: str) -> list[tuple[float, float, str]]:
    con = sqlite3.connect(world.d.root / "cmcd.db")
    try:
        return con.execute(
            "SELECT s.signed_in, s.expires, s.stage FROM api_sessions s JOIN users u ON u.id = s.user_id "
            "WHERE u.login = ? AND s.kind = 'console'",
            (login,),
        ).fetchall()
    finally:
        con.close()


def test_each_step_of_a_sign_in_keeps_its_time_limit(world: World) -> None:
    """A new session id at each step, but never a new lease of life: an enrolment restarted
    late does not start the console's session lifetime again."""
    admin = world.person("acme", "admin", totp=False)
    b = world.browser()
    b.submit(b.get("/login"), "/login", login=admin.login, password=admin.password)
    ((signed_in, expires, stage),) = _console_sessions(world, admin.login)
    assert stage == "enrol" and expires - signed_in <= 900 + 1
    assert b.submit(b.get("/enrol"), "/enrol").status == 303
    ((again, expires_again, stage_again),) = _console_sessions(world, admin.login)
    assert again == signed_in and stage_again == "enrol" and expires_again <= signed_in + 8 * 3600
