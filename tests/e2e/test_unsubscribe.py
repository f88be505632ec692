"""One-click unsubscribe end to end (RFC 8058): broadcast mail submitted over SMTP reaches a sink
with List-Unsubscribe and List-Unsubscribe-Post in its DKIM signatures (checked by dkimpy and Perl's
Mail::DKIM through a DNS server on loopback); the URL in the delivered field, POSTed with urllib
as a mailbox provider would, holds that recipient back from broadcast mail at once while
transactional mail still reaches them; a GET, a changed or cut token, another body or a deleted
tenant changes nothing; the tenant's webhook gets the "unsubscribed" event and /metrics counts it.

One worker: the worker that takes the POST sees the suppression when it answers (others within
their directory poll), and the next message must go through that one to be held back without a wait.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import Cmcd, wait_until
from tests.e2e.test_delivery import FAST
from tests.e2e.test_dkim import BOTH_PASS, PERL_EXPECTED, dkimpy_results, perl_results, publish
from tests.e2e.test_metrics import scrape
from tests.e2e.test_webhooks import Receiver, verify
from tests.peers import DnsServer, Received, Sink, free_port

ONE_CLICK = b"List-Unsubscribe=One-Click"
FORM = "application/x-www-form-urlencoded"


@dataclass
class World:
    d: Cmcd
    dns: DnsServer
    sink: Sink
    receiver: Receiver
    secret: str
    metrics_port: int


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, ca: Any) -> Iterator[World]:
    dns = DnsServer().start()
    sink = Sink("127.0.0.2", free_port("127.0.0.2")).start()
    receiver = Receiver()
    api_port, metrics_port = free_port(), free_port()
    d = Cmcd(
        tmp_path_factory.mktemp("unsubscribe"),
        ca,
        {
            "server": {"workers": 1},
            # the URL in the messages names the host the test certificate is for, and the real port
            "api": {"listen": f"127.0.0.1:{api_port}", "public_url": f"https://localhost:{api_port}",
                    "webhook_allow_private": True, "webhook_timeout": "3s"},
            "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
            "dns": {"nameservers": [dns.address]},
            "delivery": FAST | {"routes": {"*": sink.address}},
        },
    )  # fmt: skip
    d.start().provision()
    publish(d, dns)
    hook = d.admin("webhook.add", tenant="acme", url=receiver.url("/acme"), events="unsubscribed")
    assert hook["events"] == ["unsubscribed"]
    yield World(d, dns, sink, receiver, hook["secret"], metrics_port)
    assert d.stop() == 0
    assert not [line for line in d.log if "level=error" in line or "Traceback" in line]
    receiver.stop()
    sink.stop()
    dns.stop()


def letter(rcpts: list[str], stream: str | None = "broadcast", extra: bytes = b"") -> bytes:
    field = f"X-Cmcd-Stream: {stream}\r\n".encode() if stream else b""
    return (
        b"From: Alice <alice@acme.test>\r\nTo: " + ", ".join(rcpts).encode() + b"\r\nSubject: news\r\n"
        + field + extra + b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nThis month's news.\r\n"
    )  # fmt: skip


def submit(d: Cmcd, rcpts: list[str], data: bytes) -> tuple[int, bytes]:
    """MAIL, RCPT for each of RCPTS, DATA: the reply to the end of data."""
    with d.smtp() as c:
        assert c.mail("alice@acme.test")[0] == 250
        for r in rcpts:
            assert c.rcpt(r)[0] == 250
        return c.data(data)


def send(w: World, rcpts: list[str], stream: str | None = "broadcast", extra: bytes = b"") -> list[Received]:
    """Submit one message to RCPTS and wait for what the sink gets of it (one message per recipient
    for a broadcast)."""
    before = len(w.sink.messages)
    code, reply = submit(w.d, rcpts, letter(rcpts, stream, extra))
    assert code == 250, reply
    copies = len(rcpts) if stream == "broadcast" else 1
    return w.sink.wait_for(before + copies)[before : before + copies]


def fields(data: bytes) -> dict[str, list[str]]:
    """The header fields of DATA by lower-case name, values unfolded."""
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    out: dict[str, list[str]] = {}
    for line in re.sub(r"\r\n[ \t]+", " ", head).split("\r\n"):
        name, _, value = line.partition(":")
        out.setdefault(name.strip().lower(), []).append(value.strip())
    return out


def link(data: bytes) -> str:
    """The https URI of the delivered List-Unsubscribe field."""
    (value,) = fields(data)["list-unsubscribe"]
    (url,) = re.findall(r"<(https://[^>]+)>", value)
    return url


def request(
    w: World, url: str, body: bytes | None = None, ctype: str = FORM, **headers: str
) -> tuple[int, dict[str, str], str]:
    """GET (BODY None) or POST URL with urllib, the test CA trusted: (status, headers, text)."""
    req = urllib.request.Request(url, data=body, method="GET" if body is None else "POST")
    if body is not None:
        req.add_header("Content-Type", ctype)
    for k, v in headers.items():
        req.add_header(k.replace("_", "-"), v)
    try:
        with urllib.request.urlopen(req, context=w.d.client_context(), timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def held_back(w: World, tenant: str = "acme") -> dict[str, str]:
    """The tenant's suppression list: address -> scope ("all" or "broadcast")."""
    return {r["address"]: r["stream"] for r in w.d.admin("suppression.list", tenant=tenant)}


def unsubscribed_rows(w: World) -> list[dict[str, Any]]:
    return [r for r in w.d.mail_log() if r["event"] == "unsubscribed"]


def one_click_ops(w: World) -> list[dict[str, Any]]:
    return [o for o in w.d.ops_log() if o["action"].startswith("unsubscribe")]


def signed_names(data: bytes) -> list[set[str]]:
    """The h= field names of each DKIM-Signature of DATA, lower-case."""
    return [
        {n.strip().lower() for n in re.search(r"\bh=([^;]+)", sig).group(1).split(":")}  # type: ignore[union-attr]
        for sig in fields(data)["dkim-signature"]
    ]


@pytest.mark.peer
def test_a_broadcast_carries_signed_one_click_fields_that_unsubscribe_its_recipient(world: World) -> None:
    w = world
    (got,) = send(w, ["reader@dst.test"])
    f = fields(got.data)
    url = link(got.data)
    assert url.startswith(f"https://localhost:{w.d.api_port}/u/") and f["list-unsubscribe-post"] == [ONE_CLICK.decode()]
    assert "x-cmcd-stream" not in f
    assert all({"list-unsubscribe", "list-unsubscribe-post"} <= names for names in signed_names(got.data))
    assert dkimpy_results(got.data, w.dns.port) == BOTH_PASS
    assert perl_results(got.data, w.dns.port) == PERL_EXPECTED

    # a GET (a scanner following the link, a person opening it) only asks
    status, headers, page = request(w, url)
    assert status == 200 and "r***@dst.test" in page and "reader@dst.test" not in page
    assert '<form method="post">' in page and 'name="List-Unsubscribe" value="One-Click"' in page
    assert "<script" not in page
    assert headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert (headers["X-Frame-Options"], headers["Referrer-Policy"], headers["Cache-Control"]) == (
        "DENY", "no-referrer", "no-store")  # fmt: skip
    assert "Set-Cookie" not in headers
    assert "reader@dst.test" not in held_back(w) and not unsubscribed_rows(w)
    status, _, page = request(w, url, Accept_Language="ja,en;q=0.5")
    assert status == 200 and 'lang="ja"' in page and "配信を停止する" in page

    ops_before = len(one_click_ops(w))
    status, headers, page = request(w, url, ONE_CLICK)
    assert status == 200 and "r***@dst.test" in page and "unsubscribed" in page
    assert "Set-Cookie" not in headers
    assert held_back(w)["reader@dst.test"] == "broadcast"
    (row,) = unsubscribed_rows(w)
    assert (row["status"], row["rcpt"], row["rcpt_domain"], row["stream"], row["queue_id"]) == (
        "unsubscribed", "reader@dst.test", "dst.test", "broadcast", "")  # fmt: skip
    assert row["rcpt_hmac"] == w.d.keys().index("reader@dst.test") and row["event_key"]
    ops = one_click_ops(w)[ops_before:]
    assert [(o["action"], o["result"], o["target"]) for o in ops] == [("unsubscribe.one_click", "ok", "1 address")]
    assert "reader" not in ops[0]["target"] + ops[0]["detail"] and ops[0]["actor"].startswith("recipient")

    # a repeat (a provider retrying, a second click): the same answer, no second row anywhere
    status, _, _ = request(w, url, ONE_CLICK)
    assert status == 200 and len(unsubscribed_rows(w)) == 1 and len(one_click_ops(w)) == ops_before + 1
    status, _, page = request(w, url)
    assert status == 200 and "already unsubscribed" in page and "<form" not in page

    # the next broadcast is held back, and never reaches the sink; a transactional message does
    before = len(w.sink.messages)
    code, reply = submit(w.d, ["reader@dst.test"], letter(["reader@dst.test"]))
    assert code == 250, reply
    qid = re.search(rb"queued as (\w+)", reply).group(1).decode()  # type: ignore[union-attr]
    rows = w.d.wait_mail_log(lambda rs: any(r["status"] == "suppressed" for r in rs), qid)
    assert [r["stream"] for r in rows if r["status"] == "suppressed"] == ["broadcast"]
    (plain,) = send(w, ["reader@dst.test"], stream="transactional")
    assert plain.rcpt_tos == ["reader@dst.test"] and "list-unsubscribe" not in fields(plain.data)
    assert len(w.sink.messages) == before + 1  # the transactional one only

    # the tenant's webhook is told, signed
    posted = w.receiver.wait(lambda rs: any(e["recipient"] == "reader@dst.test" for r in rs for e in r.events), "/acme")
    event = next(e for r in posted for e in r.events if e["recipient"] == "reader@dst.test")
    assert (event["event"], event["status"], event["queue_id"]) == ("unsubscribed", "unsubscribed", "")
    assert event["stream"] == "broadcast"
    assert all(verify(w.secret, r) for r in posted)
    assert scrape(w.metrics_port).value("cmcd_unsubscribes_total", result="done") >= 1


def test_a_changed_token_another_body_or_a_deleted_tenant_change_nothing(world: World) -> None:
    w = world
    (got,) = send(w, ["keeper@dst.test"])
    url = link(got.data)
    base, token = url.rsplit("/", 1)
    flipped = token[:20] + ("A" if token[20] != "A" else "B") + token[21:]
    before = (held_back(w), len(unsubscribed_rows(w)))

    for changed in (flipped, token[:-3], token[:30], "x", token + "AAAA"):
        status, headers, page = request(w, f"{base}/{changed}", ONE_CLICK)
        assert status == 404 and headers["Content-Type"].startswith("text/html"), (changed, page)
        assert "not valid" in page
        assert request(w, f"{base}/{changed}")[0] == 404
    for body, ctype in ((b"List-Unsubscribe=Nope", FORM), (b"", FORM), (ONE_CLICK + b"&x=1", FORM)):
        status, _, page = request(w, url, body, ctype)
        assert status == 400 and "nothing was changed" in page, body
    assert request(w, url, ONE_CLICK, "text/plain")[0] == 415
    assert request(w, url, b"x" * 5000)[0] == 413
    assert (held_back(w), len(unsubscribed_rows(w))) == before
    metrics = scrape(w.metrics_port)
    assert metrics.value("cmcd_unsubscribes_total", result="not_found") >= 5
    assert metrics.value("cmcd_unsubscribes_total", result="bad_request") >= 5

    # multipart/form-data, which RFC 8058 allows as well, unsubscribes
    boundary = "cmcdtest"
    multipart = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="List-Unsubscribe"\r\n\r\nOne-Click\r\n'
        f"--{boundary}--\r\n"
    ).encode()
    assert request(w, url, multipart, f"multipart/form-data; boundary={boundary}")[0] == 200
    assert held_back(w)["keeper@dst.test"] == "broadcast"

    # a tenant deleted since its message went out: its links open to nothing
    d = w.d
    d.admin("tenant.add", name="gamma")
    d.admin("domain.add", tenant="gamma", domain="gamma.test")
    d.admin("user.add", tenant="gamma", login="gina", role="sender", password="correct horse battery")
    before_sink = len(w.sink.messages)
    with d.smtp(login="gina") as c:
        data = letter(["late@dst.test"]).replace(b"alice@acme.test", b"gina@gamma.test")
        c.sendmail("gina@gamma.test", ["late@dst.test"], data)
    gone = link(w.sink.wait_for(before_sink + 1)[before_sink].data)
    wait_until(lambda: any(r["event"] == "delivered" and r["rcpt"] == "late@dst.test" for r in d.mail_log()),
               "the gamma message delivered")  # fmt: skip
    d.admin("tenant.delete", name="gamma", purge=True)
    rows = len(unsubscribed_rows(w))
    status, _, page = request(w, gone, ONE_CLICK)
    assert status == 404 and "not valid" in page
    assert request(w, gone)[0] == 404
    assert len(unsubscribed_rows(w)) == rows and not [r for r in d.mail_log() if r["rcpt"] == "late@dst.test"]


def test_a_broadcast_to_two_is_two_messages_each_unsubscribing_its_own_recipient(world: World) -> None:
    w = world
    own = b"List-Unsubscribe: <mailto:leave@acme.test?subject=stop>,\r\n <https://acme.test/out>\r\n"
    got = send(w, ["ann@dst.test", "ben@dst.test"], extra=own)
    assert sorted(m.rcpt_tos[0] for m in got) == ["ann@dst.test", "ben@dst.test"]
    assert all(len(m.rcpt_tos) == 1 for m in got)
    by_rcpt = {m.rcpt_tos[0]: m for m in got}
    for m in got:
        (value,) = fields(m.data)["list-unsubscribe"]
        assert re.fullmatch(r"<https://localhost:\d+/u/[\w-]+>, <mailto:leave@acme\.test\?subject=stop>", value)
        assert "acme.test/out" not in value  # the tenant's own https link is ours to replace
        assert dkimpy_results(m.data, w.dns.port) == BOTH_PASS
    assert link(by_rcpt["ann@dst.test"].data) != link(by_rcpt["ben@dst.test"].data)

    assert request(w, link(by_rcpt["ann@dst.test"].data), ONE_CLICK)[0] == 200
    listed = held_back(w)
    assert listed["ann@dst.test"] == "broadcast" and "ben@dst.test" not in listed
    assert [r["rcpt"] for r in unsubscribed_rows(w) if r["rcpt"] in ("ann@dst.test", "ben@dst.test")] == [
        "ann@dst.test"
    ]


def test_a_stream_other_than_transactional_or_broadcast_is_refused(world: World) -> None:
    before = len(world.sink.messages)
    code, reply = submit(world.d, ["bulk@dst.test"], letter(["bulk@dst.test"], stream="bulk"))
    assert (code, reply.decode()) == (550, "5.6.0 X-Cmcd-Stream: must be transactional or broadcast, not 'bulk'")
    assert not [r for r in world.d.mail_log() if r["rcpt"] == "bulk@dst.test"]
    assert len(world.sink.messages) == before
