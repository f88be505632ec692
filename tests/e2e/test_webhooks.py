"""Webhooks end to end: a real daemon posts its tenants' mail events to an HTTP receiver on
loopback, signed (checked here with hmac, independently of cmcd), filtered by event and tenant,
retried after a failure; the SSRF guard refuses private targets when allow_private is off.

Nothing here sends traffic off loopback: the one name that resolves to a public address is
only added (and checked) while its tenant has no events, then pointed at loopback or deleted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from click.testing import CliRunner

from cmcd.admin.cli import cli
from tests.conftest import AdminError, Cmcd, message
from tests.e2e.test_metrics import scrape
from tests.peers import DnsServer, Sink, free_port

METRICS_PORT = free_port()


@dataclass(frozen=True)
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def events(self) -> list[dict[str, Any]]:
        return list(json.loads(self.body)["events"])


class Receiver:
    """An HTTP server on 127.0.0.1 (in a thread) recording every POST; fail(path, n) answers the next
    N requests to PATH with 500."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self._failures: dict[str, int] = {}
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._cond:
                    left = receiver._failures.get(self.path, 0)
                    status = 500 if left else 204
                    if left:
                        receiver._failures[self.path] = left - 1
                    receiver.requests.append(Request(self.path, dict(self.headers), body, status))
                    receiver._cond.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def fail(self, path: str, n: int) -> None:
        with self._cond:
            self._failures[path] = n

    def at(self, path: str) -> list[Request]:
        with self._cond:
            return [r for r in self.requests if r.path == path]

    def wait(self, done: Callable[[list[Request]], bool], path: str, timeout: float = 20) -> list[Request]:
        with self._cond:
            ok = self._cond.wait_for(lambda: done([r for r in self.requests if r.path == path]), timeout)
            got = [r for r in self.requests if r.path == path]
        assert ok, f"receiver {path}: {[(r.status, [(e['event'], e['recipient']) for e in r.events]) for r in got]}"
        return got

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def delivered(requests: list[Request]) -> list[dict[str, Any]]:
    """Events of the requests that were answered 2xx, in order."""
    return [e for r in requests if r.status < 300 for e in r.events]


def verify(secret: str, request: Request) -> bool:
    """The receiver's check of X-Cmcd-Signature, written from the documented format."""
    parts = dict(p.split("=", 1) for p in request.headers["X-Cmcd-Signature"].split(","))
    mac = hmac.new(secret.encode(), parts["t"].encode() + b"." + request.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac, parts["v1"]) and abs(int(parts["t"]) - time.time()) < 300


def cmcctl(d: Cmcd, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--socket", str(d.root / "admin.sock"), *args])
    return result.exit_code, result.output


def send(d: Cmcd, login: str, sender: str, *rcpts: str) -> None:
    with d.smtp(login=login) as c:
        for rcpt in rcpts:
            c.sendmail(sender, [rcpt], message(sender, rcpt))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, ca: Any) -> Iterator[tuple[Cmcd, Receiver]]:
    """A daemon with webhooks allowed to loopback, delivering to a sink that bounces bounce*@ and
    defers defer*@ once; hooks.test resolves to 127.0.0.1 in its DNS server."""
    deferred: set[str] = set()

    def rcpt_reply(address: str) -> str | None:
        if address.startswith("bounce"):
            return "550 5.1.1 no such user"
        if address.startswith("defer") and address not in deferred:
            deferred.add(address)
            return "451 4.3.0 try again later"
        return None

    sink = Sink(rcpt_reply=rcpt_reply).start()
    receiver = Receiver()
    dns = DnsServer().start()
    dns.add("hooks.test", "A", "127.0.0.1")
    d = Cmcd(
        tmp_path_factory.mktemp("webhooks"),
        ca,
        {
            "api": {"listen": "127.0.0.1:0", "webhook_allow_private": True, "webhook_timeout": "3s"},
            "metrics": {"listen": f"127.0.0.1:{METRICS_PORT}"},
            "dns": {"nameservers": [dns.address], "timeout": "2s"},
            "delivery": {"enabled": True, "routes": {"*": f"127.0.0.1:{sink.port}"}, "retry_schedule": ["1s"]},
        },
    )
    d.start().provision()
    yield d, receiver
    assert d.stop() == 0
    assert not [line for line in d.log if "level=error" in line or "Traceback" in line or "exc=" in line]
    receiver.stop()
    sink.stop()
    dns.stop()


def test_events_signed_filtered_and_scoped_by_tenant(world: tuple[Cmcd, Receiver]) -> None:
    d, receiver = world
    acme = d.admin("webhook.add", tenant="acme", url=receiver.url("/acme"), events="delivered,bounced")
    beta = d.admin("webhook.add", tenant="beta", url=receiver.url("/beta", host="hooks.test"))
    assert acme["secret"].startswith("whsec_") and acme["events"] == ["delivered", "bounced"]
    assert beta["events"] == ["delivered", "deferred", "bounced", "expired", "suppressed", "unsubscribed"]
    assert "secret" not in json.dumps(d.admin("webhook.list", tenant="acme"))

    token = d.admin("apikey.add", tenant="acme", login="alice")["token"]
    body = {"from": "alice@acme.test", "to": ["tagged@dst.test"], "subject": "s", "text": "t", "tags": ["orders"]}
    status, _, reply = d.http("POST", "/v1/emails", body, token=token)
    assert status == 202, reply
    send(d, "alice", "alice@acme.test", "ok@dst.test", "bounce@dst.test", "defer@dst.test")
    send(d, "bob", "bob@beta.test", "beta-ok@dst.test", "bounce-beta@dst.test")

    want_acme = {("delivered", "tagged@dst.test"), ("delivered", "ok@dst.test"), ("bounced", "bounce@dst.test"),
                 ("delivered", "defer@dst.test")}  # fmt: skip
    got = receiver.wait(lambda rs: want_acme <= {(e["event"], e["recipient"]) for e in delivered(rs)}, "/acme")
    want_beta = {("delivered", "beta-ok@dst.test"), ("bounced", "bounce-beta@dst.test")}
    got_beta = receiver.wait(lambda rs: want_beta <= {(e["event"], e["recipient"]) for e in delivered(rs)}, "/beta")

    # a name is resolved by the daemon's resolver, connected to as checked, and sent as the Host
    assert {r.headers["Host"] for r in got_beta} == {f"hooks.test:{receiver.port}"}
    for requests, hook in ((got, acme), (got_beta, beta)):
        for r in requests:
            assert r.headers["Content-Type"] == "application/json"
            assert r.headers["X-Cmcd-Webhook-Id"] == str(hook["id"])
            assert verify(hook["secret"], r), r.headers
            assert not verify(beta["secret"] if hook is acme else acme["secret"], r)
    events = delivered(got)
    # only the subscribed events (defer@ was deferred once, and that event is not posted), only acme's
    assert {e["event"] for e in events} <= {"delivered", "bounced"}
    # acme's own messages, and the bounce report cmcd sent to alice (null sender)
    assert all(
        (e["sender"], e["recipient"]) == ("", "alice@acme.test") or e["sender"] == "alice@acme.test" for e in events
    ), events
    assert any(r["event"] == "deferred" and r["rcpt"] == "defer@dst.test" for r in d.mail_log())
    assert all("bob@beta.test" in (e["sender"], e["recipient"]) for e in delivered(got_beta))
    by_rcpt = {e["recipient"]: e for e in events}
    assert by_rcpt["tagged@dst.test"]["tags"] == ["orders"] and by_rcpt["tagged@dst.test"]["queue_id"] == reply["id"]
    bounce = by_rcpt["bounce@dst.test"]
    assert "5.1.1" in bounce["response"] and bounce["time"].endswith("Z") and bounce["queue_id"]
    assert {"id", "status", "mx", "attempt", "message_id"} <= set(bounce)
    ids = [e["id"] for e in events]
    assert ids == sorted(ids) and len(ids) == len(set(ids))

    # another tenant's webhook id is "not found", for delete and in listings
    with pytest.raises(AdminError, match="has no webhook"):
        d.admin("webhook.delete", tenant="beta", id=str(acme["id"]))
    assert [w["id"] for w in d.admin("webhook.list", tenant="beta")] == [beta["id"]]
    d.admin("webhook.delete", tenant="beta", id=str(beta["id"]))
    assert d.admin("webhook.list", tenant="beta") == []
    ops = [(o["action"], o["result"]) for o in d.ops_log()]
    assert ("webhook.add", "ok") in ops and ("webhook.delete", "refused") in ops and ("webhook.delete", "ok") in ops


def test_failed_batch_is_retried_and_status_shows_it(world: tuple[Cmcd, Receiver]) -> None:
    d, receiver = world
    receiver.fail("/retry", 1)
    hook = d.admin("webhook.add", tenant="acme", url=receiver.url("/retry"), events="delivered")
    send(d, "alice", "alice@acme.test", "retry1@dst.test", "retry2@dst.test")
    receiver.wait(lambda rs: len(rs) >= 1, "/retry")

    def status() -> dict[str, Any]:
        return next(w for w in d.admin("webhook.status", tenant="acme") if w["id"] == hook["id"])

    deadline = time.monotonic() + 10
    while status()["attempts"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    failing = status()
    assert failing["attempts"] == 1 and failing["failing_since"] and failing["last_error"].startswith("HTTP 500")
    assert failing["next_attempt"] > time.time() and failing["sent"] == 0
    code, out = cmcctl(d, "webhook", "status", "acme")
    assert code == 0 and "HTTP 500" in out and "FAILING SINCE" in out

    want = {"retry1@dst.test", "retry2@dst.test"}
    got = receiver.wait(lambda rs: want <= {e["recipient"] for e in delivered(rs)}, "/retry", timeout=15)
    assert got[0].status == 500
    # at-least-once: every event arrives; one that arrived in a 2xx batch is never sent again
    ok_ids = [e["id"] for e in delivered(got)]
    assert len(ok_ids) == len(set(ok_ids))
    assert {e["id"] for e in got[0].events} <= set(ok_ids)
    deadline = time.monotonic() + 5  # the receiver has the request; the daemon records the 2xx a moment later
    while status()["sent"] < len(ok_ids) and time.monotonic() < deadline:
        time.sleep(0.05)
    recovered = status()
    assert recovered["attempts"] == 0 and recovered["failing_since"] is None and recovered["last_success"]
    assert recovered["sent"] == len(ok_ids) and recovered["dropped"] == 0
    code, out = cmcctl(d, "webhook", "status", "acme")
    assert code == 0 and receiver.url("/retry") in out
    d.admin("webhook.delete", tenant="acme", id=str(hook["id"]))


def test_cmcctl_webhook_commands(world: tuple[Cmcd, Receiver]) -> None:
    d, receiver = world
    code, out = cmcctl(d, "webhook", "add", "beta", receiver.url("/cli"), "--events", "bounced,expired")
    assert code == 0, out
    assert "signing secret: whsec_" in out and "cannot show this secret again" in out
    code, listed = cmcctl(d, "webhook", "list", "beta")
    assert code == 0 and receiver.url("/cli") in listed and "bounced,expired" in listed and "whsec_" not in listed
    webhook_id = listed.splitlines()[1].split()[0]
    code, out = cmcctl(d, "webhook", "delete", "acme", webhook_id)
    assert code == 1 and "has no webhook" in out
    code, out = cmcctl(d, "webhook", "add", "beta", "ftp://127.0.0.1/")
    assert code == 1 and "https:// or http://" in out
    code, out = cmcctl(d, "webhook", "delete", "beta", webhook_id)
    assert code == 0 and f"deleted webhook {webhook_id}" in out


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, ca: Any) -> Iterator[tuple[Cmcd, DnsServer, Sink]]:
    """A daemon with the default SSRF guard (allow_private off), resolving through a DNS server on
    loopback and delivering to a sink."""
    dns = DnsServer().start()
    dns.add("private.hooks.test", "A", "10.0.0.5")
    dns.add("loop.hooks.test", "A", "127.0.0.1")
    dns.add("mixed.hooks.test", "A", "93.184.215.14").add("mixed.hooks.test", "AAAA", "::1")
    dns.add("public.hooks.test", "A", "93.184.215.14")
    sink = Sink().start()
    d = Cmcd(
        tmp_path_factory.mktemp("guarded"),
        ca,
        {
            "api": {"listen": "127.0.0.1:0"},
            "dns": {"nameservers": [dns.address], "timeout": "2s"},
            "delivery": {"enabled": True, "routes": {"*": f"127.0.0.1:{sink.port}"}},
        },
    )
    d.start().provision()
    yield d, dns, sink
    assert d.stop() == 0
    assert not [line for line in d.log if "level=error" in line or "Traceback" in line or "exc=" in line]
    sink.stop()
    dns.stop()


@pytest.mark.parametrize(
    ("url", "refusal"),
    [
        ("http://127.0.0.1:{port}/hook", "127.0.0.1 is a loopback address; set api.webhook_allow_private to allow"),
        ("http://[::1]:{port}/hook", "::1 is a loopback address"),
        ("https://private.hooks.test/hook", "resolves to 10.0.0.5, a private address; set api.webhook_allow_private"),
        ("https://loop.hooks.test:{port}/", "resolves to 127.0.0.1, a loopback address"),
        ("https://mixed.hooks.test/", "resolves to ::1, a loopback address"),
        ("https://nowhere.hooks.test/", "does not exist"),
        ("https://user:pw@public.hooks.test/", "user name or password"),
        ("file:///etc/passwd", "https:// or http://"),
    ],
    ids=["loopback-ip", "loopback-v6", "private-name", "loopback-name", "any-address", "nxdomain", "userinfo", "file"],
)
def test_guard_refuses_at_add(guarded: tuple[Cmcd, DnsServer, Sink], url: str, refusal: str) -> None:
    d, _, _ = guarded
    with pytest.raises(AdminError, match=refusal.replace("[", r"\[")):
        d.admin("webhook.add", tenant="acme", url=url.format(port=d.smtp_port))
    assert d.admin("webhook.list", tenant="acme") == []
    assert any(o["action"] == "webhook.add" and o["result"] == "refused" for o in d.ops_log())


def test_guard_applies_to_the_api_too(guarded: tuple[Cmcd, DnsServer, Sink]) -> None:
    d, _, _ = guarded
    d.admin("user.add", tenant="acme", login="guard-admin", role="admin", password="guard admin secret")
    token = d.admin("apikey.add", tenant="acme", login="guard-admin")["token"]
    for url in ("http://127.0.0.1:9/hook", "https://private.hooks.test/hook"):
        status, _, problem = d.http("POST", "/v1/webhooks", {"url": url}, token=token)
        assert status == 422 and problem["field"] == "url" and "webhook_allow_private" in problem["detail"]
        assert "10.0.0.5" not in problem["detail"]  # the daemon's resolver maps no names for tenants
    assert d.http("GET", "/v1/webhooks", token=token)[2] == {"data": []}


def test_guard_accepts_public_name_and_refuses_rebinding_at_send(guarded: tuple[Cmcd, DnsServer, Sink]) -> None:
    d, dns, sink = guarded
    hook = d.admin("webhook.add", tenant="beta", url="http://public.hooks.test:9/hook", events="delivered")
    assert hook["id"] and hook["sent"] == 0
    # the name now points at loopback (DNS rebinding): the request is refused before any connection
    dns.remove("public.hooks.test", "A")
    dns.add("public.hooks.test", "A", "127.0.0.1")
    send(d, "bob", "bob@beta.test", "rebind@dst.test")
    sink.wait_for(1)
    deadline = time.monotonic() + 15
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = d.admin("webhook.status", tenant="beta")[0]
        if state["attempts"]:
            break
        time.sleep(0.1)
    assert state["attempts"] == 1 and state["sent"] == 0, state
    assert "resolves to 127.0.0.1, a loopback address" in state["last_error"]
    d.admin("webhook.delete", tenant="beta", id=str(hook["id"]))


def test_tenant_admin_manages_webhooks_over_the_api(world: tuple[Cmcd, Receiver]) -> None:
    d, receiver = world
    for tenant, login in (("acme", "hook-admin"), ("beta", "beta-hook-admin")):
        d.admin("user.add", tenant=tenant, login=login, role="admin", password=f"{login} secret pw")
    admin = d.admin("apikey.add", tenant="acme", login="hook-admin")["token"]
    other = d.admin("apikey.add", tenant="beta", login="beta-hook-admin")["token"]
    sender = d.admin("apikey.add", tenant="acme", login="alice")["token"]
    body = {"url": receiver.url("/api"), "events": ["delivered"]}
    assert d.http("POST", "/v1/webhooks", body, token=sender)[0] == 403
    assert d.http("POST", "/v1/webhooks", {"url": receiver.url("/api"), "events": ["opened"]}, token=admin)[0] == 422
    status, _, hook = d.http("POST", "/v1/webhooks", body, token=admin)
    assert status == 201 and hook["secret"].startswith("whsec_") and hook["events"] == ["delivered"]
    send(d, "alice", "alice@acme.test", "api-hook@dst.test")
    got = receiver.wait(lambda rs: any(e["recipient"] == "api-hook@dst.test" for e in delivered(rs)), "/api")
    assert all(verify(hook["secret"], r) for r in got)
    listed = d.http("GET", "/v1/webhooks", token=admin)[2]["data"]
    mine = next(w for w in listed if w["id"] == hook["id"])
    assert mine["sent"] >= 1 and "secret" not in mine
    assert hook["id"] not in [w["id"] for w in d.http("GET", "/v1/webhooks", token=other)[2]["data"]]
    assert d.http("DELETE", f"/v1/webhooks/{hook['id']}", token=other)[0] == 404
    assert d.http("DELETE", "/v1/webhooks/99999999999999999999", token=admin)[0] == 404
    assert d.http("DELETE", f"/v1/webhooks/{hook['id']}", token=admin)[0] == 204
    assert hook["id"] not in [w["id"] for w in d.http("GET", "/v1/webhooks", token=admin)[2]["data"]]
    # /metrics: events posted so far, and the 500 of test_failed_batch_is_retried_and_status_shows_it
    figures = scrape(METRICS_PORT)
    assert figures.value("cmcd_webhook_events_total", result="sent") >= len(delivered(got))
    assert figures.value("cmcd_webhook_failures_total") >= 1
    assert figures.value("cmcd_webhook_events_total", result="dropped") == 0
    ops = [(o["action"], o["result"]) for o in d.ops_log() if o["action"].startswith("api.webhooks")]
    assert ("api.webhooks.add", "ok") in ops and ("api.webhooks.add", "refused") in ops
    assert ("api.webhooks.delete", "refused") in ops and ("api.webhooks.delete", "ok") in ops
    rows = [(o["target"], o["result"], o["detail"]) for o in d.ops_log() if o["action"] == "api.webhooks.add"]
    assert (f"webhook={hook['id']}", "ok", "delivered") in rows  # the row names the endpoint made


def test_a_tenant_has_at_most_ten_webhooks(world: tuple[Cmcd, Receiver]) -> None:
    d, receiver = world
    made = []
    for n in range(11):
        try:
            made.append(d.admin("webhook.add", tenant="beta", url=receiver.url(f"/cap{n}"), events="expired")["id"])
        except AdminError as exc:
            assert "the most allowed" in str(exc)
            break
    assert len(d.admin("webhook.list", tenant="beta")) == 10
    d.admin("user.add", tenant="beta", login="cap-admin", role="admin", password="cap admin secret")
    token = d.admin("apikey.add", tenant="beta", login="cap-admin")["token"]
    status, _, problem = d.http("POST", "/v1/webhooks", {"url": receiver.url("/cap-api")}, token=token)
    assert status == 409 and "the most allowed" in problem["detail"]
    for webhook_id in made:
        d.admin("webhook.delete", tenant="beta", id=str(webhook_id))
