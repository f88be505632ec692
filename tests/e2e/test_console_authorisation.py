"""Every console view's authorisation, walked from the console's own route table (so a view added
later is walked too): signed out, every page sends you to sign-in and every form changes nothing;
a viewer reads every read page and gets 403 from every admin page and form; an admin of acme who
names any of beta's items (a login, a key, a queue id, a domain, a webhook, a session, a blocked
address) in a URL or form gets 404, the page an unknown item gets; and afterwards beta's data is
exactly as it was. A sender never signs in (tests/e2e/test_console.py)."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyotp
import pytest
from aiohttp import web

from cmcd.api.console import Console
from tests.conftest import Cmcd, wait_until
from tests.console_client import ConsoleClient
from tests.e2e.test_console import Person

B_BLOCKED = "blocked@dst.test"


def _routes() -> list[tuple[str, str, str | None]]:
    console = Console(api=None)  # type: ignore[arg-type]  # the route table only
    console.add_routes(web.Application().router)
    return console.routes


ROUTES = _routes()
GUARDED = [(m, p, n) for m, p, n in ROUTES if n is not None]
MANAGE = [(m, p, n) for m, p, n in ROUTES if n == "manage"]
READ_PAGES = [(m, p, n) for m, p, n in ROUTES if n == "read" and m == "GET" and "{" not in p]
WITH_ITEM = [(m, p, n) for m, p, n in ROUTES if n is not None and "{" in p]
#: forms that name an item in their fields instead of their URL: the field and which of beta's items
ITEM_FIELDS = {"/blocks/delete": {"address": B_BLOCKED}, "/keys": {"login": "bob"}}


def _id(route: tuple[str, str, str | None]) -> str:
    return f"{route[0]} {route[1]}"


@dataclass
class World:
    d: Cmcd
    admin: Person
    viewer: Person
    beta: dict[str, str]  # placeholder name -> one of beta's items

    def browser(self) -> ConsoleClient:
        return ConsoleClient(self.d.api_port, self.d.client_context())

    def signed_in(self, who: Person) -> ConsoleClient:
        b = self.browser()
        got = b.sign_in(who.login, who.password, who.totp)
        assert got.status == 303 and got.location == "/", got.text[:300]
        return b


def _beta_state(d: Cmcd) -> dict[str, Any]:
    """Everything of beta's that a console form could change."""
    con = sqlite3.connect(d.root / "cmcd.db")
    try:
        beta = con.execute("SELECT id FROM tenants WHERE name = 'beta'").fetchone()[0]
        rows = {
            table: con.execute(f"SELECT * FROM {table} WHERE tenant_id = ? ORDER BY 1", (beta,)).fetchall()
            for table in ("users", "api_keys", "suppressions", "domains", "ip_credentials", "otp")
        }
        # a webhook's own delivery state moves by itself: what a form could change is the hook
        rows["webhooks"] = con.execute(
            "SELECT id, url, events, secret_enc FROM webhooks WHERE tenant_id = ? ORDER BY 1", (beta,)
        ).fetchall()
        rows["tenant"] = con.execute("SELECT * FROM tenants WHERE id = ?", (beta,)).fetchall()
        rows["sessions"] = con.execute(
            "SELECT token_hash, expires FROM api_sessions WHERE tenant_id = ? ORDER BY 1", (beta,)
        ).fetchall()
        rows["console_ops"] = con.execute(
            "SELECT COUNT(*) FROM ops_log WHERE tenant_id = ? AND actor LIKE 'console:%'", (beta,)
        ).fetchall()
        return rows
    finally:
        con.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, ca: Any) -> Iterator[World]:
    d = Cmcd(
        tmp_path_factory.mktemp("console-authz"),
        ca,
        {"api": {"listen": "127.0.0.1:0", "webhook_allow_private": True, "console_ip_credentials": True}},
    )
    d.start().provision()
    totp: dict[str, str] = {}
    for tenant, role in (("acme", "admin"), ("acme", "viewer"), ("beta", "admin")):
        login = f"{tenant}-{role}"
        d.admin("user.add", tenant=tenant, login=login, role=role, password=f"{login} secret pw")
        if role == "admin":  # an admin signs in to the console with TOTP only
            totp[login] = d.admin("user.otp-enroll", tenant=tenant, login=login)["secret"]
            d.admin("user.otp-confirm", tenant=tenant, login=login, code=pyotp.TOTP(totp[login]).at(time.time() - 30))
    d.admin("suppression.add", tenant="beta", address=B_BLOCKED)
    d.admin("ipcred.add", tenant="beta", login="bob", cidr="192.0.2.0/24")
    hook = d.admin("webhook.add", tenant="beta", url="http://127.0.0.1:9/beta")["id"]
    key = d.admin("apikey.add", tenant="beta", login="bob")["key_id"]
    with d.smtp(login="bob") as c:
        c.ehlo()
        reply = c.sendmail("bob@beta.test", ["x@dst.test"], b"From: bob@beta.test\r\nSubject: b\r\n\r\nb\r\n")
        assert reply == {}
    qid = wait_until(
        lambda: next((r["queue_id"] for r in d.mail_log() if r["event"] == "accepted"), None), "beta's message"
    )
    w = World(d, Person("acme", "acme-admin", "acme-admin secret pw", totp["acme-admin"]),
              Person("acme", "acme-viewer", "acme-viewer secret pw"), {})  # fmt: skip
    beta_browser = w.signed_in(Person("beta", "beta-admin", "beta-admin secret pw", totp["beta-admin"]))
    sid = re.search(r"/account/sessions/([0-9a-f]+)/end", beta_browser.get("/account").text)
    sessions = d.admin("session.list", tenant="beta", login="beta-admin")
    w.beta = {
        "login": "bob",
        "key_id": key,
        "queue_id": qid,
        "name": "beta.test",
        "webhook_id": str(hook),
        "sid": sid.group(1) if sid else sessions[0]["id"],
    }
    yield w
    d.stop()


def _fill(path: str, items: dict[str, str]) -> str:
    return re.sub(r"{(\w+)}", lambda m: items[m.group(1)], path)


@pytest.mark.parametrize("route", GUARDED, ids=_id)
def test_signed_out_every_page_asks_for_sign_in_and_no_form_changes_anything(
    world: World, route: tuple[str, str, str | None]
) -> None:
    method, path, _ = route
    before = _beta_state(world.d)
    b = world.browser()
    target = _fill(path, world.beta)
    got = b.get(target) if method == "GET" else b.post(target, {"csrf": "x"} | ITEM_FIELDS.get(path, {}))
    assert got.status == 303 and got.location.startswith("/login"), (got.status, got.location)
    assert _beta_state(world.d) == before


@pytest.fixture(scope="module")
def viewer(world: World) -> ConsoleClient:
    return world.signed_in(world.viewer)


@pytest.fixture(scope="module")
def admin(world: World) -> ConsoleClient:
    return world.signed_in(world.admin)


def _csrf(b: ConsoleClient) -> str:
    return b.get("/account").form("/logout").fields["csrf"]


@pytest.mark.parametrize("route", READ_PAGES, ids=_id)
def test_a_viewer_reads_every_read_page(viewer: ConsoleClient, route: tuple[str, str, str | None]) -> None:
    got = viewer.get(route[1])
    assert got.status == 200, (got.status, got.text[:300])


@pytest.mark.parametrize("route", MANAGE, ids=_id)
def test_a_viewer_gets_403_from_every_admin_page_and_form(
    world: World, viewer: ConsoleClient, route: tuple[str, str, str | None]
) -> None:
    method, path, _ = route
    acme_items = {"login": "alice", "key_id": "x", "queue_id": "x", "name": "acme.test", "webhook_id": "1", "sid": "x"}
    target = _fill(path, acme_items)
    before = _beta_state(world.d)
    got = viewer.get(target) if method == "GET" else viewer.post(target, {"csrf": _csrf(viewer), "login": "alice"})
    assert got.status == 403, (got.status, got.text[:300])
    assert "may not" in got.text
    assert _beta_state(world.d) == before


@pytest.mark.parametrize("route", WITH_ITEM + [("POST", p, "manage") for p in ITEM_FIELDS], ids=_id)
def test_an_admin_naming_another_tenants_item_gets_404(
    world: World, admin: ConsoleClient, route: tuple[str, str, str | None]
) -> None:
    method, path, _ = route
    before = _beta_state(world.d)
    target = _fill(path, world.beta)
    if method == "GET":
        got = admin.get(target)
    else:
        fields = {"csrf": _csrf(admin), "role": "admin", "password": "a new long password", "cidr": "192.0.2.0/24"}
        got = admin.post(target, fields | ITEM_FIELDS.get(path, {}))
    assert got.status == 404, (got.status, got.text[:400])
    for secret in (world.beta["key_id"], world.beta["queue_id"], "bob@beta.test"):
        assert secret not in got.text or secret in target  # the page echoes at most what was asked
    assert _beta_state(world.d) == before


def test_every_item_kind_in_a_url_is_walked(world: World) -> None:
    """A placeholder this test does not know would be walked with no item: name one for it."""
    names = {n for _, p, _ in WITH_ITEM for n in re.findall(r"{(\w+)}", p)}
    assert names <= set(world.beta), names - set(world.beta)
