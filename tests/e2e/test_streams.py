"""Message streams where tenants and operators see and choose them, on the real daemon over loopback:
the API's `stream` field (each endpoint's default, its refusals), the stream on /v1/deliveries and
/v1/bounces (and their ?stream= filter), webhook events, /v1/users and /v1/blocks (a suppression's
scope), `cmcctl user set-stream` deciding what a user's SMTP mail is, `cmcctl log mail --stream`,
the console's mail log, users and blocks pages, and cmcd_stream_events_total."""

from __future__ import annotations

import csv
import email
import email.policy
import hashlib
import io
import json
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from click.testing import CliRunner

from cmcd.admin.cli import cli
from tests.conftest import PASSWORD, AdminError, Cmcd, message, wait_until
from tests.e2e.test_console import Person, World
from tests.e2e.test_metrics import scrape_until
from tests.e2e.test_webhooks import Receiver, delivered
from tests.peers import Received, Sink, free_port

METRICS_PORT = free_port()
ONE_CLICK = "List-Unsubscribe=One-Click"


@dataclass
class Streams:
    d: Cmcd
    sink: Sink
    receiver: Receiver
    sender: str  # alice's API key (sender)
    viewer: str  # a viewer's API key
    admin: str  # an admin's API key
    console: World


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, ca: Any) -> Iterator[Streams]:
    """A daemon with the API, metrics and webhooks (to loopback) on, delivering to a sink; acme's
    webhook takes every event."""
    sink = Sink().start()
    receiver = Receiver()
    d = Cmcd(
        tmp_path_factory.mktemp("streams"),
        ca,
        {
            "api": {"listen": "127.0.0.1:0", "webhook_allow_private": True, "webhook_timeout": "3s"},
            "metrics": {"listen": f"127.0.0.1:{METRICS_PORT}"},
            "delivery": {"enabled": True, "routes": {"*": f"127.0.0.1:{sink.port}"}, "retry_schedule": ["1s"]},
        },
    )
    d.start().provision()
    d.admin("user.add", tenant="acme", login="acme-reader", role="viewer", password=PASSWORD)
    d.admin("user.add", tenant="acme", login="acme-boss", role="admin", password=PASSWORD)
    d.admin("webhook.add", tenant="acme", url=receiver.url("/acme"))
    console = World(d, Person("acme", "", ""), Person("beta", "", ""))
    keys = [
        d.admin("apikey.add", tenant="acme", login=login)["token"] for login in ("alice", "acme-reader", "acme-boss")
    ]
    yield Streams(d, sink, receiver, *keys, console)
    assert d.stop() == 0
    assert not [line for line in d.log if "level=error" in line or "Traceback" in line]
    receiver.stop()
    sink.stop()


def fields(raw: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def one_click_path(raw: bytes) -> str:
    """The path of the https URI in a delivered List-Unsubscribe field (its host is the configured one)."""
    (url,) = re.findall(r"<(https://[^>]+)>", str(fields(raw)["List-Unsubscribe"]))
    return urllib.parse.urlsplit(url).path


def arrived(w: Streams, rcpt: str) -> Received:
    """The one message the sink got for RCPT, waiting for it."""
    found = wait_until(lambda: [m for m in w.sink.messages if rcpt in m.rcpt_tos], f"a message for {rcpt}", 30)
    assert len(found) == 1, [m.rcpt_tos for m in found]
    return found[0]


def records(w: Streams, path: str, **query: str) -> list[dict[str, Any]]:
    status, _, page = w.d.http("GET", f"{path}?{urllib.parse.urlencode(query)}", token=w.viewer)
    assert status == 200, page
    return list(page["data"])


def delivered_rows(w: Streams, queue_ids: set[str]) -> list[dict[str, Any]]:
    """The /v1/deliveries rows of QUEUE_IDS once each has its delivered row."""

    def rows() -> list[dict[str, Any]] | None:
        got = [r for qid in sorted(queue_ids) for r in records(w, "/v1/deliveries", queue_id=qid)]
        done = {r["queue_id"] for r in got if r["event"] == "delivered"}
        return got if done == queue_ids else None

    return list(wait_until(rows, f"delivered rows of {sorted(queue_ids)}", 30))


def cmcctl(d: Cmcd, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--socket", str(d.root / "admin.sock"), *args])
    return result.exit_code, result.output


def test_api_defaults_per_endpoint_reach_the_records_and_the_recipients(world: Streams) -> None:
    w, d = world, world.d
    receipt_body = {"from": "alice@acme.test", "to": ["t1@dst.test"], "cc": ["t2@dst.test"], "subject": "Receipt",
                    "text": "paid"}  # fmt: skip
    status, _, receipt = d.http("POST", "/v1/emails", receipt_body, token=w.sender)
    assert status == 202 and receipt["stream"] == "transactional" and receipt["recipients"] == 2, receipt
    news = {"from": "alice@acme.test", "subject": "News {{n}}", "text": "issue {{n}}",
            "recipients": [{"to": "n1@dst.test", "merge": {"n": "1"}},
                           {"to": "n2@dst.test", "merge": {"n": "2"}}]}  # fmt: skip
    status, _, bulk = d.http("POST", "/v1/emails/bulk", news, token=w.sender)
    assert status == 202 and bulk["stream"] == "broadcast" and bulk["count"] == 2, bulk
    status, _, chosen = d.http("POST", "/v1/emails", {"from": "alice@acme.test", "to": ["solo@dst.test"],
                               "subject": "Notice", "text": "n", "stream": "broadcast"}, token=w.sender)  # fmt: skip
    assert status == 202 and chosen["stream"] == "broadcast", chosen
    status, _, merged = d.http("POST", "/v1/emails/bulk", news | {"stream": "transactional", "recipients": [
                               {"to": "m1@dst.test", "merge": {"n": "3"}}]}, token=w.sender)  # fmt: skip
    assert status == 202 and merged["stream"] == "transactional", merged

    # at the recipients: a broadcast carries its recipient's one-click link, transactional mail none
    links = set()
    for rcpt in ("n1@dst.test", "n2@dst.test", "solo@dst.test"):
        got = arrived(w, rcpt)
        assert got.rcpt_tos == [rcpt]
        head = fields(got.data)
        assert head["List-Unsubscribe-Post"] == ONE_CLICK and "X-Cmcd-Stream" not in head
        links.add(one_click_path(got.data))
    assert len(links) == 3 and all(p.startswith("/u/") for p in links)
    for rcpt in ("t1@dst.test", "m1@dst.test"):
        head = fields(arrived(w, rcpt).data)
        assert "List-Unsubscribe" not in head and "List-Unsubscribe-Post" not in head

    broadcast_ids = {m["id"] for m in bulk["messages"]} | {chosen["id"]}
    transactional_ids = {receipt["id"], merged["messages"][0]["id"]}
    rows = delivered_rows(w, broadcast_ids | transactional_ids)
    assert {r["stream"] for r in rows if r["queue_id"] in broadcast_ids} == {"broadcast"}
    assert {r["stream"] for r in rows if r["queue_id"] in transactional_ids} == {"transactional"}

    only = records(w, "/v1/deliveries", stream="broadcast", limit="1000")
    assert {r["stream"] for r in only} == {"broadcast"} and broadcast_ids <= {r["queue_id"] for r in only}
    assert not transactional_ids & {r["queue_id"] for r in records(w, "/v1/deliveries", stream="broadcast")}
    assert records(w, "/v1/bounces", stream="broadcast") == []
    status, _, csv_text = d.http("GET", f"/v1/deliveries?format=csv&queue_id={chosen['id']}", token=w.viewer)
    assert status == 200 and {r["stream"] for r in csv.DictReader(io.StringIO(csv_text))} == {"broadcast"}
    for path in ("/v1/deliveries", "/v1/bounces"):
        status, _, problem = d.http("GET", f"{path}?stream=newsletter", token=w.viewer)
        assert status == 400 and problem["field"] == "stream", problem
        assert "transactional, broadcast" in problem["detail"]

    # the tenant's webhook gets the stream of each event
    events = {(e["queue_id"], e["event"]): e for e in delivered(w.receiver.wait(
        lambda rs: {(q, "delivered") for q in broadcast_ids | transactional_ids}
        <= {(e["queue_id"], e["event"]) for e in delivered(rs)}, "/acme"))}  # fmt: skip
    assert {events[(q, "delivered")]["stream"] for q in broadcast_ids} == {"broadcast"}
    assert {events[(q, "delivered")]["stream"] for q in transactional_ids} == {"transactional"}


@pytest.mark.parametrize(
    ("path", "body", "field", "words"),
    [
        ("/v1/emails", {"stream": "newsletter"}, "stream", "'newsletter' is not a stream"),
        ("/v1/emails/bulk", {"stream": "Broadcast"}, "stream", "expected one of transactional, broadcast"),
        ("/v1/emails", {"stream": 1, "to": ["x1@dst.test", "x2@dst.test"]}, "stream", "1 is not a stream"),
        ("/v1/emails", {"stream": "broadcast", "to": ["x1@dst.test", "x2@dst.test"]}, "to", "/v1/emails/bulk"),
        ("/v1/emails", {"stream": "broadcast", "bcc": ["x2@dst.test"]}, "to", "one recipient"),
        ("/v1/emails", {"headers": {"X-Cmcd-Stream": "broadcast"}}, "headers.X-Cmcd-Stream", "'stream' field"),
        ("/v1/emails/bulk", {"headers": {"x-cmcd-stream": "transactional"}}, "headers.x-cmcd-stream", "'stream'"),
    ],
    ids=["unknown", "bulk-case-matters", "number", "broadcast-to-two", "broadcast-with-bcc", "header", "bulk-header"],
)
def test_a_bad_stream_is_a_422_naming_the_field_and_queues_nothing(
    world: Streams, path: str, body: dict[str, Any], field: str, words: str
) -> None:
    w = world
    base: dict[str, Any] = {"from": "alice@acme.test", "subject": "s", "text": "t"}
    base |= {"recipients": [{"to": "x1@dst.test"}]} if path.endswith("bulk") else {"to": ["x1@dst.test"]}
    key = "refused-" + hashlib.sha256(f"{path} {json.dumps(body, sort_keys=True)}".encode()).hexdigest()
    status, _, problem = w.d.http("POST", path, base | body, token=w.sender, headers={"Idempotency-Key": key})
    assert status == 422 and problem["field"] == field and words in problem["detail"], problem
    # refused before anything was built: the same key with a good request is not a replay of it
    good = {"from": "alice@acme.test", "to": ["after-refusal@dst.test"], "subject": "s", "text": "t"}
    status, replay_headers, ok = w.d.http("POST", "/v1/emails", good, token=w.sender, headers={"Idempotency-Key": key})
    assert status == 202 and "Idempotent-Replayed" not in replay_headers, ok
    rows = delivered_rows(w, {ok["id"]})
    assert {r["recipient"] for r in rows} == {"after-refusal@dst.test"}


def test_cmcctl_set_stream_makes_a_users_smtp_mail_broadcast(world: Streams) -> None:
    w, d = world, world.d
    d.admin("user.add", tenant="acme", login="carol", role="sender", password=PASSWORD)
    code, out = cmcctl(d, "user", "set-stream", "acme", "carol", "broadcast")
    assert code == 0 and "carol in tenant acme is now broadcast" in out, out
    code, out = cmcctl(d, "user", "list", "acme")
    assert code == 0 and "STREAM" in out.splitlines()[0]
    by_login = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert "broadcast" in by_login["carol"] and "transactional" in by_login["alice"]
    code, out = cmcctl(d, "user", "set-stream", "acme", "carol", "bulk")
    assert code == 2 and "'bulk' is not one of 'transactional', 'broadcast'" in out, out
    with pytest.raises(AdminError, match="stream must be one of transactional, broadcast, not 'bulk'"):
        d.admin("user.set-stream", tenant="acme", login="carol", stream="bulk")
    ops = [(r["action"], r["target"], r["result"]) for r in d.ops_log() if r["action"] == "user.set-stream"]
    assert ops == [("user.set-stream", "acme/carol stream=broadcast", "ok"),
                   ("user.set-stream", "acme/carol stream=bulk", "refused")]  # fmt: skip
    status, _, users = d.http("GET", "/v1/users", token=w.admin)
    assert status == 200, users
    streams = {u["login"]: u["stream"] for u in users["data"]}
    assert streams["carol"] == "broadcast" and streams["alice"] == "transactional"

    # carol's SMTP mail is broadcast now: one message per recipient, each with its link
    with d.smtp(login="carol") as c:
        reply = c.sendmail("carol@acme.test", ["c1@dst.test", "c2@dst.test"], message("carol@acme.test", "c1@dst.test"))
        assert reply == {}
        chosen = message("carol@acme.test", "c3@dst.test").replace(
            b"Subject:", b"X-Cmcd-Stream: transactional\r\nSubject:"
        )
        c.sendmail("carol@acme.test", ["c3@dst.test"], chosen)
    for rcpt in ("c1@dst.test", "c2@dst.test"):
        got = arrived(w, rcpt)
        assert got.rcpt_tos == [rcpt] and fields(got.data)["List-Unsubscribe-Post"] == ONE_CLICK
    head = fields(arrived(w, "c3@dst.test").data)
    assert "List-Unsubscribe" not in head and "X-Cmcd-Stream" not in head  # the message's own word wins

    def logged(stream: str) -> list[dict[str, Any]]:
        code, out = cmcctl(d, "log", "mail", "--tenant", "acme", "--sender", "carol@acme.test", "--stream", stream,
                           "--format", "json")  # fmt: skip
        assert code == 0, out
        return list(json.loads(out))

    def both_delivered() -> list[dict[str, Any]] | None:
        rows = logged("broadcast")
        return rows if len([r for r in rows if r["event"] == "delivered"]) == 2 else None

    broadcast = wait_until(both_delivered, "carol's broadcasts delivered in the mail log", 30)
    assert {r["rcpt"] for r in broadcast} == {"c1@dst.test", "c2@dst.test"}
    assert {r["stream"] for r in broadcast} == {"broadcast"}
    transactional = wait_until(lambda: logged("transactional"), "carol's transactional message in the mail log", 30)
    assert {r["rcpt"] for r in transactional} == {"c3@dst.test"}
    code, out = cmcctl(d, "log", "mail", "--tenant", "acme", "--sender", "carol@acme.test")
    assert code == 0 and "STREAM" in out.splitlines()[0].split() and "broadcast" in out and "transactional" in out
    with pytest.raises(AdminError, match="stream 'bulk': expected one of transactional, broadcast"):
        d.admin("log.mail", stream="bulk")
    code, out = cmcctl(d, "log", "login", "--stream", "broadcast")
    assert code != 0 and "--stream" in out

    # back to transactional: the next message is one message for both recipients, without a link
    code, out = cmcctl(d, "user", "set-stream", "acme", "carol", "transactional")
    assert code == 0, out
    with d.smtp(login="carol") as c:
        c.sendmail("carol@acme.test", ["c4@dst.test", "c5@dst.test"], message("carol@acme.test", "c4@dst.test"))
    got = arrived(w, "c4@dst.test")
    assert sorted(got.rcpt_tos) == ["c4@dst.test", "c5@dst.test"] and "List-Unsubscribe" not in fields(got.data)


def test_suppression_scope_in_the_api_cmcctl_and_console(world: Streams) -> None:
    w, d = world, world.d
    status, _, sent = d.http("POST", "/v1/emails", {"from": "alice@acme.test", "to": ["leaver@dst.test"],
                             "subject": "News", "text": "n", "stream": "broadcast"}, token=w.sender)  # fmt: skip
    assert status == 202, sent
    path = one_click_path(arrived(w, "leaver@dst.test").data)
    status, _, _ = d.http("POST", path, raw=ONE_CLICK.encode(),
                          headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert status == 200
    d.admin("suppression.add", tenant="acme", address="gone@dst.test")

    status, _, page = d.http("GET", "/v1/blocks", token=w.viewer)
    assert status == 200, page
    scope = {r["address"]: r["stream"] for r in page["data"]}
    assert scope["leaver@dst.test"] == "broadcast" and scope["gone@dst.test"] == "all"
    code, out = cmcctl(d, "suppression", "list", "acme")
    assert code == 0 and out.splitlines()[0].split()[:2] == ["ADDRESS", "STREAM"], out
    lines = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
    assert lines["leaver@dst.test"] == "broadcast" and lines["gone@dst.test"] == "all"

    admin = w.console.person("acme", "admin")
    b = w.console.signed_in(admin)
    shown = b.get("/blocks")
    assert re.search(r'leaver@dst\.test</td>.*?<td class="scope-broadcast">broadcasts \(unsubscribed\)</td>',
                     shown.text, re.S)  # fmt: skip
    assert re.search(r'gone@dst\.test</td>.*?<td class="scope-all">all mail</td>', shown.text, re.S)
    rows = {r["address"]: r for r in csv.DictReader(io.StringIO(b.get("/blocks.csv").text))}
    assert rows["leaver@dst.test"]["stream"] == "broadcast" and rows["gone@dst.test"]["stream"] == "all"

    # the recipient's unsubscribe is not the tenant's to lift, nor is it lifted with a block of the address
    status, _, problem = d.http("DELETE", "/v1/blocks/leaver@dst.test", token=w.admin)
    assert status == 409 and "unsubscribed itself" in problem["detail"], problem
    assert any(r["address"] == "leaver@dst.test" for r in d.http("GET", "/v1/blocks", token=w.viewer)[2]["data"])
    code, out = cmcctl(d, "suppression", "delete", "acme", "leaver@dst.test")
    assert code != 0 and "cmcctl suppression delete --unsubscribe" in out, out
    code, out = cmcctl(d, "suppression", "delete", "acme", "leaver@dst.test", "--unsubscribe")
    assert code == 0 and "removed leaver@dst.test from the unsubscribe list" in out, out
    assert all(r["address"] != "leaver@dst.test" for r in d.http("GET", "/v1/blocks", token=w.viewer)[2]["data"])


def test_console_mail_log_and_users_show_and_choose_the_stream(world: Streams) -> None:
    w, d = world, world.d
    one_recipient = {"from": "alice@acme.test", "subject": "s", "text": "t", "tags": ["console-streams"],
                     "recipients": [{"to": "cs1@dst.test"}]}  # fmt: skip
    status, _, sent = d.http("POST", "/v1/emails/bulk", one_recipient, token=w.sender)
    assert status == 202, sent
    status, _, plain = d.http("POST", "/v1/emails", {"from": "alice@acme.test", "to": ["cs2@dst.test"], "subject": "s",
                              "text": "t", "tags": ["console-streams"]}, token=w.sender)  # fmt: skip
    assert status == 202, plain
    broadcast_id = sent["messages"][0]["id"]
    delivered_rows(w, {broadcast_id, plain["id"]})
    admin = w.console.person("acme", "admin")
    b = w.console.signed_in(admin)

    everything = b.get("/mail?since=&tag=console-streams")
    assert everything.status == 200
    cells = re.findall(r'<td class="stream-(\w+)">([^<]*)</td>', everything.text)
    assert {c[0] for c in cells} == {"broadcast", "transactional"} and ("broadcast", "broadcast") in cells
    only = b.get("/mail?since=&tag=console-streams&stream=broadcast")
    assert broadcast_id in only.text and plain["id"] not in only.text
    assert set(re.findall(r'<td class="stream-(\w+)">', only.text)) == {"broadcast"}
    assert '<option value="broadcast" selected>' in only.text
    assert b.get("/mail?stream=newsletter").status == 400
    japanese = w.console.signed_in(admin, lang="ja").get("/mail?since=&tag=console-streams&stream=broadcast")
    assert "一斉配信" in japanese.text and "ストリーム" in japanese.text
    history = b.get(f"/mail/{broadcast_id}")
    assert re.search(r'<dd class="stream-broadcast">broadcast</dd>', history.text)
    download = b.get("/mail.csv?" + urllib.parse.urlencode({"since": "", "tag": "console-streams"}))
    rows = list(csv.DictReader(io.StringIO(download.text)))
    assert {(r["queue_id"], r["stream"]) for r in rows} == {(broadcast_id, "broadcast"), (plain["id"], "transactional")}

    # the users page lists each user's stream, and an admin changes one there
    users = b.get("/users")
    assert re.search(r'>alice</a>.*?<td class="stream-transactional">transactional</td>', users.text, re.S)
    d.admin("user.add", tenant="acme", login="dave", role="sender", password=PASSWORD)
    page = b.get("/users/dave")
    changed = b.submit(page, "/users/dave/stream", stream="broadcast")
    assert changed.status == 303 and changed.location == "/users/dave?done=users_stream_changed", changed.text[:500]
    assert '<dd class="stream-broadcast">broadcast</dd>' in b.get(changed.location).text
    assert {u["login"]: u["stream"] for u in d.admin("user.list", tenant="acme")}["dave"] == "broadcast"
    refused = b.submit(b.get("/users/dave"), "/users/dave/stream", stream="newsletter")
    assert refused.status == 400 and "stream must be one of transactional, broadcast" in refused.text
    ops = [(r["action"], r["result"]) for r in d.ops_log() if r["action"] == "console.users.stream"]
    assert ops == [("console.users.stream", "ok"), ("console.users.stream", "refused")]


def test_metrics_count_events_by_stream(world: Streams) -> None:
    w, d = world, world.d
    before = scrape_until(METRICS_PORT, lambda s: True)

    def value(s: Any, stream: str, event: str) -> float:
        return float(s.value("cmcd_stream_events_total", stream=stream, event=event))

    start = {(s, e): value(before, s, e) for s in ("broadcast", "transactional") for e in ("accepted", "delivered")}
    news = {"from": "alice@acme.test", "subject": "s", "text": "t",
            "recipients": [{"to": f"metric{i}@dst.test"} for i in range(3)]}  # fmt: skip
    status, _, bulk = d.http("POST", "/v1/emails/bulk", news, token=w.sender)
    assert status == 202, bulk
    status, _, one = d.http("POST", "/v1/emails", {"from": "alice@acme.test", "to": ["metric-t@dst.test"],
                            "subject": "s", "text": "t"}, token=w.sender)  # fmt: skip
    assert status == 202, one
    delivered_rows(w, {m["id"] for m in bulk["messages"]} | {one["id"]})

    def grown(s: Any) -> bool:
        return all(value(s, "broadcast", e) - start[("broadcast", e)] >= 3 for e in ("accepted", "delivered")) and all(
            value(s, "transactional", e) - start[("transactional", e)] >= 1 for e in ("accepted", "delivered")
        )

    after = scrape_until(METRICS_PORT, grown)
    assert grown(after), after.families["cmcd_stream_events"].samples
    assert after.families["cmcd_stream_events"].type == "counter"
    labels = {(s.labels["stream"], s.labels["event"]) for s in after.families["cmcd_stream_events"].samples
              if s.name == "cmcd_stream_events_total"}  # fmt: skip
    assert labels == {(s, e) for s in ("transactional", "broadcast")
                      for e in ("accepted", "delivered", "deferred", "bounced", "expired", "suppressed")}  # fmt: skip
    # the message counters dashboards read keep their labels
    assert set(after.labelled("cmcd_messages_accepted", "tenant")) >= {"acme"}
