"""The console's "Users and rights" and "My account" pages over real HTTPS, driven as a browser
would (tests/console_client.py): an admin adds a user with a generated password and takes it
through a role change, disable and enable, a new password, one-time passwords required and
removed, and delete; the tenant settings; what a viewer, another tenant's login and an admin
acting on themselves are refused; and a user's own sessions, password and one-time passwords."""

from __future__ import annotations

import html
import itertools
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pyotp
import pytest

from tests.conftest import Cmcd, wait_until
from tests.console_client import ConsoleClient, Reply
from tests.e2e.test_console import Person, World

_logins = itertools.count(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, ca: Any) -> Iterator[World]:
    d = Cmcd(tmp_path_factory.mktemp("console-users"), ca, {"api": {"listen": "127.0.0.1:0"}})
    d.start().provision()
    w = World(d, Person("acme", "", ""), Person("beta", "", ""))
    w.acme_admin = w.person("acme", "admin")
    w.beta_admin = w.person("beta", "admin")
    yield w
    d.stop()


def _text(reply: Reply) -> str:
    """The page's text without tags, for asserting on what a person reads."""
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", reply.text)))


def _secret(reply: Reply) -> str:
    """The password a page shows once."""
    found = re.search(r'<code id="new-password">([^<]+)</code>', reply.text)
    assert found is not None, reply.text[:2000]
    assert 'data-copy="new-password"' in reply.text
    return html.unescape(found.group(1))


def _users(world: World, tenant: str = "acme") -> dict[str, dict[str, Any]]:
    return {u["login"]: u for u in world.d.admin("user.list", tenant=tenant)}


def _sign_in(world: World, login: str, password: str) -> Reply:
    b = world.browser()
    return b.submit(b.get("/login"), "/login", login=login, password=password)


def _ops(world: World, action: str, target: str) -> list[dict[str, Any]]:
    return [r for r in world.d.ops_log() if r["action"] == action and target in (r["target"] or "")]


def _wait_op(world: World, action: str, target: str, result: str = "ok") -> dict[str, Any]:
    rows = wait_until(
        lambda: [r for r in _ops(world, action, target) if r["result"] == result],
        f"an operation-log row {action} {target} {result}",
    )
    row: dict[str, Any] = rows[-1]
    assert row["actor"].startswith("console:"), row
    return row


def _csrf(b: ConsoleClient) -> str:
    return b.get("/account").form("/logout").fields["csrf"]


# -- users ----------------------------------------------------------------------------------------


def test_an_admin_takes_a_user_through_its_life(world: World) -> None:
    admin = world.person("acme", "admin")
    b = world.signed_in(admin)
    listing = b.get("/users")
    assert listing.status == 200 and "Users and rights" in _text(listing)
    assert admin.login in _text(listing)
    login = f"acme-new{next(_logins)}"
    path = f"/users/{login}"

    # added with a generated password, shown once; it signs the new user in
    added = b.submit(listing, "/users", login=login, role="admin", password="")
    assert added.status == 200 and "Shown only now" in _text(added)
    password = _secret(added)
    assert _users(world)[login]["role"] == "admin"
    assert _sign_in(world, login, password).location == "/enrol"  # an admin signs in with TOTP only
    assert login in _text(b.get("/users")) and password not in b.get("/users").text
    _wait_op(world, "console.users.add", f"acme/{login}")

    # a new role
    page = b.get(path)
    assert page.status == 200 and "admin" in _text(page)
    got = b.submit(page, f"{path}/role", role="viewer")
    assert got.status == 303 and got.location == f"{path}?done=users_role_changed"
    assert "The role was changed." in _text(b.get(got.location))
    assert _users(world)[login]["role"] == "viewer"
    assert _sign_in(world, login, password).location == "/"  # a viewer needs no TOTP unless required
    assert _wait_op(world, "console.users.role", f"acme/{login}")["detail"] == "role=viewer"

    # disabled: it cannot sign in; enabled again: it can
    got = b.submit(b.get(path), f"{path}/disable")
    assert got.status == 303 and _users(world)[login]["enabled"] is False
    assert _sign_in(world, login, password).status == 401
    _wait_op(world, "console.users.disable", f"acme/{login}")
    got = b.submit(b.get(path), f"{path}/enable")
    assert got.status == 303 and _users(world)[login]["enabled"] is True
    assert _sign_in(world, login, password).location == "/"
    _wait_op(world, "console.users.enable", f"acme/{login}")

    # a new password, generated and shown once: the old one stops working
    reset = b.submit(b.get(path), f"{path}/password", password="")
    assert reset.status == 200
    new_password = _secret(reset)
    assert new_password != password
    assert _sign_in(world, login, password).status == 401
    assert _sign_in(world, login, new_password).location == "/"
    _wait_op(world, "console.users.passwd", f"acme/{login}")
    typed = b.submit(b.get(path), f"{path}/password", password="too short")
    assert typed.status == 400 and "at least 12 characters" in _text(typed)

    # one-time passwords required: the next sign-in goes to enrolment
    got = b.submit(b.get(path), f"{path}/otp-require")
    assert got.status == 303
    assert "required, not yet set up" in _text(b.get(path))
    assert _sign_in(world, login, new_password).location == "/enrol"
    _wait_op(world, "console.users.otp_require", f"acme/{login}")

    # enrolled, then removed by the admin: the requirement and the enrolment go, password alone signs in
    secret = world.d.admin("user.otp-enroll", tenant="acme", login=login)["secret"]
    world.d.admin("user.otp-confirm", tenant="acme", login=login, code=pyotp.TOTP(secret).at(time.time() - 30))
    assert "set up (required)" in _text(b.get(path))
    assert _sign_in(world, login, new_password).location.startswith("/login/code")
    removed = b.get(path)
    assert 'data-confirm="' in removed.text
    got = b.submit(removed, f"{path}/otp-remove")
    assert got.status == 303 and got.location == f"{path}?done=users_otp_removed"
    assert "One-time passwords off" in _text(b.get(path))
    assert _sign_in(world, login, new_password).location == "/"
    _wait_op(world, "console.users.otp_unrequire", f"acme/{login}")
    _wait_op(world, "console.users.otp_remove", f"acme/{login}")

    # deleted
    page = b.get(path)
    assert re.search(r'action="/users/[^"]+/delete" data-confirm="[^"]+"', page.text)
    got = b.submit(page, f"{path}/delete")
    assert got.status == 303 and got.location == "/users?done=users_deleted"
    assert login not in _users(world)
    assert _sign_in(world, login, new_password).status == 401
    assert b.get(path).status == 404
    _wait_op(world, "console.users.delete", f"acme/{login}")
    assert b.get("/").status == 200  # the admin signed in all along


def test_a_typed_password_and_bad_input_on_add(world: World) -> None:
    b = world.signed_in(world.person("acme", "admin"))
    login = f"acme-typed{next(_logins)}"
    got = b.submit(b.get("/users"), "/users", login=login, role="sender", password="a typed long secret")
    assert got.status == 303 and got.location == "/users?done=users_added"
    assert "The user was added." in _text(b.get(got.location))
    assert _users(world)[login]["role"] == "sender"
    bad = b.submit(b.get("/users"), "/users", login="no spaces allowed", role="viewer", password="")
    assert bad.status == 400 and "use letters, digits" in _text(bad)
    assert 'value="no spaces allowed"' in bad.text  # the form keeps what was typed
    short = b.submit(b.get("/users"), "/users", login=f"acme-short{next(_logins)}", role="viewer", password="short")
    assert short.status == 400 and "at least 12 characters" in _text(short)


def test_a_taken_login_is_not_available_without_saying_whose(world: World) -> None:
    b = world.signed_in(world.person("acme", "admin"))
    got = b.submit(b.get("/users"), "/users", login="bob", role="viewer", password="")  # beta's sender
    assert got.status == 409 and "That login is not available" in _text(got)
    assert "beta" not in _text(got)
    row = _wait_op(world, "console.users.add", "acme/bob", "refused")
    assert row["detail"] == "that login is not available"
    assert "bob" not in _users(world)


def test_tenant_settings_are_saved_and_a_bad_zone_is_refused(world: World) -> None:
    b = world.signed_in(world.person("acme", "admin"))
    try:
        page = b.get("/users")
        assert 'name="console_otp"' in page.text and 'name="timezone"' in page.text
        got = b.submit(page, "/users/settings", console_otp="on", timezone="Asia/Tokyo")
        assert got.status == 303 and got.location == "/users?done=users_settings_saved"
        shown = world.d.admin("tenant.show", name="acme")
        assert shown["console_otp"] is True and shown["timezone"] == "Asia/Tokyo"
        _wait_op(world, "console.tenant.set", "acme")
        saved = b.get("/users")
        assert " JST" in saved.text  # times in the tenant's zone now
        assert saved.form("/users/settings").fields.get("console_otp") == "on"
        bad = b.submit(saved, "/users/settings", timezone="Mars/Olympus")
        assert bad.status == 400 and "no IANA time zone name" in _text(bad)
        assert world.d.admin("tenant.show", name="acme")["timezone"] == "Asia/Tokyo"
        _wait_op(world, "console.tenant.set", "acme", "refused")
        fields = b.get("/users").form("/users/settings").fields
        fields.pop("console_otp")  # unticked
        got = b.post("/users/settings", fields | {"timezone": ""})
        assert got.status == 303
        shown = world.d.admin("tenant.show", name="acme")
        assert shown["console_otp"] is False and shown["timezone"] == ""
    finally:
        world.d.admin("tenant.set", name="acme", console_otp=False)


def test_a_viewer_gets_403_on_every_change_and_changes_nothing(world: World) -> None:
    viewer = world.person("acme", "viewer")
    target = world.person("acme", "sender")
    vb = world.signed_in(viewer)
    assert vb.get("/users").status == 403
    assert vb.get(f"/users/{target.login}").status == 403
    assert "/users" not in re.findall(r'href="(/users[^"]*)"', vb.get("/").text)  # not in the menu
    csrf = _csrf(vb)
    before_users, before_tenant = _users(world), world.d.admin("tenant.show", name="acme")
    before_ops = len(world.d.ops_log())
    path = f"/users/{target.login}"
    posts: list[tuple[str, dict[str, str]]] = [
        ("/users", {"login": f"acme-viewer-made{next(_logins)}", "role": "admin", "password": ""}),
        ("/users/settings", {"console_otp": "on", "timezone": "Asia/Tokyo"}),
        (f"{path}/role", {"role": "admin"}),
        (f"{path}/disable", {}),
        (f"{path}/enable", {}),
        (f"{path}/password", {"password": ""}),
        (f"{path}/otp-require", {}),
        (f"{path}/otp-remove", {}),
        (f"{path}/delete", {}),
    ]
    for action, values in posts:
        got = vb.post(action, {"csrf": csrf} | values)
        assert got.status == 403 and "Your role may not do this." in _text(got), action
        assert "new-password" not in got.text
    assert _users(world) == before_users
    assert world.d.admin("tenant.show", name="acme") == before_tenant
    assert not [r for r in world.d.ops_log()[before_ops:] if viewer.login in r["actor"]]
    assert _sign_in(world, target.login, target.password).status == 401  # a sender still: no console


def test_another_tenants_login_is_not_found(world: World) -> None:
    b = world.signed_in(world.person("acme", "admin"))
    csrf = _csrf(b)
    other = world.beta_admin.login
    unknown = b.get("/users/nobody-at-all")
    assert unknown.status == 404
    foreign = b.get(f"/users/{other}")
    assert foreign.status == 404 and _text(foreign) == _text(unknown)
    before_ops = len(world.d.ops_log())
    for verb, values in (("delete", {}), ("disable", {}), ("role", {"role": "sender"}), ("password", {}),
                         ("otp-require", {}), ("otp-remove", {})):  # fmt: skip
        got = b.post(f"/users/{other}/{verb}", {"csrf": csrf} | values)
        assert got.status == 404 and _text(got) == _text(unknown), verb
    after = _users(world, "beta")[other]
    assert after["role"] == "admin" and after["enabled"] is True
    assert world.signed_in(world.beta_admin).get("/").status == 200
    assert not [r for r in world.d.ops_log()[before_ops:] if other in (r["target"] or "")]


def test_an_admin_cannot_delete_disable_or_demote_themselves(world: World) -> None:
    admin = world.person("acme", "admin")
    b = world.signed_in(admin)
    path = f"/users/{admin.login}"
    page = b.get(path)
    assert page.status == 200 and f'action="{path}/delete"' not in page.text
    csrf = page.form("/logout").fields["csrf"]
    deleted = b.post(f"{path}/delete", {"csrf": csrf})
    assert deleted.status == 409 and "You cannot delete the user you are signed in as" in _text(deleted)
    disabled = b.post(f"{path}/disable", {"csrf": csrf})
    assert disabled.status == 409 and "You cannot disable the user you are signed in as" in _text(disabled)
    demoted = b.post(f"{path}/role", {"csrf": csrf, "role": "viewer"})
    assert demoted.status == 409 and "You cannot change the role" in _text(demoted)
    reset = b.post(f"{path}/password", {"csrf": csrf, "password": ""})
    assert reset.status == 409 and "new-password" not in reset.text
    me = _users(world)[admin.login]
    assert me["role"] == "admin" and me["enabled"] is True
    assert b.get("/users").status == 200  # still signed in, still an admin


def test_the_pages_are_in_japanese_and_have_no_inline_script_or_style(world: World) -> None:
    admin = world.person("acme", "admin")
    b = world.signed_in(admin, "ja")
    for path, title in (("/users", "ユーザーと権限"), (f"/users/{admin.login}", "ワンタイムパスワード"),
                        ("/account", "アカウント")):  # fmt: skip
        got = b.get(path)
        assert got.status == 200 and title in _text(got), path
        assert "<script>" not in got.text and " style=" not in got.text and " on" + "click=" not in got.text
        ids = re.findall(r'<input id="([^"]+)"', got.text) + re.findall(r'<select id="([^"]+)"', got.text)
        assert all(f'for="{i}"' in got.text for i in ids), path  # every field has its label


def test_cmcctl_requires_one_time_passwords_of_a_user(world: World) -> None:
    person = world.person("acme", "viewer")

    def cmcctl(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cmcd.admin.cli", "--socket", str(world.d.root / "admin.sock"),
                               *argv], capture_output=True, text=True, timeout=60)  # fmt: skip

    on = cmcctl("user", "otp-require", "acme", person.login, "--on")
    assert on.returncode == 0 and "now required" in on.stdout, on.stderr
    assert _sign_in(world, person.login, person.password).location == "/enrol"
    off = cmcctl("user", "otp-require", "acme", person.login, "--off")
    assert off.returncode == 0 and "no longer required" in off.stdout, off.stderr
    assert _sign_in(world, person.login, person.password).location == "/"
    rows = [r for r in _ops(world, "user.otp-require", f"acme/{person.login}") if r["result"] == "ok"]
    assert len(rows) == 2
    foreign = cmcctl("user", "otp-require", "acme", world.beta_admin.login, "--on")
    assert foreign.returncode != 0 and f"no user '{world.beta_admin.login}' in tenant 'acme'" in foreign.stderr
    assert cmcctl("user", "otp-require", "acme", person.login).returncode != 0  # --on or --off, no default


# -- my account -----------------------------------------------------------------------------------


def test_account_lists_sessions_and_ends_another(world: World) -> None:
    admin = world.person("acme", "viewer")
    here, there = world.signed_in(admin), world.signed_in(admin)
    page = here.get("/account")
    assert page.status == 200
    text = _text(page)
    assert admin.login in text and "acme" in text and "this one" in text
    assert page.form("/enrol")  # not enrolled: the way to set one-time passwords up
    ends = [f.action for f in page.forms() if f.action.startswith("/account/sessions/")]
    assert len(ends) == 1  # the other browser's session; this one has none
    sid = ends[0].split("/")[3]
    assert sid in {s["id"] for s in world.d.admin("session.list", tenant="acme", login=admin.login)}
    got = here.submit(page, ends[0])
    assert got.status == 303 and got.location == "/account?done=account_session_ended"
    assert there.get("/").status == 303  # that browser is signed out
    assert here.get("/").status == 200
    assert _wait_op(world, "console.account.session_end", f"acme/{admin.login}")["detail"] == f"session {sid}"

    # another user's session is no session of mine
    other = world.person("acme", "viewer")
    ob = world.signed_in(other)
    (theirs,) = world.d.admin("session.list", tenant="acme", login=other.login)
    refused = here.post(f"/account/sessions/{theirs['id']}/end", {"csrf": _csrf(here)})
    assert refused.status == 404
    assert ob.get("/").status == 200
    assert here.post("/account/sessions/not-an-id/end", {"csrf": _csrf(here)}).status == 404


def test_a_viewer_changes_their_own_password_with_the_current_one(world: World) -> None:
    viewer = world.person("acme", "viewer")
    b = world.signed_in(viewer)
    page = b.get("/account")
    assert page.status == 200
    new = "a brand new long secret"
    wrong = b.submit(page, "/account/password", current="not my password", new=new, again=new)
    assert wrong.status == 403 and "The current password is not right" in _text(wrong)
    mismatch = b.submit(page, "/account/password", current=viewer.password, new=new, again=new + "!")
    assert mismatch.status == 400 and "not the same" in _text(mismatch)
    short = b.submit(page, "/account/password", current=viewer.password, new="short", again="short")
    assert short.status == 400 and "at least 12 characters" in _text(short)
    assert b.get("/").status == 200  # nothing changed: still signed in
    assert _sign_in(world, viewer.login, viewer.password).location == "/"
    done = b.submit(b.get("/account"), "/account/password", current=viewer.password, new=new, again=new)
    assert done.status == 303 and done.location == "/login?done=account_password_changed"
    assert "sign in with the new password" in _text(b.get(done.location))
    assert b.get("/").status == 303  # its sessions ended, this one too
    assert _sign_in(world, viewer.login, viewer.password).status == 401
    assert _sign_in(world, viewer.login, new).location == "/"
    _wait_op(world, "console.account.passwd", f"acme/{viewer.login}")
    assert any(r["login"] == viewer.login and r["result"] == "fail" and "current password" in (r["detail"] or "")
               for r in world.d.login_log())  # fmt: skip


def test_own_one_time_passwords_go_off_only_when_nobody_requires_them(world: World) -> None:
    admin = world.signed_in(world.person("acme", "admin"))
    user = world.person("acme", "viewer", totp=True)
    b = world.signed_in(user)
    page = b.get("/account")
    assert "set up" in _text(page) and page.form("/account/otp/disable")
    # required by an admin: the form goes, and the request is refused
    path = f"/users/{user.login}"
    assert admin.submit(admin.get(path), f"{path}/otp-require").status == 303
    page = b.get("/account")
    assert not [f for f in page.forms() if f.action == "/account/otp/disable"]
    refused = b.post("/account/otp/disable", {"csrf": _csrf(b)})
    assert refused.status == 409 and "An admin requires one-time passwords of you" in _text(refused)
    assert b.get("/").status == 200
    # the admin removes them (the requirement and the enrolment); set up again, nobody requires them:
    # the user turns them off, and signs in with the password alone
    assert admin.submit(admin.get(path), f"{path}/otp-remove").status == 303
    assert b.get("/").status == 303  # the enrolment's end ended the user's sessions
    secret = world.d.admin("user.otp-enroll", tenant="acme", login=user.login)["secret"]
    world.d.admin("user.otp-confirm", tenant="acme", login=user.login, code=pyotp.TOTP(secret).at(time.time() - 30))
    b = world.browser()
    assert b.sign_in(user.login, user.password, secret).location == "/"
    off = b.submit(b.get("/account"), "/account/otp/disable")
    assert off.status == 303 and off.location == "/login?done=account_otp_disabled"
    assert b.get("/").status == 303
    assert _sign_in(world, user.login, user.password).location == "/"
    _wait_op(world, "console.account.otp_disable", f"acme/{user.login}")


def test_an_admin_removing_their_own_one_time_passwords_enrols_again(world: World) -> None:
    admin = world.person("acme", "admin", totp=True)
    b = world.signed_in(admin)
    path = f"/users/{admin.login}"
    got = b.submit(b.get(path), f"{path}/otp-remove")
    assert got.status == 303 and got.location == "/login?done=users_own_otp_removed"
    assert "sign in again" in _text(b.get(got.location))
    assert b.get("/").status == 303  # the enrolment's end ended this session
    assert _sign_in(world, admin.login, admin.password).location == "/enrol"  # an admin has TOTP, always
    _wait_op(world, "console.users.otp_remove", f"acme/{admin.login}")
