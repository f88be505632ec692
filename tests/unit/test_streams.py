"""Message streams at intake and suppression scopes, on a real store and spool with a fixed clock:
which stream a message gets, what leaves it before signing, a broadcast's one-click fields and one
message per recipient; an unsubscribe holds back broadcast mail only and outlives a bounce block."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from cmcd import unsubscribe
from cmcd.bounces import BlockPolicy
from cmcd.config import Size
from cmcd.errors import Conflict, NotFound
from cmcd.records import SpoolMessage
from cmcd.store import open_store
from cmcd.submit import headers, refusals
from cmcd.submit.refusals import Accepted
from cmcd.tenancy.refusals import Refusal
from cmcd.tenancy.suppressions import Suppressions
from tests.unit.test_bounce_blocks import DAY, T0, bounce
from tests.unit.test_intake_refusals import BODY, INFO, Intake, running

BASE = "https://mail.example.com"


async def prepared(intake: Intake, body: bytes, rcpts: list[str], stream: str | None = None) -> list[SpoolMessage]:
    result = await intake.service.prepare(intake.sender, "alice@acme.test", rcpts, body, INFO, stream=stream)
    assert not isinstance(result, Refusal), result
    return result


def fields(m: SpoolMessage) -> dict[str, list[str]]:
    """The header fields of M by lower-case name, values unfolded."""
    info = headers.parse(m.body)
    out: dict[str, list[str]] = {}
    name = ""
    for line in m.body[: info.header_end].decode().split("\r\n"):
        if line[:1] in (" ", "\t") and name:
            out[name][-1] += " " + line.strip()
        elif ":" in line:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            out.setdefault(name, []).append(value.strip())
    return out


@pytest.fixture
async def api_on(tmp_path: Path) -> AsyncIterator[Intake]:
    """Intake with an API listener configured, so broadcast mail gets one-click fields (BASE)."""
    async with running(tmp_path, max_recipients=10) as it:
        cfg = it.service.config
        it.service.config = replace(cfg, api=replace(cfg.api, listen="127.0.0.1:8443", public_url=BASE))
        yield it


async def test_the_stream_comes_from_the_field_then_the_caller_then_the_users_default(api_on: Intake) -> None:
    rcpt = ["bob@example.net"]
    assert [m.stream for m in await prepared(api_on, BODY, rcpt)] == ["transactional"]
    assert [m.stream for m in await prepared(api_on, BODY, rcpt, "broadcast")] == ["broadcast"]
    marked = b"X-Cmcd-Stream:  Transactional \r\n" + BODY
    (m,) = await prepared(api_on, marked, rcpt, "broadcast")
    assert m.stream == "transactional" and b"x-cmcd-stream" not in m.body.lower()
    store = api_on.service.astore.store
    store.conn.execute("UPDATE users SET stream = 'broadcast' WHERE id = ?", (api_on.sender.user_id,))
    store.bump_directory(accounts=True)
    await api_on.service.directory.refresh(force=True)
    assert [m.stream for m in await prepared(api_on, BODY, rcpt)] == ["broadcast"]
    bad = b"X-Cmcd-Stream: bulk\r\n" + BODY
    result = await api_on.service.prepare(api_on.sender, "alice@acme.test", rcpt, bad, INFO)
    assert result == refusals.bad_stream("bulk")
    assert result.reply == "550 5.6.0 X-Cmcd-Stream: must be transactional or broadcast, not 'bulk'"


async def test_a_broadcast_is_one_message_per_recipient_each_with_its_own_link(api_on: Intake) -> None:
    own = b"List-Unsubscribe: <mailto:leave@acme.test?subject=stop>,\r\n <https://acme.test/out>\r\n"
    body = own + b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" + BODY
    messages = await prepared(api_on, body, ["bob@example.net", "carol@example.org"], "broadcast")
    assert [[r.address for r in m.recipients] for m in messages] == [["bob@example.net"], ["carol@example.org"]]
    assert len({m.queue_id for m in messages}) == 2
    tokens = unsubscribe.Tokens(api_on.service.astore.store.keys)
    for m, rcpt in zip(messages, ["bob@example.net", "carol@example.org"], strict=True):
        f = fields(m)
        assert f["list-unsubscribe-post"] == ["List-Unsubscribe=One-Click"]
        (value,) = f["list-unsubscribe"]
        link, mailto = [u.strip(" <>") for u in value.split(",")]
        assert mailto == "mailto:leave@acme.test?subject=stop"  # the tenant's mailto: kept, its https: not
        assert link.startswith(BASE + "/u/")
        sub = tokens.read(link.removeprefix(BASE + "/u/"))
        assert sub == unsubscribe.Subscription(api_on.sender.tenant_id, "broadcast", rcpt)
        assert rcpt.encode() not in link.encode()
        assert f" id {m.queue_id};" in f["received"][0]  # each copy is a message of its own


async def test_transactional_mail_keeps_the_tenants_own_fields_and_gets_none_of_ours(api_on: Intake) -> None:
    own = b"List-Unsubscribe: <mailto:leave@acme.test>\r\n"
    (m,) = await prepared(api_on, own + BODY, ["bob@example.net", "carol@example.org"])
    assert fields(m)["list-unsubscribe"] == ["<mailto:leave@acme.test>"]
    assert "list-unsubscribe-post" not in fields(m)
    assert len(m.recipients) == 2


async def test_without_an_api_listener_a_broadcast_has_no_one_click_fields(tmp_path: Path) -> None:
    async with running(tmp_path, max_recipients=10) as intake:
        messages = await prepared(intake, BODY, ["bob@example.net", "carol@example.org"], "broadcast")
        assert len(messages) == 1 and messages[0].stream == "broadcast"
        assert "list-unsubscribe" not in fields(messages[0])


async def test_a_split_broadcast_is_accepted_as_one_transaction_counted_per_message(api_on: Intake) -> None:
    body = b"X-Cmcd-Stream: broadcast\r\n" + BODY
    rcpts = ["bob@example.net", "carol@example.org", "dave@example.com"]
    accepted = await api_on.service.finish(api_on.sender, "alice@acme.test", rcpts, body, INFO)
    assert isinstance(accepted, Accepted) and accepted.copies == 3
    assert accepted.reply == f"250 2.0.0 Ok: queued as {accepted.queue_id} and 2 more, one message per recipient"
    assert api_on.service.stats.accepted == {"acme": 3}
    # the daily quota (4) had room for 3: one more message is refused, a broadcast to two as well
    assert isinstance(await api_on.service.finish(api_on.sender, "alice@acme.test", rcpts[:1], BODY, INFO), Accepted)
    assert await api_on.service.finish(api_on.sender, "alice@acme.test", rcpts[:2], body, INFO) == (
        refusals.daily_quota(4, would_exceed=True)
    )


# -- suppression scopes ------------------------------------------------------------------------------


def test_in_memory_an_unsubscribe_holds_back_broadcast_mail_only(tmp_path: Path) -> None:
    store = open_store(tmp_path / "cmcd.db", tmp_path / "data.key")
    try:
        s = Suppressions(store.keys)
        s.load([(1, store.keys.index("Bob@Example.net"), "broadcast"), (1, store.keys.index("gone@x.test"), "")])
        assert s.contains(1, "bob@example.net", "broadcast")
        assert not s.contains(1, "bob@example.net", "transactional")
        assert not s.contains(1, "bob@example.net")  # RCPT: held back from every stream only
        assert not s.contains(2, "bob@example.net", "broadcast")  # another tenant's list
        assert all(s.contains(1, "gone@x.test", stream) for stream in ("", "broadcast", "transactional"))
        s.add(1, "new@x.test", "broadcast")
        s.load([])  # a reload before the store has it keeps it
        assert s.contains(1, "new@x.test", "broadcast") and not s.contains(1, "new@x.test", "transactional")
    finally:
        store.close()


def test_an_unsubscribe_lives_beside_a_bounce_block_and_outlives_its_expiry(tmp_path: Path) -> None:
    store = open_store(tmp_path / "cmcd.db", tmp_path / "data.key")
    try:
        store.tenant_add("acme")
        assert store.suppression_add("acme", "r@dst.test", "unsubscribed", "broadcast") is True
        assert store.suppression_add("acme", "R@dst.test", "unsubscribed again", "broadcast") is False
        store.insert_mail_events([bounce(store, T0, "invalid_recipient", suppress=True)], BlockPolicy())
        index = sorted(store.suppression_index(), key=lambda e: e[2])
        assert [(t, h, s) for t, h, s in index] == [
            (1, store.keys.index("r@dst.test"), ""),
            (1, store.keys.index("r@dst.test"), "broadcast"),
        ]
        assert sorted(r["stream"] for r in store.suppressions("acme")) == ["all", "broadcast"]
        assert store.expire_blocks(T0 + 31 * DAY) == 1
        assert store.suppression_index() == [(1, store.keys.index("r@dst.test"), "broadcast")]
        # an address held back from every stream for good needs no unsubscribe row
        assert store.suppression_add("acme", "gone@dst.test", "operator") is True
        assert store.suppression_add("acme", "gone@dst.test", "unsubscribed", "broadcast") is False
        # lifting a block never lifts a recipient's unsubscribe: that takes the operator naming it
        store.insert_mail_events([bounce(store, T0 + 40 * DAY, "invalid_recipient", suppress=True)], BlockPolicy())
        store.suppression_delete("acme", "r@dst.test")
        assert (1, store.keys.index("r@dst.test"), "broadcast") in store.suppression_index()
        with pytest.raises(Conflict, match="unsubscribed itself"):
            store.suppression_delete("acme", "r@dst.test")
        store.suppression_delete("acme", "r@dst.test", "broadcast")
        assert store.suppression_index() == [(1, store.keys.index("gone@dst.test"), "")]
        with pytest.raises(NotFound, match="broadcast unsubscribe list"):
            store.suppression_delete("acme", "gone@dst.test", "broadcast")
    finally:
        store.close()


def test_a_purged_tenants_id_is_never_given_again(tmp_path: Path) -> None:
    """An unsubscribe link names its tenant by id, and messages outlive their tenant's purge: the
    newest tenant purged leaves its id unused, so a new tenant cannot receive its old links."""
    store = open_store(tmp_path / "cmcd.db", tmp_path / "data.key")
    try:
        store.tenant_add("acme")
        old = store.tenant_add("beta")
        store.purge_begin("beta", "test", None)
        store.tenant_purge("beta")
        new = store.tenant_add("gamma")
        assert new.id == old.id + 1 and store.tenant("gamma").id == new.id
        assert store.tenant_add("beta").id == old.id + 2
    finally:
        store.close()


async def test_a_broadcast_split_is_bounded_and_charges_the_rate_for_every_copy(tmp_path: Path) -> None:
    async with running(tmp_path, max_recipients=10, tenant_limits={"acme": {"messages_per_second": 2.0}}) as it:
        cfg = it.service.config
        it.service.config = replace(
            cfg, api=replace(cfg.api, listen="127.0.0.1:8443", public_url=BASE, max_bulk_bytes=Size(4 * len(BODY)))
        )
        body = b"X-Cmcd-Stream: broadcast\r\n" + BODY
        five = [f"r{n}@example.net" for n in range(5)]
        assert await it.service.finish(it.sender, "alice@acme.test", five, body, INFO) == (
            refusals.broadcast_too_big(5, len(BODY), 4 * len(BODY))  # the stream field taken out
        )
        assert it.service.data_budget.held_bytes == 0
        assert it.service.check_mail(it.sender, "alice@acme.test", False) is None  # MAIL takes a token (2 -> 1)
        accepted = await it.service.finish(it.sender, "alice@acme.test", five[:3], body, INFO)
        assert isinstance(accepted, Accepted) and accepted.copies == 3
        assert it.service.data_budget.held_bytes == 0
        # three messages for one token: the bucket owes one; the rate (2/s) admits the next MAIL after 1 s
        assert it.service.check_mail(it.sender, "alice@acme.test", False) == refusals.rate_limit(2.0)
        it.clock.now += 0.9
        assert it.service.check_mail(it.sender, "alice@acme.test", False) == refusals.rate_limit(2.0)
        it.clock.now += 0.2
        assert it.service.check_mail(it.sender, "alice@acme.test", False) is None
