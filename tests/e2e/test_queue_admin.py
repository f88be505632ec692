"""Queue administration through cmcctl's verbs on the admin socket, against a delivering daemon."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import AdminError, Cmcd
from tests.e2e.test_delivery import FAST, submit
from tests.peers import Sink, free_port


@pytest.fixture
def tempfail() -> Iterator[Sink]:
    """Every recipient gets 451 until .ok is set, so messages stay deferred."""
    state = {"ok": False}

    def reply(address: str) -> str | None:
        return None if state["ok"] else "451 4.3.0 come back later"

    with Sink("127.0.0.2", free_port("127.0.0.2"), rcpt_reply=reply) as sink:
        sink.state = state  # type: ignore[attr-defined]
        yield sink


@pytest.fixture
def d(make_cmcd: Any, tempfail: Sink) -> Cmcd:
    delivery = FAST | {"routes": {"*": tempfail.address}, "retry_schedule": ["1h"]}
    return make_cmcd({"delivery": delivery})  # type: ignore[no-any-return]


def deferred(d: Cmcd, qid: str, n: int = 1) -> None:
    d.wait_mail_log(lambda rows: sum(r["event"] == "deferred" for r in rows) >= n, qid)


def test_list_show_summary_and_paging(d: Cmcd) -> None:
    qids = [submit(d, [f"r{n}@dst{n % 2}.test"]) for n in range(5)]
    theirs = None
    with d.smtp(login="bob") as c:
        c.sendmail("bob@beta.test", ["x@dst0.test"], b"From: bob@beta.test\r\n\r\nhi\r\n")
    for q in qids:
        deferred(d, q)
    page1 = d.admin("queue.list", tenant="acme", limit=2)
    page2 = d.admin("queue.list", tenant="acme", limit=2, after=page1["next"])
    page3 = d.admin("queue.list", tenant="acme", limit=2, after=page2["next"])
    assert [m["queue_id"] for m in page1["items"] + page2["items"] + page3["items"]] == qids
    assert page3["next"] is None and all(m["tenant"] == "acme" for m in page1["items"])
    assert [m["queue_id"] for m in d.admin("queue.list", domain="dst1.test")["items"]] == qids[1::2]
    everything = d.admin("queue.list")["items"]
    assert len(everything) == 6 and {m["states"][0] for m in everything} <= {"deferred", "inflight", "queued"}
    theirs = [m["queue_id"] for m in everything if m["tenant"] == "beta"][0]
    assert d.admin("queue.list", older_than=3600)["items"] == []

    shown = d.admin("queue.show", queue_id=qids[0])
    (rcpt,) = shown["recipients"]
    assert (rcpt["address"], rcpt["state"], rcpt["attempts"]) == ("r0@dst0.test", "deferred", 1)
    assert rcpt["last_response"] == "451 4.3.0 come back later" and rcpt["next_attempt"] > time.time() + 3000
    assert "body" not in shown
    with pytest.raises(AdminError, match="no message"):
        d.admin("queue.show", queue_id=theirs, tenant="acme")  # another tenant's id is simply not found

    summary = d.admin("queue.summary")
    assert summary["states"]["deferred"] == 6
    assert {x["domain"]: x["counts"][0] for x in summary["domains"]} == {"dst0.test": 4, "dst1.test": 2}
    assert summary["total"][0] == 6 and summary["total"][1] == 6  # all younger than 5 minutes
    assert d.admin("queue.summary", tenant="beta")["states"]["deferred"] == 1


def test_retry_hold_release_and_delete(d: Cmcd, tempfail: Sink) -> None:
    a, b, c = (submit(d, [f"r{n}@dst.test"]) for n in range(3))
    for q in (a, b, c):
        deferred(d, q)
    assert d.admin("queue.hold", queue_id=b) == {"recipients": 1}
    assert d.admin("queue.show", queue_id=b)["held"] is True
    tempfail.state["ok"] = True  # type: ignore[attr-defined]
    assert d.admin("queue.retry", domain="dst.test") == {"recipients": 2}  # the held one is not due
    rows = d.wait_mail_log(lambda rows: sum(r["event"] == "delivered" for r in rows) == 2)
    assert {r["queue_id"] for r in rows if r["event"] == "delivered"} == {a, c}
    # a message submitted now is claimed by a later scheduler round, which passes over b if it is held
    probe = submit(d, ["probe@dst.test"])
    d.wait_mail_log(lambda rows: any(r["event"] == "delivered" for r in rows), probe)
    assert d.admin("queue.show", queue_id=b)["recipients"][0]["state"] == "held"

    assert d.admin("queue.release", queue_id=b) == {"recipients": 1}
    d.wait_mail_log(lambda rows: any(r["event"] == "delivered" for r in rows), b)

    tempfail.state["ok"] = False  # type: ignore[attr-defined]
    gone = submit(d, ["r9@dst.test"])
    deferred(d, gone)
    with pytest.raises(AdminError, match="no message"):
        d.admin("queue.delete", queue_id=gone, tenant="beta")
    assert d.admin("queue.delete", queue_id=gone) == {"queue_id": gone, "recipients": 1, "deleted": True}
    rows = d.wait_mail_log(lambda rows: any(r["event"] == "deleted-by-operator" for r in rows), gone)
    assert [r["event"] for r in rows] == ["accepted", "deferred", "deleted-by-operator"]
    with pytest.raises(AdminError, match="no message"):
        d.admin("queue.show", queue_id=gone)
    assert gone not in d.spooled()


def test_hold_a_whole_tenant_and_refusals_are_logged(d: Cmcd) -> None:
    qid = submit(d, ["r@dst.test"])
    deferred(d, qid)
    assert d.admin("queue.hold", tenant="acme") == {"recipients": 1}
    assert d.admin("queue.retry", all=True) == {"recipients": 0}
    assert d.admin("queue.release", tenant="acme") == {"recipients": 1}
    for verb, args in (
        ("queue.retry", {}),
        ("queue.retry", {"domain": "x.test", "all": True}),
        ("queue.hold", {}),
        ("queue.list", {"state": "bogus"}),
        ("queue.list", {"tenant": "nosuch"}),
        ("queue.delete", {"queue_id": "NOSUCH"}),
    ):
        with pytest.raises(AdminError):
            d.admin(verb, **args)
    ops = [(o["action"], o["result"]) for o in d.ops_log() if o["action"].startswith("queue.")]
    assert ops == [
        ("queue.hold", "ok"),
        ("queue.retry", "ok"),
        ("queue.release", "ok"),
        ("queue.retry", "refused"),
        ("queue.retry", "refused"),
        ("queue.hold", "refused"),
        ("queue.list", "refused"),  # a refused read that named something is on record too
        ("queue.list", "refused"),
        ("queue.delete", "refused"),
    ]
