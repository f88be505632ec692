"""The tenant HTTP API over real HTTPS on loopback: send, bulk send with merge fields, DKIM,
idempotency, refusals as problem details, records scoped by tenant, credentials and roles."""

from __future__ import annotations

import base64
import email
import email.policy
import signal
import socket
import ssl
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.conftest import Cmcd, strip_signatures
from tests.e2e.test_dkim import dkimpy_results, publish
from tests.e2e.test_metrics import scrape
from tests.peers import DnsServer, Sink, free_port

METRICS_PORT = free_port()


def _key(d: Cmcd, tenant: str, login: str, role: str | None = None) -> str:
    return str(d.admin("apikey.add", tenant=tenant, login=login, **({"role": role} if role else {}))["token"])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, ca: Any) -> Any:
    """One daemon with the API on, delivering to a sink; acme and beta each with keys of every role;
    acme.test's DKIM records published in a DNS server on loopback."""
    sink = Sink().start()
    dns = DnsServer().start()
    d = Cmcd(
        tmp_path_factory.mktemp("api"),
        ca,
        {
            "api": {"listen": "127.0.0.1:0", "max_bulk_bytes": "2MB"},
            "metrics": {"listen": f"127.0.0.1:{METRICS_PORT}"},
            "smtp": {"tenant_limits": {"gamma": {"messages_per_day": 5}, "delta": {"messages_per_second": 0.2}}},
            "delivery": {"enabled": True, "routes": {"*": f"127.0.0.1:{sink.port}"}, "retry_schedule": ["1s"]},
        },
    )
    d.start().provision()
    publish(d, dns)
    for tenant in ("gamma", "delta"):
        d.admin("tenant.add", name=tenant)
        d.admin("domain.add", tenant=tenant, domain=f"{tenant}.test")
        d.admin("user.add", tenant=tenant, login=f"{tenant}-app", role="sender", password=f"pw-{tenant}-app")
    d.admin("user.add", tenant="acme", login="acme-admin", role="admin", password="pw-acme-admin")
    d.admin("user.add", tenant="acme", login="acme-viewer", role="viewer", password="pw-acme-viewer")
    d.admin("user.add", tenant="beta", login="beta-admin", role="admin", password="pw-beta-admin")
    keys = {
        "acme-sender": _key(d, "acme", "alice"),
        "acme-viewer": _key(d, "acme", "acme-viewer"),
        "acme-admin": _key(d, "acme", "acme-admin"),
        "beta-sender": _key(d, "beta", "bob"),
        "beta-admin": _key(d, "beta", "beta-admin"),
        "gamma": _key(d, "gamma", "gamma-app"),
        "delta": _key(d, "delta", "delta-app"),
    }
    yield d, sink, dns, keys
    d.stop()
    sink.stop()
    dns.stop()


def _wait_delivered(sink: Sink, n: int, timeout: float = 30) -> list[Any]:
    return sink.wait_for(n, timeout)


def _verify(raw: bytes, dns: DnsServer) -> bool:
    """dkimpy passes both signatures (RSA and Ed25519) against the records in DNS."""
    return dkimpy_results(raw, dns.port) == ["rsa-sha256=pass", "ed25519-sha256=pass"]


def test_openapi_document_is_served(world: Any) -> None:
    d, *_ = world
    status, headers, doc = d.http("GET", "/v1/openapi.json")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert doc["openapi"].startswith("3.1")


def test_send_one_is_delivered_signed_and_byte_exact(world: Any) -> None:
    d, sink, dns, keys = world
    before = len(sink.messages)
    attachment = bytes(range(256)) * 4
    body = {
        "from": {"email": "alice@acme.test", "name": "Alice Ä"},
        "to": ["to1@dst.test"],
        "cc": ["cc1@dst.test"],
        "bcc": ["hidden@dst.test"],
        "subject": "Your order ✓",
        "text": "Hello\n.\nA line with a dot above.",
        "html": "<p>Hello</p>",
        "attachments": [{"filename": "a.bin", "content": base64.b64encode(attachment).decode()}],
        "headers": {"X-Order": "42"},
        "tags": ["orders", "eu"],
    }
    status, _, reply = d.http("POST", "/v1/emails", body, token=keys["acme-sender"])
    assert status == 202, reply
    assert reply["recipients"] == 3 and reply["id"]
    got = _wait_delivered(sink, before + 1)[before:]
    assert len(got) == 1
    msg = got[0]
    assert sorted(msg.rcpt_tos) == ["cc1@dst.test", "hidden@dst.test", "to1@dst.test"]
    assert b"hidden@dst.test" not in msg.data
    assert _verify(msg.data, dns)
    parsed = email.message_from_bytes(msg.data, policy=email.policy.default)
    assert parsed["Subject"] == "Your order ✓" and parsed["X-Order"] == "42"
    assert parsed["Message-ID"].strip("<>") == reply["message_id"].strip("<>")
    parts = {p.get_content_type(): p for p in parsed.walk()}
    assert parts["application/octet-stream"].get_content() == attachment
    assert "A line with a dot above." in parts["text/plain"].get_content()
    assert "with HTTPS id " + reply["id"] in strip_signatures(msg.data).decode()


def test_bulk_fills_merge_fields_and_escapes_html(world: Any) -> None:
    d, sink, dns, keys = world
    before = len(sink.messages)
    recipients = [
        {"to": f"user{i}@bulk.test", "merge": {"name": f"User {i}", "code": f"<b>{i}</b>&"}} for i in range(20)
    ]
    body = {
        "from": "alice@acme.test",
        "subject": "Hi {{name}}",
        "text": "Dear {{ name }}, your code is {{code}}.",
        "html": "<p>Dear {{name}}, code {{code}}</p>",
        "recipients": recipients,
        "tags": ["bulk"],
    }
    status, _, reply = d.http("POST", "/v1/emails/bulk", body, token=keys["acme-sender"])
    assert status == 202, reply
    assert reply["count"] == 20 and [m["index"] for m in reply["messages"]] == list(range(20))
    got = _wait_delivered(sink, before + 20)[before:]
    by_rcpt = {m.rcpt_tos[0]: m for m in got}
    assert len(by_rcpt) == 20
    for i in (0, 7, 19):
        raw = by_rcpt[f"user{i}@bulk.test"].data
        assert _verify(raw, dns)
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        assert parsed["Subject"] == f"Hi User {i}"
        parts = {p.get_content_type(): p.get_content() for p in parsed.walk() if not p.is_multipart()}
        assert f"Dear User {i}, your code is <b>{i}</b>&." in parts["text/plain"]
        assert f"code &lt;b&gt;{i}&lt;/b&gt;&amp;</p>" in parts["text/html"]


def test_idempotent_retry_sends_once(world: Any) -> None:
    d, sink, _, keys = world
    body = {"from": "alice@acme.test", "to": ["idem@dst.test"], "subject": "once", "text": "once"}
    headers = {"Idempotency-Key": "order-7781-confirmation"}
    before = scrape(METRICS_PORT).labelled("cmcd_messages_accepted", "tenant")
    first = d.http("POST", "/v1/emails", body, token=keys["acme-sender"], headers=headers)
    again = d.http("POST", "/v1/emails", body, token=keys["acme-sender"], headers=headers)
    assert first[0] == again[0] == 202
    assert first[2] == again[2]
    assert again[1].get("Idempotent-Replayed") == "true"
    changed = dict(body, subject="twice")
    status, _, problem = d.http("POST", "/v1/emails", changed, token=keys["acme-sender"], headers=headers)
    assert status == 422 and problem["type"].endswith("idempotency-key-reused")
    # another tenant may use the same key for its own request
    other = dict(body, **{"from": "bob@beta.test"})
    theirs = d.http("POST", "/v1/emails", other, token=keys["beta-sender"], headers=headers)
    assert theirs[0] == 202
    # counted before the 202: acme's replay and refused change queued nothing more
    after = scrape(METRICS_PORT).labelled("cmcd_messages_accepted", "tenant")
    assert after["acme"] == before.get("acme", 0) + 1 and after["beta"] == before.get("beta", 0) + 1
    sent = {first[2]["id"], theirs[2]["id"]}
    d.wait_mail_log(lambda rows: {r["queue_id"] for r in rows if r["event"] == "delivered"} >= sent)
    assert sum(1 for m in sink.messages if m.rcpt_tos == ["idem@dst.test"]) == 2  # acme once, beta once
    rows = d.mail_log()
    assert sum(1 for r in rows if r["queue_id"] == first[2]["id"] and r["event"] == "accepted") == 1


@pytest.mark.parametrize(
    ("body", "status", "slug", "field"),
    [
        ({"from": "bob@beta.test", "to": ["x@dst.test"], "subject": "s", "text": "t"}, 403, "sender-domain", "from"),
        ({"from": "alice@acme.test", "to": ["x@[127.0.0.1]"], "subject": "s", "text": "t"}, 422, "invalid", "to[0]"),
        ({"from": "alice@acme.test", "to": [f"x{i}@d.test" for i in range(11)], "subject": "s", "text": "t"}, 422,
         "invalid", "to"),
        ({"from": "alice@acme.test", "to": ["x@dst.test"], "subject": "s", "text": "t", "headers": {"Bcc": "y@z.test"}},
         422, "invalid", "headers.Bcc"),
        ({"from": "alice@acme.test", "to": ["x@dst.test"], "subject": "s"}, 422, "invalid", None),
        ({"from": "alice@acme.test", "to": ["x@dst.test"], "subject": "s", "text": "t", "bogus": 1}, 422, "invalid",
         None),
    ],
)  # fmt: skip
def test_refusals_are_problem_details(
    world: Any, body: dict[str, Any], status: int, slug: str, field: str | None
) -> None:
    d, _, _, keys = world
    got, headers, problem = d.http("POST", "/v1/emails", body, token=keys["acme-sender"])
    assert got == status, problem
    assert headers["Content-Type"].startswith("application/problem+json")
    assert problem["status"] == status and problem["type"] == f"urn:cmcd:problem:{slug}" and problem["detail"]
    if field is not None:
        assert problem.get("field") == field


def test_bad_requests(world: Any) -> None:
    d, _, _, keys = world
    assert d.http("POST", "/v1/emails", raw=b"{not json", token=keys["acme-sender"])[0] == 400
    status, headers, _ = d.http("POST", "/v1/emails", {"x": 1})
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert d.http("POST", "/v1/emails", {"x": 1}, token="cmk_aaaaaaaaaaaa_nope")[0] == 401
    assert d.http("GET", "/v1/nothing", token=keys["acme-sender"])[0] == 404
    assert d.http("DELETE", "/v1/emails", token=keys["acme-sender"])[0] == 405


def test_roles(world: Any) -> None:
    d, _, _, keys = world
    body = {"from": "alice@acme.test", "to": ["role@dst.test"], "subject": "s", "text": "t"}
    assert d.http("POST", "/v1/emails", body, token=keys["acme-viewer"])[0] == 403
    assert d.http("GET", "/v1/deliveries", token=keys["acme-sender"])[0] == 403
    assert d.http("GET", "/v1/deliveries", token=keys["acme-viewer"])[0] == 200
    assert d.http("POST", "/v1/blocks", {"address": "x@dst.test"}, token=keys["acme-viewer"])[0] == 403
    with pytest.raises(Exception, match="only an admin user"):
        d.admin("apikey.add", tenant="acme", login="alice", role="admin")


def test_revoked_key_is_refused(world: Any) -> None:
    d, _, _, _ = world
    token = _key(d, "acme", "alice")
    key_id = token.split("_")[1]
    assert d.http("GET", "/v1/blocks", token=token)[0] == 403  # a sender key: authenticated, not allowed
    d.admin("apikey.revoke", tenant="acme", key_id=key_id)
    assert d.http("GET", "/v1/blocks", token=token)[0] == 401
    listed = {k["key_id"]: k for k in d.admin("apikey.list", tenant="acme")}
    assert listed[key_id]["revoked"] is not None
    with pytest.raises(Exception, match="no active API key"):
        d.admin("apikey.revoke", tenant="beta", key_id=key_id)  # another tenant's key
    assert "token" not in str(d.admin("apikey.list", tenant="acme"))


def test_records_are_scoped_by_tenant_and_paged(world: Any) -> None:
    d, sink, _, keys = world
    for i in range(3):
        body = {"from": "alice@acme.test", "to": [f"rec{i}@dst.test"], "subject": "r", "text": "r", "tags": ["rec"]}
        assert d.http("POST", "/v1/emails", body, token=keys["acme-sender"])[0] == 202
    body = {"from": "bob@beta.test", "to": ["betarec@dst.test"], "subject": "r", "text": "r", "tags": ["rec"]}
    beta_id = d.http("POST", "/v1/emails", body, token=keys["beta-sender"])[2]["id"]
    deadline = time.monotonic() + 20
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        status, _, page = d.http("GET", "/v1/deliveries?tag=rec&status=delivered", token=keys["acme-viewer"])
        assert status == 200
        rows = page["data"]
        if len(rows) == 3:
            break
        time.sleep(0.3)
    assert sorted(r["recipient"] for r in rows) == ["rec0@dst.test", "rec1@dst.test", "rec2@dst.test"]
    assert all(r["tags"] == ["rec"] and r["event"] == "delivered" for r in rows)
    # paging: one row a page, cursor to the next, the same rows in the same order
    seen, cursor = [], ""
    for _ in range(10):
        q = "/v1/deliveries?tag=rec&status=delivered&limit=1" + (f"&cursor={cursor}" if cursor else "")
        page = d.http("GET", q, token=keys["acme-viewer"])[2]
        seen += [r["recipient"] for r in page["data"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == [r["recipient"] for r in rows]
    # beta's message is invisible to acme, by queue id too; beta sees it
    assert d.http("GET", f"/v1/deliveries?queue_id={beta_id}", token=keys["acme-viewer"])[2]["data"] == []
    deadline = time.monotonic() + 10
    while not d.http("GET", f"/v1/deliveries?queue_id={beta_id}", token=keys["beta-admin"])[2]["data"]:
        assert time.monotonic() < deadline, "beta never saw its own message"
        time.sleep(0.2)
    csv_status, headers, text = d.http(
        "GET", "/v1/deliveries?tag=rec&status=delivered&format=csv", token=keys["acme-viewer"]
    )
    assert csv_status == 200 and headers["Content-Type"].startswith("text/csv")
    assert text.splitlines()[0].startswith("time,queue_id,event") and len(text.strip().splitlines()) == 4
    assert d.http("GET", "/v1/deliveries?since=yesterday", token=keys["acme-viewer"])[0] == 400
    assert d.http("GET", "/v1/deliveries?cursor=@@", token=keys["acme-viewer"])[0] == 400


def test_blocks_and_audit(world: Any) -> None:
    d, _, _, keys = world
    status, _, reply = d.http("POST", "/v1/blocks", {"address": "blocked@dst.test"}, token=keys["acme-admin"])
    assert status == 201 and reply["added"] is True
    acme = d.http("GET", "/v1/blocks", token=keys["acme-admin"])[2]["data"]
    assert [b["address"] for b in acme] == ["blocked@dst.test"]
    assert d.http("GET", "/v1/blocks", token=keys["beta-admin"])[2]["data"] == []
    assert d.http("DELETE", "/v1/blocks/blocked@dst.test", token=keys["beta-admin"])[0] == 404
    assert d.http("DELETE", "/v1/blocks/blocked@dst.test", token=keys["acme-admin"])[0] == 204
    assert d.http("GET", "/v1/blocks", token=keys["acme-admin"])[2]["data"] == []
    audit = d.http("GET", "/v1/audit", token=keys["acme-admin"])[2]["data"]
    actions = [a["action"] for a in audit]
    assert "api.blocks.add" in actions and "api.blocks.delete" in actions and "api.emails.send" in actions
    blocks = {(a["action"], a["target"], a["result"], a["detail"]) for a in audit}
    assert {("api.blocks.add", "1 address", "ok", "added"), ("api.blocks.delete", "1 address", "ok", "")} <= blocks
    assert all(a["actor"].startswith("api:") or a["actor"] for a in audit)
    beta_audit = d.http("GET", "/v1/audit", token=keys["beta-admin"])[2]["data"]
    assert not any(a["action"] == "api.blocks.add" for a in beta_audit)
    logins = d.http("GET", "/v1/audit?log=login", token=keys["acme-admin"])[2]["data"]
    assert all("login" in r for r in logins)


def test_totp_enrolment_and_session_login(world: Any) -> None:
    """Enrol acme-admin (the provisioning URI, confirmed by a first code from pyotp, a second
    TOTP implementation), log in with password + code for a session token, use it; a reused code,
    a wrong password, a sender without TOTP and a used recovery code are refused and logged."""
    pyotp = pytest.importorskip("pyotp")
    d, _, _, _ = world
    enrol = d.admin("user.otp-enroll", tenant="acme", login="acme-admin")
    assert enrol["uri"].startswith("otpauth://totp/") and enrol["secret"] in enrol["uri"]
    otp = pyotp.TOTP(enrol["secret"])
    now = time.time()
    with pytest.raises(Exception, match="does not match"):
        d.admin(
            "user.otp-confirm",
            tenant="acme",
            login="acme-admin",
            code="000000" if otp.at(now) != "000000" else "111111",
        )
    confirmed = d.admin("user.otp-confirm", tenant="acme", login="acme-admin", code=otp.at(now - 30))  # the last step
    codes = confirmed["recovery_codes"]
    assert len(codes) == 10 and len(set(codes)) == 10
    with pytest.raises(Exception, match="already enrolled"):
        d.admin("user.otp-enroll", tenant="acme", login="acme-admin")

    login = {"login": "acme-admin", "password": "pw-acme-admin"}
    status, _, session = d.http("POST", "/v1/sessions", dict(login, otp=otp.at(time.time())))
    assert status == 201, session
    token = session["token"]
    assert d.http("GET", "/v1/blocks", token=token)[0] == 200
    # the same code again (replay), a wrong password, and a recovery code used twice
    assert d.http("POST", "/v1/sessions", dict(login, otp=otp.at(time.time())))[0] == 401
    assert d.http("POST", "/v1/sessions", {"login": "acme-admin", "password": "wrong", "otp": "123456"})[0] == 401
    assert d.http("POST", "/v1/sessions", dict(login, recovery_code=codes[0].upper()))[0] == 201
    assert d.http("POST", "/v1/sessions", dict(login, recovery_code=codes[0]))[0] == 401
    # a sender has no TOTP and cannot get a session
    assert (
        d.http("POST", "/v1/sessions", {"login": "alice", "password": "correct horse battery", "otp": "123456"})[0]
        == 401
    )
    # the logins are in the login log, with the tenant
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = [r for r in d.login_log() if r["mechanism"] == "API-SESSION"]
        if len(rows) >= 6:
            break
        time.sleep(0.2)
    results = [(r["login"], r["result"]) for r in rows]
    assert results.count(("acme-admin", "ok")) == 2 and ("acme-admin", "fail") in results
    # disabling TOTP ends the sessions
    d.admin("user.otp-disable", tenant="acme", login="acme-admin")
    assert d.http("GET", "/v1/blocks", token=token)[0] == 401


def test_otp_enroll_prints_a_qr_code(world: Any) -> None:
    d, _, _, _ = world
    d.admin("user.add", tenant="acme", login="qr-admin", role="admin", password="pw-qr-admin-1")
    proc = subprocess.run(
        [sys.executable, "-m", "cmcd.admin.cli", "--socket", str(d.root / "admin.sock"), "user", "otp-enroll", "acme", "qr-admin"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("provisioning URI: otpauth://totp/") for line in lines)
    qr = [line for line in lines if "█" in line or "▀" in line or "▄" in line]
    assert len(qr) >= 10 and len({len(line) for line in qr}) == 1  # a square block of the same width
    with pytest.raises(Exception, match="only admins and viewers"):
        d.admin("user.otp-enroll", tenant="acme", login="alice")


def test_tenant_admin_manages_users_and_keys(world: Any) -> None:
    """An admin adds a user (password generated, shown once) and a key for it, the key works for
    its role, then revokes it and deletes the user; another tenant's admin sees none of it and
    cannot touch it; non-admins are refused; every change is in the operation log."""
    d, _, _, keys = world
    admin, other = keys["acme-admin"], keys["beta-admin"]
    status, _, user = d.http("POST", "/v1/users", {"login": "reporting", "role": "viewer"}, token=admin)
    assert status == 201 and user["role"] == "viewer" and len(user["password"]) >= 16
    assert user["created"].startswith(time.strftime("%Y-", time.gmtime()))
    status, _, problem = d.http("POST", "/v1/users", {"login": "bob"}, token=admin)  # beta's login
    assert status == 409 and "not available" in problem["detail"] and "exists" not in problem["detail"]
    assert d.http("POST", "/v1/users", {"login": "x y"}, token=admin)[0] == 422
    assert d.http("POST", "/v1/users", {"login": "n", "role": "root"}, token=admin)[0] == 422
    assert "reporting" in [u["login"] for u in d.http("GET", "/v1/users", token=admin)[2]["data"]]
    assert "reporting" not in [u["login"] for u in d.http("GET", "/v1/users", token=other)[2]["data"]]
    status, _, key = d.http("POST", "/v1/apikeys", {"login": "reporting"}, token=admin)
    assert status == 201 and key["role"] == "viewer" and key["token"].startswith("cmk_")
    assert d.http("GET", "/v1/deliveries?limit=1", token=key["token"])[0] == 200
    assert d.http("POST", "/v1/apikeys", {"login": "reporting", "role": "admin"}, token=admin)[0] == 422
    assert d.http("POST", "/v1/apikeys", {"login": "reporting"}, token=other)[0] == 404  # not beta's user
    assert d.http("DELETE", f"/v1/apikeys/{key['key_id']}", token=other)[0] == 404
    listed = d.http("GET", "/v1/apikeys", token=admin)[2]["data"]
    assert key["key_id"] in [k["key_id"] for k in listed] and "token" not in str(listed)
    assert d.http("DELETE", f"/v1/apikeys/{key['key_id']}", token=admin)[0] == 204
    assert d.http("GET", "/v1/deliveries?limit=1", token=key["token"])[0] == 401
    assert d.http("DELETE", "/v1/users/reporting", token=other)[0] == 404
    assert d.http("GET", "/v1/users", token=keys["acme-sender"])[0] == 403
    assert d.http("DELETE", "/v1/users/reporting", token=admin)[0] == 204
    assert d.http("DELETE", "/v1/users/acme-admin", token=admin)[0] == 409  # not yourself
    actions = [
        (o["action"], o["result"])
        for o in d.ops_log()
        if o["action"].startswith("api.users") or o["action"].startswith("api.apikeys")
    ]
    assert ("api.users.add", "ok") in actions and ("api.users.add", "refused") in actions
    assert ("api.apikeys.revoke", "ok") in actions and ("api.users.delete", "ok") in actions
    assert ("api.apikeys.add", "refused") in actions and ("api.users.delete", "refused") in actions
    # one row per change, written by the tenancy command, in the API's words: the key it made by id
    rows = {(o["action"], o["target"], o["result"]): o for o in d.ops_log() if o["actor"].startswith("api:")}
    added = rows[("api.users.add", "reporting", "ok")]
    assert added["actor"].startswith("api:acme-admin (") and added["detail"] == "role=viewer"
    assert rows[("api.apikeys.add", f"reporting {key['key_id']}", "ok")]["detail"] == "role=viewer"
    assert ("api.apikeys.revoke", key["key_id"], "ok") in rows and ("api.users.delete", "reporting", "ok") in rows
    assert len([o for o in d.ops_log() if (o["action"], o["target"]) == ("api.users.delete", "reporting")]) == 2


def test_api_requests_are_counted_in_metrics(world: Any) -> None:
    d, _, _, keys = world
    before = scrape(METRICS_PORT)
    route = {"route": "/v1/blocks", "code": "200"}
    start = before.value("cmcd_api_requests_total", **route) if "cmcd_api_requests" in before.families else 0.0
    for _ in range(3):
        assert d.http("GET", "/v1/blocks", token=keys["acme-admin"])[0] == 200
    assert d.http("GET", "/v1/nothing", token=keys["acme-admin"])[0] == 404
    after = scrape(METRICS_PORT)
    assert after.value("cmcd_api_requests_total", **route) == start + 3
    assert after.value("cmcd_api_requests_total", route="unmatched", code="404") >= 1


def _served_certificate(d: Cmcd, *, version: ssl.TLSVersion | None = None) -> bytes:
    ctx = d.client_context()
    ctx.check_hostname = False
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    with socket.create_connection(("127.0.0.1", d.api_port), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
        cert = tls.getpeercert(binary_form=True)
        assert cert is not None
        return cert


def test_api_certificate_reloads_on_sighup(world: Any) -> None:
    """(Protocols and ciphers of the API's TLS: test_tls_scan.py runs sslscan against it.)"""
    d, _, _, keys = world
    before = _served_certificate(d, version=ssl.TLSVersion.TLSv1_2)
    fresh = d.ca.issue_cert("renewed.test", "127.0.0.1", "localhost")
    fresh.cert_chain_pems[0].write_to_path(str(d.root / "tls" / "cert.pem"))
    fresh.private_key_pem.write_to_path(str(d.root / "tls" / "key.pem"))
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    d.wait_log("event=reloaded")
    after = _served_certificate(d)
    assert after != before and b"renewed.test" in after
    assert d.http("GET", "/v1/blocks", token=keys["acme-admin"])[0] == 200


def test_quota_and_rate_limits_apply_to_the_api(world: Any) -> None:
    """gamma may send 5 messages a day: a bulk send of 6 is refused whole (nothing queued), one of
    5 passes, the next message is refused. delta may send 0.2 a second: a request is admitted and
    charged for all its messages, the next one within the window gets 429 with Retry-After (with
    workers: once the worker it lands on has had its share)."""
    d, _, _, keys = world

    def bulk(n: int, tenant: str) -> tuple[int, dict[str, str], Any]:
        recipients = [{"to": f"q{i}@dst.test", "merge": {}} for i in range(n)]
        body = {"from": f"app@{tenant}.test", "subject": "q", "text": "q", "recipients": recipients}
        return d.http("POST", "/v1/emails/bulk", body, token=keys[tenant])

    accepted_before = scrape(METRICS_PORT).labelled("cmcd_messages_accepted", "tenant").get("gamma", 0)
    status, headers, problem = bulk(6, "gamma")
    assert status == 429 and problem["type"].endswith("daily-quota") and "smtp" in problem
    assert problem["smtp"].startswith("550 5.7.1") and headers.get("Retry-After")
    assert bulk(5, "gamma")[0] == 202
    assert bulk(1, "gamma")[0] == 429
    gamma_id = next(t["id"] for t in d.admin("tenant.list") if t["name"] == "gamma")
    d.wait_mail_log(lambda rows: len([r for r in rows if r["tenant_id"] == gamma_id]) >= 5)
    # counted before each reply: a wrongly queued sixth message would show here
    assert scrape(METRICS_PORT).labelled("cmcd_messages_accepted", "tenant")["gamma"] == accepted_before + 5
    assert len([r for r in d.mail_log() if r["tenant_id"] == gamma_id and r["event"] == "accepted"]) == 5

    # each worker holds its share of delta's rate: every request (a connection of its own) lands on
    # some worker, and by the workers' count + 1 one of them has had its share
    workers = len(d.admin("status").get("workers") or [0])
    statuses = []
    for _ in range(workers + 1):
        status, headers, problem = bulk(3, "delta")
        statuses.append(status)
        if status != 202:
            break
    assert statuses[0] == 202 and statuses[-1] == 429, statuses
    assert problem["type"].endswith("rate-limit") and headers["Retry-After"]
    assert problem["smtp"].startswith("451 4.7.1")


def test_request_size_guards(world: Any) -> None:
    """A bulk request may not build more than api.max_bulk_bytes of messages, a merge value used
    many times may not blow a message past the size limit before it is built, an anonymous login
    body is small, and JSON nested past the parser's depth is a 400, not a 500."""
    d, _, _, keys = world
    attachment = base64.b64encode(b"x" * 700_000).decode()
    recipients = [{"to": f"big{i}@dst.test"} for i in range(3)]
    body = {"from": "alice@acme.test", "subject": "s", "text": "t", "recipients": recipients,
            "attachments": [{"filename": "a.bin", "content": attachment}]}  # fmt: skip
    status, _, problem = d.http("POST", "/v1/emails/bulk", body, token=keys["acme-sender"])
    assert status == 422 and problem["field"] == "recipients" and "fewer recipients" in problem["detail"]
    amplified = {"from": "alice@acme.test", "subject": "s", "text": "{{a}}" * 3000,
                 "recipients": [{"to": "amp@dst.test", "merge": {"a": "y" * 10_000}}]}  # fmt: skip
    status, _, problem = d.http("POST", "/v1/emails/bulk", amplified, token=keys["acme-sender"])
    assert status == 422 and problem["field"] == "recipients[0].merge", problem
    big_login = {"login": "x" * 5000, "password": "p", "otp": "123456"}
    assert d.http("POST", "/v1/sessions", big_login)[0] == 413
    nested = b"[" * 100_000 + b"]" * 100_000
    status, _, problem = d.http("POST", "/v1/emails", raw=nested, token=keys["acme-sender"])
    assert status == 400 and problem["type"].endswith("bad-json")
    assert not [line for line in d.log if "Traceback" in line]


def test_csv_cells_never_start_a_formula(world: Any) -> None:
    d, sink, _, keys = world
    body = {"from": "alice@acme.test", "to": ["=1+2@dst.test"], "subject": "s", "text": "t", "tags": ["csv"]}
    assert d.http("POST", "/v1/emails", body, token=keys["acme-sender"])[0] == 202
    deadline = time.monotonic() + 20
    text = ""
    while time.monotonic() < deadline:
        text = d.http("GET", "/v1/deliveries?tag=csv&format=csv", token=keys["acme-viewer"])[2] or ""
        if "'=1+2@dst.test" in text:
            break
        time.sleep(0.2)
    assert "'=1+2@dst.test" in text and ",=1+2@" not in text


def test_a_valid_key_works_from_an_address_the_throttle_holds(world: Any) -> None:
    """(Last in this module: it leaves 127.0.0.1 throttled for bad credentials.) Guessing keys
    from an address stops at auth_fail_limit; an application with a valid key behind the same
    address (a shared NAT) goes on working."""
    d, _, _, keys = world
    statuses = [d.http("GET", "/v1/blocks", token="cmk_aaaaaaaaaaaa_guess")[0] for _ in range(12)]
    assert set(statuses) <= {401, 429} and statuses[-2:] == [429, 429]  # earlier tests' failures count too
    assert d.http("GET", "/v1/blocks", token=keys["acme-admin"])[0] == 200


def test_bad_one_time_codes_pause_the_user_whatever_the_address(make_cmcd: Any) -> None:
    """The password is known to whoever reaches the second factor: ten bad codes within 15 minutes
    pause that user's logins, even with a good code, even when the address throttle is off. The
    pause answers like any failed login (a different answer would tell a guessed password right).
    Each request is a connection of its own, which the kernel gives to any worker: the bad codes
    are counted in the store, so the pause is the host's, not one worker's."""
    pyotp = pytest.importorskip("pyotp")
    d = make_cmcd({"api": {"listen": "127.0.0.1:0"}, "smtp": {"auth_fail_limit": 0}})
    d.admin("user.add", tenant="acme", login="boss", role="admin", password="boss secret pw")
    otp = pyotp.TOTP(d.admin("user.otp-enroll", tenant="acme", login="boss")["secret"])
    d.admin("user.otp-confirm", tenant="acme", login="boss", code=otp.at(time.time() - 30))
    login = {"login": "boss", "password": "boss secret pw"}
    good = otp.at(time.time())
    bad = "000000" if good != "000000" else "111111"
    for _ in range(10):
        assert d.http("POST", "/v1/sessions", dict(login, otp=bad))[0] == 401
    status, _, problem = d.http("POST", "/v1/sessions", dict(login, otp=good))
    assert (status, problem) == d.http("POST", "/v1/sessions", dict(login, password="wrong", otp=good))[::2]
    assert status == 401 and problem["type"] == "urn:cmcd:problem:login-failed"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(r["result"] == "throttled" for r in d.login_log()):
        time.sleep(0.2)
    assert any(r["login"] == "boss" and r["result"] == "throttled" for r in d.login_log())
