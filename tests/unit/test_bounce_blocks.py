"""Blocks made from bounce classes, in a real store with a fixed clock: a class whose action is suppress
blocks at once, count blocks at the threshold within the window, alert never; a block expires after its
watch period unless a later bounce renewed it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cmcd.bounces import BlockPolicy
from cmcd.store import open_store
from cmcd.store.store import Store

DAY = 86400.0
T0 = 1_800_000_000.0
POLICY = BlockPolicy()  # the defaults: 3 within 7 days, 30 days' watch


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(tmp_path / "cmcd.db", tmp_path / "data.key")
    s.tenant_add("acme")
    s.tenant_add("beta")
    yield s
    s.close()


def bounce(
    store: Store, ts: float, cls: str, *, rcpt: str = "r@dst.test", n: int = 0, tenant: str = "acme",
    status: str = "bounced", suppress: bool = False, sender: str = "a@acme.test",
) -> tuple[Any, ...]:  # fmt: skip
    k = store.keys
    qid = f"Q{int(ts)}{n}{status[0]}"
    return (
        f"{qid}:{rcpt}:{status}", ts, store.tenant(tenant).id, qid, status, k.encrypt(sender), k.index(sender),
        k.encrypt(rcpt), k.index(rcpt), "dst.test", status, f"550 {cls}", 1, "mx.dst.test", "127.0.0.2", "", 1.0,
        100, "<m@x>", 1 if suppress else 0, "", cls,
    )  # fmt: skip


def blocks(store: Store) -> list[tuple[Any, ...]]:
    return [
        (store.keys.decrypt(bytes(r[0])), r[1], r[2])
        for r in store.conn.execute("SELECT address_enc, bounce_class, expires FROM suppressions ORDER BY id")
    ]


def test_a_flagged_bounce_blocks_at_once_with_its_class_and_expiry(store: Store) -> None:
    store.insert_mail_events([bounce(store, T0, "invalid_recipient", suppress=True)], POLICY)
    assert blocks(store) == [("r@dst.test", "invalid_recipient", T0 + 30 * DAY)]
    row = store.log_page("mail")[0]
    assert row["bounce_class"] == "invalid_recipient"


def test_without_a_policy_a_flagged_bounce_blocks_for_ever(store: Store) -> None:
    store.insert_mail_events([bounce(store, T0, "invalid_recipient", suppress=True)])
    assert blocks(store) == [("r@dst.test", "invalid_recipient", None)]


def test_a_row_of_19_columns_has_no_class(store: Store) -> None:
    store.insert_mail_events([bounce(store, T0, "mailbox_full")[:19]], POLICY)
    assert store.log_page("mail")[0]["bounce_class"] == "" and blocks(store) == []


@pytest.mark.parametrize(
    ("days", "blocked"),
    [
        pytest.param((0, 1, 2), True, id="three-in-two-days"),
        pytest.param((0, 3, 6.9), True, id="three-within-seven-days"),
        pytest.param((0, 4, 8), False, id="three-spread-over-eight-days"),
        pytest.param((0, 1), False, id="two-are-not-enough"),
    ],
)
def test_mailbox_full_blocks_at_the_third_within_the_window(
    store: Store, days: tuple[float, ...], blocked: bool
) -> None:
    for n, d in enumerate(days):
        store.insert_mail_events([bounce(store, T0 + d * DAY, "mailbox_full", n=n)], POLICY)
    last = T0 + days[-1] * DAY
    assert blocks(store) == ([("r@dst.test", "mailbox_full", last + 30 * DAY)] if blocked else [])


def test_counting_is_per_tenant_recipient_class_and_final_state(store: Store) -> None:
    rows = [
        bounce(store, T0, "mailbox_full", n=1),
        bounce(store, T0 + 1, "mailbox_full", n=2, tenant="beta"),
        bounce(store, T0 + 2, "mailbox_full", n=3, rcpt="other@dst.test"),
        bounce(store, T0 + 3, "mailbox_full", n=4, status="deferred"),
        bounce(store, T0 + 4, "policy", n=5),
        bounce(store, T0 + 5, "mailbox_full", n=6, sender=""),  # a bounce of a bounce never counts
    ]
    store.insert_mail_events(rows, POLICY)
    store.insert_mail_events([bounce(store, T0 + 6, "mailbox_full", n=7, status="expired")], POLICY)
    assert blocks(store) == []
    store.insert_mail_events([bounce(store, T0 + 7, "mailbox_full", n=8)], POLICY)
    assert blocks(store) == [("r@dst.test", "mailbox_full", T0 + 7 + 30 * DAY)]


def test_the_same_row_shipped_twice_counts_once(store: Store) -> None:
    row = bounce(store, T0, "mailbox_full", n=1)
    for _ in range(3):
        store.insert_mail_events([row], POLICY)
    store.insert_mail_events([bounce(store, T0 + 1, "mailbox_full", n=2)], POLICY)
    assert blocks(store) == []


@pytest.mark.parametrize("cls", ["authentication", "spam_block", "policy", "rate_limited", "other"])
def test_alert_and_none_classes_never_block(store: Store, cls: str) -> None:
    store.insert_mail_events([bounce(store, T0 + n, cls, n=n) for n in range(5)], POLICY)
    assert blocks(store) == []


def test_a_configured_count_class_blocks(store: Store) -> None:
    p = BlockPolicy({**POLICY.actions, "policy": "count"}, count_threshold=2)
    store.insert_mail_events([bounce(store, T0 + n, "policy", n=n) for n in range(2)], p)
    assert [b[:2] for b in blocks(store)] == [("r@dst.test", "policy")]


def test_a_block_expires_only_after_its_watch_period(store: Store) -> None:
    store.insert_mail_events([bounce(store, T0, "invalid_recipient", suppress=True)], POLICY)
    before = store.directory_state()
    assert store.expire_blocks(T0 + 30 * DAY - 1) == 0 and len(blocks(store)) == 1
    assert store.directory_state() == before
    assert store.expire_blocks(T0 + 30 * DAY) == 1 and blocks(store) == []
    assert store.directory_state()[1] == before[1] + 1  # the caches learn of the removal


def test_a_later_bounce_renews_the_block(store: Store) -> None:
    store.insert_mail_events([bounce(store, T0, "invalid_recipient", suppress=True)], POLICY)
    store.insert_mail_events([bounce(store, T0 + 20 * DAY, "invalid_recipient", n=1, suppress=True)], POLICY)
    assert blocks(store) == [("r@dst.test", "invalid_recipient", T0 + 50 * DAY)]
    assert store.expire_blocks(T0 + 31 * DAY) == 0
    store.insert_mail_events([bounce(store, T0 + 1 * DAY, "invalid_recipient", n=2, suppress=True)], POLICY)
    assert blocks(store)[0][2] == T0 + 50 * DAY  # an older bounce shipped late never shortens it
    assert store.expire_blocks(T0 + 50 * DAY) == 1


def test_an_operators_suppression_never_expires_nor_takes_an_expiry(store: Store) -> None:
    assert store.suppression_add("acme", "r@dst.test", "asked to")
    store.insert_mail_events([bounce(store, T0, "invalid_recipient", suppress=True)], POLICY)
    assert blocks(store) == [("r@dst.test", "", None)]
    assert store.expire_blocks(T0 + 365 * DAY) == 0


def test_watch_period_zero_makes_blocks_permanent(store: Store) -> None:
    p = BlockPolicy(watch_s=0.0)
    store.insert_mail_events([bounce(store, T0, "invalid_recipient", suppress=True)], p)
    assert blocks(store) == [("r@dst.test", "invalid_recipient", None)]
    assert store.expire_blocks(T0 + 3650 * DAY) == 0
