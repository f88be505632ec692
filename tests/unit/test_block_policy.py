"""A tenant's own block policy, in a real store with a fixed clock: its action for a class overrides
the host's in the count decision the store makes and in what the directory gives the engine, a
"default" goes back to the host's, bad classes and actions are named; and the hourly block expiry
removes what its watch period ended, counts it and puts it on the operation log."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from types import MappingProxyType

import pytest

from cmcd import bounces
from cmcd.admin.retention import BlockExpiryJob
from cmcd.bounces import DEFAULT_ACTIONS, BlockPolicy
from cmcd.store import AsyncStore, open_store
from cmcd.store.schema import MIGRATIONS
from cmcd.store.store import Store
from cmcd.tenancy.directory import Snapshot
from tests.unit.test_bounce_blocks import DAY, POLICY, T0, blocks, bounce
from tests.unit.test_bounce_blocks import store as store  # the fixture: a store with tenants acme and beta

# -- the policy, pure -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "tenant", "cls", "expected"),
    [
        pytest.param({}, None, "mailbox_full", "count", id="no-tenant-actions: the host's default"),
        pytest.param({}, {"mailbox_full": "suppress"}, "mailbox_full", "suppress", id="tenant-overrides-default"),
        pytest.param({"mailbox_full": "none"}, {"mailbox_full": "suppress"}, "mailbox_full", "suppress",
                     id="tenant-overrides-host-setting"),
        pytest.param({"mailbox_full": "none"}, {"spam_block": "none"}, "mailbox_full", "none",
                     id="another-class-set: the host's setting"),
        pytest.param({}, {}, "authentication", "alert", id="empty-tenant-actions"),
    ],
)  # fmt: skip
def test_a_tenants_action_wins_over_the_hosts(
    host: dict[str, str], tenant: dict[str, str] | None, cls: str, expected: str
) -> None:
    policy = bounces.block_policy(host, 3, 7 * DAY, 30 * DAY)
    assert policy.action(cls, tenant) == expected
    assert policy.effective(tenant)[cls] == expected and list(policy.effective(tenant)) == list(bounces.CLASSES)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        pytest.param({"mailbox_ful": "suppress"}, ["'mailbox_ful'", "mailbox_full", "invalid_recipient"],
                     id="unknown-class: named with the known ones"),
        pytest.param({"mailbox_full": "block"}, ["'block'", "mailbox_full", "suppress, count, alert, none", "default"],
                     id="unknown-action: named with the known ones"),
        pytest.param({"mailbox_full": ""}, ["''", "mailbox_full"], id="empty-action"),
    ],
)  # fmt: skip
def test_a_bad_class_or_action_is_named(changes: dict[str, str], named: list[str]) -> None:
    with pytest.raises(ValueError) as caught:
        bounces.check_tenant_actions(changes)
    assert all(word in str(caught.value) for word in named), str(caught.value)


def test_good_changes_pass_and_default_removes() -> None:
    bounces.check_tenant_actions({"mailbox_full": "suppress", "spam_block": "default"})
    merged = bounces.apply_tenant_actions({"spam_block": "none", "tls": "alert"}, {"mailbox_full": "suppress",
                                                                                  "spam_block": "default"})  # fmt: skip
    assert merged == {"mailbox_full": "suppress", "tls": "alert"}
    text = bounces.tenant_actions_text(merged)
    assert text == "mailbox_full=suppress,tls=alert"
    assert dict(bounces.parse_tenant_actions(text)) == merged


def test_a_stored_entry_this_version_does_not_know_is_left_out() -> None:
    parsed = bounces.parse_tenant_actions("mailbox_full=suppress,new_class=suppress,tls=quarantine,,junk")
    assert dict(parsed) == {"mailbox_full": "suppress"}
    assert dict(bounces.parse_tenant_actions("")) == {}


# -- in the store --------------------------------------------------------------------------------


def test_migration_17_adds_the_column_with_no_actions(store: Store) -> None:
    assert "block_actions" in MIGRATIONS[16]
    row = store.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert int(row[0]) == len(MIGRATIONS) >= 17
    assert store.tenant_block_actions() == {}
    assert store.tenant_summary("acme")["block_actions"] == {}


def test_tenant_set_merges_changes_and_the_directory_reads_them(store: Store) -> None:
    before = store.directory_state()
    store.tenant_set("acme", block_actions={"mailbox_full": "suppress", "spam_block": "none"})
    store.tenant_set("acme", block_actions={"spam_block": "default", "tls": "alert"})
    acme, beta = store.tenant("acme").id, store.tenant("beta").id
    assert dict(store.tenant_block_actions()[acme]) == {"mailbox_full": "suppress", "tls": "alert"}
    assert beta not in store.tenant_block_actions()
    assert store.tenant_summary("acme")["block_actions"] == {"mailbox_full": "suppress", "tls": "alert"}
    snap = Snapshot.from_rows(store.directory_rows())
    assert snap.block_actions == {acme: {"mailbox_full": "suppress", "tls": "alert"}}
    assert store.directory_state() == before  # the store method alone bumps nothing: the tenancy command does
    store.tenant_set("acme", block_actions={"mailbox_full": "default", "tls": "default"})
    assert store.tenant_block_actions() == {}


@pytest.mark.parametrize(
    ("acme", "beta", "acme_blocked", "beta_blocked"),
    [
        pytest.param({}, {}, True, True, id="host-count-policy: both blocked at the third"),
        pytest.param({"mailbox_full": "none"}, {}, False, True, id="acme-none: only beta blocked"),
        pytest.param({"mailbox_full": "alert"}, {"mailbox_full": "count"}, False, True, id="acme-alert"),
    ],
)
def test_the_count_decision_reads_each_tenants_action(
    store: Store, acme: dict[str, str], beta: dict[str, str], acme_blocked: bool, beta_blocked: bool
) -> None:
    for name, actions in (("acme", acme), ("beta", beta)):
        if actions:
            store.tenant_set(name, block_actions=actions)
    for n in range(3):
        store.insert_mail_events(
            [bounce(store, T0 + n, "mailbox_full", n=n, rcpt="a@dst.test"),
             bounce(store, T0 + n, "mailbox_full", n=n, rcpt="b@dst.test", tenant="beta")],
            POLICY,
        )  # fmt: skip
    assert {b[0] for b in blocks(store)} == {a for a, on in (("a@dst.test", acme_blocked),
                                                             ("b@dst.test", beta_blocked)) if on}  # fmt: skip


def test_a_tenant_may_count_a_class_the_host_suppresses_at_once(store: Store) -> None:
    """invalid_recipient=count for acme: the engine sets no suppress flag, and the store counts it."""
    store.tenant_set("acme", block_actions={"invalid_recipient": "count"})
    for n in range(2):
        store.insert_mail_events([bounce(store, T0 + n * DAY, "invalid_recipient", n=n)], POLICY)
    assert blocks(store) == []
    store.insert_mail_events([bounce(store, T0 + 2 * DAY, "invalid_recipient", n=2)], POLICY)
    assert blocks(store) == [("r@dst.test", "invalid_recipient", T0 + 32 * DAY)]  # the host's watch period


def test_the_host_threshold_and_window_hold_for_a_tenants_count(store: Store) -> None:
    store.tenant_set("acme", block_actions={"policy": "count"})
    p = BlockPolicy(MappingProxyType(dict(DEFAULT_ACTIONS)), count_threshold=2, count_window_s=DAY)
    store.insert_mail_events([bounce(store, T0, "policy", n=0), bounce(store, T0 + 2 * DAY, "policy", n=1)], p)
    assert blocks(store) == []  # two, but a day apart is too far
    store.insert_mail_events([bounce(store, T0 + 2 * DAY + 60, "policy", n=2)], p)
    assert [b[:2] for b in blocks(store)] == [("r@dst.test", "policy")]


# -- the hourly expiry -------------------------------------------------------------------------


@pytest.fixture
async def astore(tmp_path: Path) -> AsyncIterator[AsyncStore]:
    s = open_store(tmp_path / "cmcd.db", tmp_path / "data.key")
    s.tenant_add("acme")
    a = AsyncStore(s)
    yield a
    a.close()


async def test_the_expiry_job_removes_ended_blocks_counts_and_logs_them(astore: AsyncStore) -> None:
    store = astore.store
    now = [T0]
    job = BlockExpiryJob(astore, clock=lambda: now[0])
    rows = [bounce(store, T0, "invalid_recipient", suppress=True),
            bounce(store, T0 + DAY, "invalid_recipient", rcpt="later@dst.test", n=1, suppress=True)]  # fmt: skip
    await astore.call(store.insert_mail_events, rows, POLICY)
    now[0] = T0 + 30 * DAY - 1
    assert await job.run_once() == 0 and job.expired == 0 and len(blocks(store)) == 2
    now[0] = T0 + 30 * DAY + 3600  # an hour's run after the first watch period ended
    assert await job.run_once() == 1 and job.expired == 1 and job.runs == 2
    assert [b[0] for b in blocks(store)] == ["later@dst.test"]
    ops = [r for r in store.log_page("ops") if r["action"] == "blocks.expire"]
    assert [(r["actor"], r["target"], r["result"], r["detail"]) for r in ops] == [("cmcd", "blocks", "ok", "expired=1")]


async def test_the_expiry_job_runs_at_start_and_again_after_its_interval(astore: AsyncStore) -> None:
    store = astore.store
    await astore.call(store.insert_mail_events, [bounce(store, T0, "invalid_recipient", suppress=True)], POLICY)
    now = [T0]
    job = BlockExpiryJob(astore, clock=lambda: now[0], interval_s=0.01)
    job.start()
    try:
        async with asyncio.timeout(10):
            while job.runs < 1:
                await asyncio.sleep(0.005)
            assert job.expired == 0
            now[0] = T0 + 31 * DAY
            while job.expired < 1:
                await asyncio.sleep(0.005)
    finally:
        await job.close()
    assert blocks(store) == [] and job.failures == 0
