"""A tenant's own block policy end to end, with the real daemon (two workers), a sink replaying a
provider's reply, the admin socket through cmcctl's own code, the API over HTTPS and the console as a
browser drives it: a tenant that sets mailbox_full=suppress is blocked at the first such bounce while
another keeps the host's count policy; the class shows in cmcctl log mail, the console's mail log and
every blocks listing; bad classes and actions are refused by name; the API and the console show and
change the policy, a viewer only reads it."""

from __future__ import annotations

import html
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner

from cmcd.admin.cli import cli
from tests.conftest import Cmcd, queue_id, wait_until
from tests.e2e.test_bounce_classes import start
from tests.e2e.test_console import Person, World
from tests.e2e.test_delivery import final
from tests.e2e.test_metrics import scrape_until
from tests.peers import DnsServer, Sink, free_port

#: Microsoft 365's mailbox-full refusal (tests/data/provider_replies.toml): class mailbox_full
FULL = "552 5.2.2 STOREDRV.Deliver; mailbox full"


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer() as server:
        server.add("dst.test", "MX", "10 mx1.dst.test.")
        server.add("mx1.dst.test", "A", "127.0.0.2")
        for tenant in ("acme", "beta"):  # where the bounce reports go
            server.add(f"{tenant}.test", "MX", "10 mx.reports.test.")
        server.add("mx.reports.test", "A", "127.0.0.9")
        yield server


def cmcctl(d: Cmcd, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--socket", str(d.root / "admin.sock"), *args])
    return result.exit_code, result.output


def send(d: Cmcd, login: str, sender: str, rcpt: str) -> str:
    with d.smtp(login=login) as c:
        c.mail(sender)
        assert c.rcpt(rcpt)[0] == 250
        code, reply = c.data(f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: hi\r\n\r\nhi\r\n".encode())
        assert code == 250, reply
        return queue_id(reply)


def page_text(text: str) -> str:
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text)))


def test_a_tenants_suppress_blocks_at_the_first_bounce_while_another_keeps_the_count(
    make_cmcd: Any, dns: DnsServer
) -> None:
    port = free_port("127.0.0.2")
    with Sink("127.0.0.2", port, rcpt_reply=lambda a: FULL), Sink("127.0.0.9", port):
        d = start(make_cmcd, dns, port)

        # bad input is refused by name and changes nothing
        code, out = cmcctl(d, "tenant", "set", "acme", "--block", "mailbox_ful=suppress")
        assert code != 0 and "'mailbox_ful'" in out and "invalid_recipient" in out and "mailbox_full" in out, out
        code, out = cmcctl(d, "tenant", "set", "acme", "--block", "mailbox_full=block")
        assert code != 0 and "'block'" in out and "suppress, count, alert, none" in out, out
        code, out = cmcctl(d, "tenant", "set", "acme", "--block", "mailbox_full")
        assert code != 0 and "CLASS=ACTION" in out, out
        assert d.admin("tenant.show", name="acme")["block_actions"] == {}

        def refusals() -> list[dict[str, Any]] | None:
            rows = [r for r in d.ops_log() if r["action"] == "tenant.set" and r["result"] == "refused"]
            return rows if len(rows) == 2 else None

        refused = wait_until(refusals, "both refusals on the operation log")
        assert "'mailbox_ful'" in refused[0]["detail"] and "'block'" in refused[1]["detail"]

        code, out = cmcctl(d, "tenant", "set", "acme", "--block", "mailbox_full=suppress", "--block", "tls=alert")
        assert code == 0, out
        assert re.search(r"block_policy: .*\bmailbox_full=suppress\b.*\btls=alert\b", out), out
        shown = d.admin("tenant.show", name="acme")
        assert shown["block_actions"] == {"mailbox_full": "suppress", "tls": "alert"}
        assert "invalid_recipient=suppress" in shown["block_policy"]  # the host's, for the classes not set
        assert d.admin("tenant.show", name="beta")["block_policy"].count("mailbox_full=count") == 1
        code, out = cmcctl(d, "tenant", "list")
        assert code == 0 and re.search(r"acme\s+\d+\s+mailbox_full=suppress,tls=alert", out), out
        (done,) = [r for r in d.ops_log() if r["action"] == "tenant.set" and r["result"] == "ok"]
        assert done["detail"] == "block_actions mailbox_full=suppress,tls=alert"

        acme_qid = send(d, "alice", "alice@acme.test", "full@dst.test")
        beta_qid = send(d, "bob", "bob@beta.test", "full@dst.test")
        for qid in (acme_qid, beta_qid):
            rows = d.wait_mail_log(lambda rows: final(rows, 1), qid)
            assert [r["bounce_class"] for r in rows if r["event"] == "bounced"] == ["mailbox_full"]

        # acme: blocked at the first mailbox_full bounce; beta: the host's count policy (3 within 7 days)
        (block,) = d.admin("suppression.list", tenant="acme")
        assert block["address"] == "full@dst.test" and block["bounce_class"] == "mailbox_full"
        assert round(block["expires"] - block["created"]) == 30 * 86400
        assert d.admin("suppression.list", tenant="beta") == []
        code, out = cmcctl(d, "suppression", "list", "acme")
        assert code == 0 and re.search(r"full@dst\.test\s+all\s+mailbox_full\s+.*\d{4}-\d\d-\d\d", out), out
        assert out.splitlines()[0].split()[2:4] == ["CLASS", "REASON"] and "EXPIRES" in out.splitlines()[0]

        # the class in cmcctl log mail: the table and the CSV
        code, out = cmcctl(d, "log", "mail", "--tenant", "acme", "--status", "bounced")
        assert code == 0 and "BOUNCE_CLASS" in out.splitlines()[0], out
        assert re.search(rf"{acme_qid}.*full@dst\.test\s+bounced\s+mailbox_full\b", out), out
        code, out = cmcctl(d, "log", "mail", "--tenant", "beta", "--format", "csv")
        assert code == 0 and "bounce_class" in out.splitlines()[0].split(",")
        assert any(line.split(",")[8] == "mailbox_full" for line in out.splitlines()[1:] if beta_qid in line), out

        # the class in the console's mail log, a message's history and the blocks page
        w = World(d, Person("acme", "", ""), Person("beta", "", ""))
        b = w.signed_in(w.person("acme", "viewer"))
        listing = b.get("/mail?" + "since=&status=bounced")
        assert listing.status == 200
        assert re.search(r'<td class="class-mailbox_full">mailbox full</td>', listing.text), listing.text[-3000:]
        history = b.get(f"/mail/{acme_qid}")
        assert history.status == 200 and '<td class="class-mailbox_full">mailbox full</td>' in history.text
        blocks = b.get("/blocks")
        assert blocks.status == 200
        row = re.search(r"<tr>\s*<td class=\"mono\">full@dst\.test</td>(.*?)</tr>", blocks.text, re.S)
        assert row is not None and "mailbox full" in row.group(1) and "never" not in page_text(row.group(1))
        ja = w.signed_in(w.person("acme", "viewer"), "ja").get("/mail?since=&status=bounced")
        assert "メールボックス容量超過" in ja.text and "バウンスの種類" in ja.text

        # the API's block list: the class and when the block ends
        d.admin("user.add", tenant="acme", login="acme-keys", role="admin", password="a long admin password")
        token = d.admin("apikey.add", tenant="acme", login="acme-keys", role="viewer")["token"]
        status, _, got = d.http("GET", "/v1/blocks", token=token)
        assert status == 200
        (entry,) = got["data"]
        assert entry["bounce_class"] == "mailbox_full" and entry["expires"] > entry["created"]

        # back to the host's action: the next bounce of another address is counted, not blocked
        code, out = cmcctl(d, "tenant", "set", "acme", "--block", "mailbox_full=default")
        assert code == 0 and d.admin("tenant.show", name="acme")["block_actions"] == {"tls": "alert"}
        qid = send(d, "alice", "alice@acme.test", "full2@dst.test")
        d.wait_mail_log(lambda rows: final(rows, 1), qid)
        assert [s["address"] for s in d.admin("suppression.list", tenant="acme")] == ["full@dst.test"]


def test_the_api_and_the_console_show_and_change_the_policy(make_cmcd: Any, dns: DnsServer) -> None:
    d = start(make_cmcd, dns, free_port("127.0.0.2"))
    w = World(d, Person("acme", "", ""), Person("beta", "", ""))
    admin = w.person("acme", "admin")
    viewer = w.person("acme", "viewer")
    for tenant in ("acme", "beta"):
        d.admin("user.add", tenant=tenant, login=f"{tenant}-keys", role="admin", password="a long admin password")
    admin_key = d.admin("apikey.add", tenant="acme", login="acme-keys", role="admin")["token"]
    viewer_key = d.admin("apikey.add", tenant="acme", login="acme-keys", role="viewer")["token"]
    beta_key = d.admin("apikey.add", tenant="beta", login="beta-keys", role="viewer")["token"]

    status, _, got = d.http("GET", "/v1/block-policy", token=viewer_key)
    assert status == 200 and got["overrides"] == {} and got["actions"] == got["host_actions"]
    assert got["actions"]["mailbox_full"] == "count" and got["count_threshold"] == 3
    assert got["watch_period_s"] == 30 * 86400 and got["count_window_s"] == 7 * 86400

    status, _, _ = d.http("PUT", "/v1/block-policy", {"overrides": {"mailbox_full": "suppress"}}, token=viewer_key)
    assert status == 403
    for body, named in (
        ({"overrides": {"nope": "suppress"}}, "'nope'"),
        ({"overrides": {"mailbox_full": "quarantine"}}, "'quarantine'"),
        ({"overrides": {"mailbox_full": 1}}, "overrides"),
        ({"actions": {}}, "overrides"),
    ):
        status, headers, problem = d.http("PUT", "/v1/block-policy", body, token=admin_key)
        assert status == 422 and headers["Content-Type"].startswith("application/problem+json"), problem
        assert named in problem["detail"], problem
    status, _, got = d.http(
        "PUT", "/v1/block-policy", {"overrides": {"mailbox_full": "suppress", "spam_block": "none"}}, token=admin_key
    )
    assert status == 200 and got["overrides"] == {"mailbox_full": "suppress", "spam_block": "none"}
    assert got["actions"]["mailbox_full"] == "suppress" and got["actions"]["authentication"] == "alert"
    assert d.http("GET", "/v1/block-policy", token=beta_key)[2]["overrides"] == {}  # another tenant's is its own
    assert d.admin("tenant.show", name="acme")["block_actions"] == {"mailbox_full": "suppress", "spam_block": "none"}
    (row,) = [r for r in d.ops_log() if r["action"] == "api.block_policy.put" and r["result"] == "ok"]
    assert "mailbox_full=suppress" in row["detail"] and "spam_block=none" in row["detail"]

    # a viewer sees the policy and no form to change it; posting one anyway is refused
    vb = w.signed_in(viewer)
    page = vb.get("/blocks")
    assert page.status == 200 and 'action="/blocks/policy"' not in page.text
    text = page_text(page.text)
    assert "Block policy" in text and "invalid recipient block at once (Server default)" in text
    assert "mailbox full block at once" in text and "mailbox full block at once (Server default)" not in text
    assert "blocked as spam never block; log only" in text
    csrf = vb.get("/").form("/logout").fields["csrf"]
    assert vb.post("/blocks/policy", {"csrf": csrf, "action.mailbox_full": "none"}).status == 403

    # an admin changes it with the form; a bad value is refused on the page and changes nothing
    ab = w.signed_in(admin)
    page = ab.get("/blocks")
    form = page.form("/blocks/policy")
    assert form.fields["action.mailbox_full"] == "suppress" and form.fields["action.invalid_recipient"] == "default"
    bad = ab.post("/blocks/policy", form.fields | {"action.tls": "quarantine"})
    assert bad.status == 400 and "&#39;quarantine&#39;" in bad.text
    assert d.http("GET", "/v1/block-policy", token=viewer_key)[2]["overrides"]["mailbox_full"] == "suppress"
    done = ab.submit(page, "/blocks/policy", **{"action.mailbox_full": "default", "action.tls": "alert"})
    assert done.status == 303 and done.location == "/blocks?done=blocks_policy_set"
    assert d.http("GET", "/v1/block-policy", token=viewer_key)[2]["overrides"] == {"spam_block": "none", "tls": "alert"}
    after = ab.get(done.location)
    assert "The block policy is saved" in page_text(after.text)
    assert after.form("/blocks/policy").fields["action.tls"] == "alert"
    (row,) = [r for r in d.ops_log() if r["action"] == "console.blocks.policy" and r["result"] == "ok"]
    assert row["actor"].startswith(f"console:{admin.login} (") and "tls=alert" in row["detail"]

    ja = w.signed_in(viewer, "ja").get("/blocks")
    assert "ブロックポリシー" in ja.text and "ブロックせず記録のみ" in ja.text

    status, _, got = d.http("PUT", "/v1/block-policy", {"overrides": {}}, token=admin_key)
    assert status == 200 and got["overrides"] == {} and got["actions"] == got["host_actions"]


def test_a_block_past_its_watch_period_goes_at_the_daemons_expiry_run(make_cmcd: Any, dns: DnsServer) -> None:
    """The expiry job runs at start and every hour after, off the event loop: a block whose watch period
    ended while the daemon was down is gone at the next start, logged, on the operation log and counted."""
    port = free_port("127.0.0.2")
    metrics = free_port("127.0.0.1")
    with Sink("127.0.0.2", port, rcpt_reply=lambda a: "550 5.1.1 no such user"), Sink("127.0.0.9", port):
        d = start(make_cmcd, dns, port, bounces={"watch_period": "2s"}, metrics={"listen": f"127.0.0.1:{metrics}"})
        qid = send(d, "alice", "alice@acme.test", "gone@dst.test")
        d.wait_mail_log(lambda rows: final(rows, 1), qid)
        (block,) = wait_until(lambda: d.admin("suppression.list", tenant="acme"), "the block made")
        assert block["bounce_class"] == "invalid_recipient" and round(block["expires"] - block["created"]) == 2
        before = scrape_until(metrics, lambda m: "cmcd_blocks_expired" in m.families)
        assert before.value("cmcd_blocks_expired_total") == 0
        d.stop()
        wait_until(lambda: time.time() > block["expires"], "the watch period over", 5)
        d.start()
        d.wait_log(r"event=blocks_expired count=1\b")
        assert d.admin("suppression.list", tenant="acme") == []
        (row,) = [r for r in d.ops_log() if r["action"] == "blocks.expire"]
        assert (row["actor"], row["detail"]) == ("cmcd", "expired=1")
        scraped = scrape_until(metrics, lambda m: m.value("cmcd_blocks_expired_total") == 1)
        assert scraped.value("cmcd_blocks_expired_total") == 1
        assert scraped.value("cmcd_block_expiry_failures_total") == 0
