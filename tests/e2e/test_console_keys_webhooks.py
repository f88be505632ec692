"""The console's "Sending credentials" and "Webhooks" pages over real HTTPS, driven as a browser
would (tests/console_client.py): an API key made in the console works against the JSON API until it
is revoked there; IP credentials are the operator's unless api.console_ip_credentials allows
tenant admins (one daemon each way); a webhook's secret is shown once; refusals re-render their
form and change nothing; another tenant's items are "not found"; every change is on the
operation log under the console user's name."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Cmcd, message, wait_until
from tests.console_client import ConsoleClient, Reply
from tests.e2e.test_console import Person, World

NOT_FOUND = "There is no such page or item in your tenant."
OPERATOR_MANAGES = "IP credentials are managed by the operator"


def _world(d: Cmcd) -> World:
    d.start().provision()
    w = World(d, Person("acme", "", ""), Person("beta", "", ""))
    w.acme_admin = w.person("acme", "admin")
    w.beta_admin = w.person("beta", "admin")
    return w


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, ca: Any) -> Iterator[World]:
    """The operator keeps IP credentials (the default); loopback webhook URLs are allowed; delivery
    on (to a closed port on loopback: what reaches a final state there is a suppressed recipient)."""
    d = Cmcd(tmp_path_factory.mktemp("console-keys"), ca,
             {"api": {"listen": "127.0.0.1:0", "webhook_allow_private": True}, "delivery": {"enabled": True}})  # fmt: skip
    w = _world(d)
    yield w
    d.stop()


@pytest.fixture(scope="module")
def open_world(tmp_path_factory: pytest.TempPathFactory, ca: Any) -> Iterator[World]:
    """Tenant admins manage IP credentials; webhook URLs must be public (the SSRF guard on)."""
    d = Cmcd(tmp_path_factory.mktemp("console-keys-open"), ca,
             {"api": {"listen": "127.0.0.1:0", "console_ip_credentials": True}})  # fmt: skip
    w = _world(d)
    yield w
    d.stop()


def _text(reply: Reply) -> str:
    """The page's text without tags, for asserting on what a person reads."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", reply.text)).replace("&#39;", "'")


def _row(reply: Reply, row_id: str) -> str:
    """The text of the table row with id ROW_ID ("" when there is none)."""
    found = re.search(rf'<tr id="{re.escape(row_id)}"[^>]*>(.*?)</tr>', reply.text, re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", found.group(1))).strip() if found else ""


def _last_used(reply: Reply, key_id: str) -> str:
    found = re.search(rf'<tr id="key-{key_id}".*?<td class="last-used">([^<]*)</td>', reply.text, re.S)
    assert found is not None, reply.text[:3000]
    return found.group(1).strip()


def _shown(reply: Reply, element_id: str) -> str:
    found = re.search(rf'id="{element_id}">([^<]+)<', reply.text)
    assert found is not None, reply.text[:3000]
    return found.group(1).strip()


def _csrf(b: ConsoleClient) -> str:
    return b.get("/").form("/logout").fields["csrf"]


def _ops(d: Cmcd, action: str) -> list[dict[str, Any]]:
    return [r for r in d.ops_log() if r["action"] == action]


# -- API keys -----------------------------------------------------------------------------------


def test_a_key_made_in_the_console_works_until_it_is_revoked_there(world: World) -> None:
    d = world.d
    admin = world.person("acme", "admin")
    b = world.signed_in(admin)
    page = b.get("/keys")
    assert page.status == 200 and "Sending credentials" in _text(page)
    made = b.submit(page, "/keys", login=admin.login, role="")
    assert made.status == 200, made.text[:2000]
    token = _shown(made, "new-token")
    assert token.startswith("cmk_")
    assert 'data-copy="new-token"' in made.text and "also the SMTP AUTH password" in _text(made)
    key_id = token.split("_")[1]
    listed = b.get("/keys")
    assert token not in listed.text  # shown once: never again
    row = _row(listed, f"key-{key_id}")
    assert admin.login in row and "admin" in row and "never" in row and "active" in row

    assert _last_used(listed, key_id) == "never"
    assert d.http("GET", "/v1/deliveries", token=token)[0] == 200
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S+", _last_used(b.get("/keys"), key_id))

    listed = b.get("/keys")
    revoke = listed.form(f"/keys/{key_id}/revoke")
    assert re.search(rf'action="/keys/{key_id}/revoke"[^>]*data-confirm="[^"]+"', listed.text)
    done = b.post(revoke.action, revoke.fields)
    assert done.status == 303 and done.location == "/keys?done=keys_revoked"
    after = b.get(done.location)
    assert "The API key is revoked." in _text(after) and "revoked" in _row(after, f"key-{key_id}")
    assert f'action="/keys/{key_id}/revoke"' not in after.text  # nothing left to revoke
    assert d.http("GET", "/v1/deliveries", token=token)[0] == 401

    actor = f"console:{admin.login} ("
    added = [r for r in _ops(d, "console.apikeys.add") if r["actor"].startswith(actor)]
    assert [(r["target"], r["result"], r["detail"]) for r in added] == [(f"{admin.login} {key_id}", "ok", "role=admin")]
    revoked = [r for r in _ops(d, "console.apikeys.revoke") if r["actor"].startswith(actor)]
    assert [(r["target"], r["result"]) for r in revoked] == [(key_id, "ok")]


def test_a_key_role_the_user_may_not_hold_is_refused_on_the_form(world: World) -> None:
    d = world.d
    admin = world.person("acme", "admin")
    b = world.signed_in(admin)
    before = d.admin("apikey.list", tenant="acme", login="alice")
    refused = b.submit(b.get("/keys"), "/keys", login="alice", role="admin")  # alice is a sender
    assert refused.status == 422 and "only an admin user may hold" in _text(refused)
    assert 'class="error"' in refused.text and refused.form("/keys").fields["role"] == "admin"
    assert d.admin("apikey.list", tenant="acme", login="alice") == before
    rows = [r for r in _ops(d, "console.apikeys.add") if r["actor"].startswith(f"console:{admin.login} (")]
    assert [(r["target"], r["result"]) for r in rows] == [("alice", "refused")]

    viewer_key = b.submit(b.get("/keys"), "/keys", login=admin.login, role="viewer")
    assert viewer_key.status == 200 and "cannot send mail" in _text(viewer_key)
    assert d.http("GET", "/v1/deliveries", token=_shown(viewer_key, "new-token"))[0] == 200


def test_a_viewer_may_not_open_or_change_credentials_or_webhooks(world: World) -> None:
    viewer = world.person("acme", "viewer")
    b = world.signed_in(viewer)
    home = b.get("/")
    assert 'href="/keys"' not in home.text and 'href="/webhooks"' not in home.text
    assert b.get("/keys").status == 403 and b.get("/webhooks").status == 403
    csrf = _csrf(b)
    keys_before = world.d.admin("apikey.list", tenant="acme")
    assert b.post("/keys", {"csrf": csrf, "login": viewer.login, "role": ""}).status == 403
    assert b.post("/webhooks", {"csrf": csrf, "url": "http://127.0.0.1:9/v", "event_delivered": "1"}).status == 403
    assert world.d.admin("apikey.list", tenant="acme") == keys_before
    assert not [h for h in world.d.admin("webhook.list", tenant="acme") if h["url"] == "http://127.0.0.1:9/v"]


def test_another_tenants_key_user_and_webhook_are_not_found(world: World) -> None:
    d = world.d
    theirs = d.admin("apikey.add", tenant="beta", login="bob")
    hook = d.admin("webhook.add", tenant="beta", url="http://127.0.0.1:9/beta")
    b = world.signed_in(world.person("acme", "admin"))
    csrf = _csrf(b)
    got = b.post(f"/keys/{theirs['key_id']}/revoke", {"csrf": csrf})
    assert got.status == 404 and NOT_FOUND in _text(got)
    assert b.post("/keys/nosuchkey123/revoke", {"csrf": csrf}).status == 404
    bobs = [k for k in d.admin("apikey.list", tenant="beta") if k["key_id"] == theirs["key_id"]]
    assert [k["revoked"] for k in bobs] == [None]

    made = b.post("/keys", {"csrf": csrf, "login": "bob", "role": ""})
    assert made.status == 404 and NOT_FOUND in _text(made) and "cmk_" not in made.text
    assert len(d.admin("apikey.list", tenant="beta", login="bob")) == 1

    gone = b.post(f"/webhooks/{hook['id']}/delete", {"csrf": csrf})
    assert gone.status == 404 and NOT_FOUND in _text(gone)
    assert b.post("/webhooks/not-a-number/delete", {"csrf": csrf}).status == 404
    assert [h["id"] for h in d.admin("webhook.list", tenant="beta")] == [hook["id"]]
    assert "http://127.0.0.1:9/beta" not in b.get("/webhooks").text
    d.admin("webhook.delete", tenant="beta", id=hook["id"])


# -- IP credentials ------------------------------------------------------------------------------


def test_ip_credentials_are_the_operators_by_default(world: World) -> None:
    d = world.d
    d.admin("ipcred.add", tenant="acme", login="alice", cidr="192.0.2.0/24")
    d.admin("ipcred.add", tenant="beta", login="bob", cidr="198.51.100.0/24")
    b = world.signed_in(world.person("acme", "admin"))
    page = b.get("/keys")
    text = _text(page)
    assert OPERATOR_MANAGES in text and "192.0.2.0/24" in text and "198.51.100.0/24" not in text
    assert not [f for f in page.forms() if f.action.startswith("/keys/ip")]
    csrf = _csrf(b)
    added = b.post("/keys/ip", {"csrf": csrf, "login": "alice", "cidr": "203.0.113.0/24"})
    assert added.status == 403 and OPERATOR_MANAGES in _text(added)
    removed = b.post("/keys/ip/delete", {"csrf": csrf, "login": "alice", "cidr": "192.0.2.0/24"})
    assert removed.status == 403 and OPERATOR_MANAGES in _text(removed)
    assert [c["cidr"] for c in d.admin("ipcred.list", tenant="acme")] == ["192.0.2.0/24"]
    assert not _ops(d, "console.ipcreds.add") and not _ops(d, "console.ipcreds.delete")


def test_ip_credentials_when_the_operator_allows_tenant_admins(open_world: World) -> None:
    d = open_world.d
    d.admin("ipcred.add", tenant="beta", login="bob", cidr="198.51.100.0/24")
    admin = open_world.person("acme", "admin")
    b = open_world.signed_in(admin)
    page = b.get("/keys")
    assert OPERATOR_MANAGES not in _text(page)
    added = b.submit(page, "/keys/ip", login="alice", cidr="192.0.2.0/24")
    assert added.status == 303 and added.location == "/keys?done=keys_ip_added"
    listed = b.get(added.location)
    assert "The IP credential is added." in _text(listed) and "192.0.2.0/24" in _text(listed)
    assert [(c["login"], c["cidr"]) for c in d.admin("ipcred.list", tenant="acme")] == [("alice", "192.0.2.0/24")]

    wide = b.submit(listed, "/keys/ip", login="alice", cidr="10.0.0.0/8")
    assert wide.status == 422 and "too wide" in _text(wide) and wide.form("/keys/ip").fields["cidr"] == "10.0.0.0/8"
    overlap = b.submit(listed, "/keys/ip", login="alice", cidr="198.51.100.0/25")  # beta's network
    assert overlap.status == 409 and "not available" in _text(overlap)
    assert "198.51.100.0/24" not in overlap.text and "another tenant" not in _text(overlap)
    assert b.submit(listed, "/keys/ip", login="bob", cidr="203.0.113.0/24").status == 404  # beta's user
    assert [c["cidr"] for c in d.admin("ipcred.list", tenant="acme")] == ["192.0.2.0/24"]

    delete = listed.form("/keys/ip/delete")
    assert delete.fields["cidr"] == "192.0.2.0/24" and 'data-confirm="Remove IP credential' in listed.text
    assert b.post("/keys/ip/delete", delete.fields | {"login": "bob", "cidr": "198.51.100.0/24"}).status == 404
    gone = b.post(delete.action, delete.fields)
    assert gone.status == 303 and gone.location == "/keys?done=keys_ip_deleted"
    assert d.admin("ipcred.list", tenant="acme") == []
    assert [c["cidr"] for c in d.admin("ipcred.list", tenant="beta")] == ["198.51.100.0/24"]

    mine = [r for r in d.ops_log() if r["actor"].startswith(f"console:{admin.login} (")]
    said = [(r["action"], r["target"], r["result"]) for r in mine]
    assert ("console.ipcreds.add", "alice 192.0.2.0/24", "ok") in said
    assert ("console.ipcreds.add", "alice 10.0.0.0/8", "refused") in said
    assert ("console.ipcreds.delete", "alice 192.0.2.0/24", "ok") in said
    refused_overlap = [r for r in mine if r["target"] == "alice 198.51.100.0/25"]
    assert [r["detail"] for r in refused_overlap] == ["that network is not available"]  # the tenant reads it


# -- webhooks ----------------------------------------------------------------------------------


def test_a_webhook_added_shows_its_secret_once_is_listed_and_deleted(world: World) -> None:
    d = world.d
    admin = world.person("acme", "admin")
    b = world.signed_in(admin)
    page = b.get("/webhooks")
    assert page.status == 200
    form = page.form("/webhooks")
    assert {k for k in form.fields if k.startswith("event_")} == {
        "event_delivered", "event_deferred", "event_bounced", "event_expired", "event_suppressed",
        "event_unsubscribed"}  # fmt: skip
    fields = form.fields | {"url": "http://127.0.0.1:9/hook"}
    del fields["event_deferred"]  # unticked
    made = b.post("/webhooks", fields)
    assert made.status == 200, made.text[:2000]
    secret = _shown(made, "webhook-secret")
    assert secret.startswith("whsec_") and 'data-copy="webhook-secret"' in made.text
    hooks = [h for h in d.admin("webhook.list", tenant="acme") if h["url"] == "http://127.0.0.1:9/hook"]
    assert [h["events"] for h in hooks] == [["delivered", "bounced", "expired", "suppressed", "unsubscribed"]]
    hook_id = hooks[0]["id"]

    listed = b.get("/webhooks")
    row = _row(listed, f"webhook-{hook_id}")
    assert "http://127.0.0.1:9/hook" in row and "bounced" in row and "deferred" not in row
    assert "nothing posted yet" in row and secret not in listed.text

    delete = listed.form(f"/webhooks/{hook_id}/delete")
    assert re.search(rf'action="/webhooks/{hook_id}/delete"[^>]*data-confirm="[^"]+"', listed.text)
    gone = b.post(delete.action, delete.fields)
    assert gone.status == 303 and gone.location == "/webhooks?done=webhooks_deleted"
    after = b.get(gone.location)
    assert "The webhook is deleted." in _text(after) and not _row(after, f"webhook-{hook_id}")
    assert hook_id not in [h["id"] for h in d.admin("webhook.list", tenant="acme")]

    mine = [r for r in d.ops_log() if r["actor"].startswith(f"console:{admin.login} (")]
    assert [(r["action"], r["target"], r["result"]) for r in mine] == [
        ("console.webhooks.add", f"webhook={hook_id}", "ok"),
        ("console.webhooks.delete", f"webhook={hook_id}", "ok"),
    ]


def test_a_refused_webhook_url_rerenders_the_form_and_makes_nothing(world: World, open_world: World) -> None:
    admin = world.person("acme", "admin")
    b = world.signed_in(admin)
    before = world.d.admin("webhook.list", tenant="acme")
    page = b.get("/webhooks")
    bad = b.submit(page, "/webhooks", url="ftp://x")
    assert bad.status == 422 and "must start with https:// or http://" in _text(bad)
    assert bad.form("/webhooks").fields["url"] == "ftp://x" and 'role="alert"' in bad.text
    fields = {k: v for k, v in page.form("/webhooks").fields.items() if not k.startswith("event_")}
    none = b.post("/webhooks", fields | {"url": "http://127.0.0.1:9/none"})
    assert none.status == 422 and "at least one event" in _text(none)
    assert world.d.admin("webhook.list", tenant="acme") == before
    rows = [r for r in _ops(world.d, "console.webhooks.add") if r["actor"].startswith(f"console:{admin.login} (")]
    assert [r["result"] for r in rows] == ["refused", "refused"]

    # the SSRF guard on: a loopback URL is refused in the tenant's words, not the resolver's
    guarded = open_world.signed_in(open_world.person("acme", "admin"))
    private = guarded.submit(guarded.get("/webhooks"), "/webhooks", url="http://127.0.0.1:9/private")
    assert private.status == 422 and "does not resolve to public addresses only" in _text(private)
    assert "is a loopback address" not in _text(private)
    assert open_world.d.admin("webhook.list", tenant="acme") == []


def test_a_console_key_sends_over_smtp_and_a_failing_webhook_shows_its_state(world: World) -> None:
    """The token is the SMTP AUTH password; the mail it sends (to a suppressed address) is an
    event the webhook cannot post (nothing listens on port 9): the page shows it failing."""
    d = world.d
    b = world.signed_in(world.person("acme", "admin"))
    page = b.get("/webhooks")
    fields = {k: v for k, v in page.form("/webhooks").fields.items() if not k.startswith("event_")}
    made = b.post("/webhooks", fields | {"url": "http://127.0.0.1:9/failing", "event_suppressed": "1"})
    assert made.status == 200
    hook_id = next(h["id"] for h in d.admin("webhook.list", tenant="acme") if h["url"].endswith("/failing"))
    token = _shown(b.submit(b.get("/keys"), "/keys", login="alice", role=""), "new-token")
    d.admin("suppression.add", tenant="acme", address="gone@dst.test")
    with d.smtp(login="apikey", password=token) as c:
        c.sendmail("alice@acme.test", ["gone@dst.test"], message("alice@acme.test", "gone@dst.test"))
    wait_until(lambda: any(h["id"] == hook_id and h["failing_since"] for h in d.admin("webhook.list", tenant="acme")),
               "the webhook failing")  # fmt: skip
    row = _row(b.get("/webhooks"), f"webhook-{hook_id}")
    assert "failing since" in row and "next attempt" in row and "last error:" in row and "never" in row
    b.post(f"/webhooks/{hook_id}/delete", {"csrf": _csrf(b)})
    d.admin("suppression.delete", tenant="acme", address="gone@dst.test")


def test_the_pages_speak_japanese(world: World) -> None:
    b = world.signed_in(world.person("acme", "admin"), "ja")
    assert "送信用の認証情報" in _text(b.get("/keys")) and "新しい Webhook" in _text(b.get("/webhooks"))
