"""Failed logins counted in the store by every worker process together (cmcd/store/throttle_store.py
and the throttle of cmcd/submit/auth.py), on a real store in a temporary directory: claims and
their limits as tables; two processes' SubmitServices on one store holding one count; and, while
the store cannot be written (another connection holds its write lock), each counting alone
against its share. No daemon, no sockets, a fixed clock."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cmcd import config, crypto
from cmcd.queue.spool import Spool
from cmcd.store import AsyncStore, Store, open_store
from cmcd.submit import refusals
from cmcd.submit.service import SubmitService

T0 = 1_794_999_600.0
IP = "192.0.2.7"
PASSWORD = "the right password"
ADDRESS, ALICE = f"address {IP}", f"login {IP} alice"


def _rows(store: Store) -> int:
    return int(store.conn.execute("SELECT COUNT(*) FROM login_failures").fetchone()[0])


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(tmp_path / "cmcd.db", tmp_path / "data.key")
    yield s
    s.close()


# -- the store's counts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "held"),
    [
        ([(ADDRESS, 5), (ALICE, 3)], [None, None, None, 1, 1]),
        ([(ADDRESS, 2), (ALICE, 3)], [None, None, 0, 0, 0]),
        ([(ADDRESS, 3), (ALICE, 3)], [None, None, None, 0, 0]),
        ([(ADDRESS, 0), (ALICE, 4)], [None, None, None, None, 1]),
        ([(ADDRESS, 0), (ALICE, 0)], [None] * 5),
    ],
    ids=["login-first", "address-first", "both-at-once-address-named", "no-address-limit", "no-limits"],
)
def test_claims_stop_at_the_first_limit_reached(store: Store, limits: list[tuple[str, int]], held: list[int]) -> None:
    got = [store.failure_claim(limits, 600, T0 + i) for i in range(5)]
    assert [g.held for g in got] == held
    counted = sum(g.held is None for g in got)
    assert store.failure_counts([k for k, _ in limits], 600, T0 + 5) == (counted, counted)
    assert got[-1].counts == (counted, counted)
    assert all(len(g.rows) == (2 if g.held is None else 0) for g in got)


def test_a_released_claim_counts_no_more(store: Store) -> None:
    first = store.failure_claim([(ALICE, 2)], 600, T0)
    second = store.failure_claim([(ALICE, 2)], 600, T0)
    assert store.failure_claim([(ALICE, 2)], 600, T0).held == 0
    store.failure_release(second.rows)  # that check succeeded
    assert store.failure_counts([ALICE], 600, T0) == (1,)
    assert store.failure_claim([(ALICE, 2)], 600, T0).held is None
    assert first.rows and _rows(store) == 2


def test_failures_count_within_their_window_and_go_after_it(store: Store) -> None:
    store.failure_claim([(ALICE, 10)], 600, T0)
    assert store.failure_counts([ALICE], 600, T0 + 599.5) == (1,)
    assert store.failure_counts([ALICE], 600, T0 + 600) == (0,)
    assert _rows(store) == 1
    store.failure_add([ADDRESS], 600, T0 + 600.5)  # the next write drops rows past their window
    assert _rows(store) == 1
    assert store.failure_counts([ADDRESS, ALICE], 600, T0 + 601) == (1, 0)


def test_a_failure_found_after_the_fact_is_counted_past_the_limit(store: Store) -> None:
    for _ in range(3):
        store.failure_claim([(ALICE, 3)], 600, T0)
    assert store.failure_add([ALICE], 600, T0) == (4,)


def test_a_held_claim_with_instead_writes_one_row_counted_for_no_one(store: Store) -> None:
    otp, nobody = "otp 7", "otp 0"
    for _ in range(2):
        assert store.failure_claim([(otp, 2)], 900, T0, instead=nobody).held is None
    before = _rows(store)
    got = store.failure_claim([(otp, 2)], 900, T0, instead=nobody)
    assert got.held == 0 and got.rows == ()
    assert _rows(store) == before + 1
    assert store.failure_counts([otp, nobody], 900, T0) == (2, 1)


def test_the_table_names_no_address_nor_login(store: Store) -> None:
    store.failure_claim([(ADDRESS, 5), (ALICE, 3)], 600, T0)
    keys = [bytes(r[0]) for r in store.conn.execute("SELECT key_hmac FROM login_failures")]
    assert len(keys) == 2 and all(len(k) == 16 and b"192.0.2" not in k and b"alice" not in k for k in keys)


# -- SubmitServices of two worker processes on one store ---------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def worker(root: Path, shard: int, clock: Clock, **smtp: object) -> AsyncIterator[SubmitService]:
    """The SubmitService of worker SHARD of two: its own store connection and spool, the shared store."""
    store = open_store(root / "cmcd.db", root / "data.key")
    astore = AsyncStore(store)
    spool = Spool(root / f"spool{shard}", store.keys)
    spool.start()
    cfg = config.from_dict(
        {
            "server": {"hostname": "mx.test", "workers": 2},
            "smtp": {"listen": [], "listen_tls": []} | smtp,
            "spool": {"min_free": 0},
        }
    )
    service = SubmitService(cfg, astore, spool, clock)
    service.signer = None  # no DKIM keys here
    await service.start()
    try:
        yield service
    finally:
        await service.close()
        spool.stop()
        astore.close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A store with tenant acme and its senders alice and bob."""
    store = open_store(tmp_path / "cmcd.db", tmp_path / "data.key")
    store.tenant_add("acme")
    hashed = crypto.hash_password(PASSWORD)
    for login in ("alice", "bob"):
        store.user_add("acme", login, "sender", hashed)
    store.close()
    return tmp_path


async def test_two_workers_hold_one_count(root: Path) -> None:
    clock = Clock()
    limits = {"auth_fail_limit": 3, "auth_fail_limit_per_address": 5}
    async with worker(root, 0, clock, **limits) as a, worker(root, 1, clock, **limits) as b:
        for w in (a, b, a):
            assert await w.authenticate("alice", "wrong", IP, "PLAIN") is refusals.AUTH_INVALID
        for w in (a, b):  # held back by both, the right password too
            assert await w.authenticate("alice", PASSWORD, IP, "PLAIN") is refusals.AUTH_THROTTLED
        assert await b.authenticate("bob", PASSWORD, IP, "PLAIN") is not refusals.AUTH_THROTTLED
        for w in (b, a):
            assert await w.authenticate("nobody", "wrong", IP, "PLAIN") is refusals.AUTH_INVALID
        for w in (a, b):  # the address's 5
            assert await w.authenticate("bob", PASSWORD, IP, "PLAIN") is refusals.AUTH_THROTTLED
        assert await a.authenticate("bob", PASSWORD, "192.0.2.8", "PLAIN") is not refusals.AUTH_THROTTLED
        clock.now += 600  # the window has passed
        assert await b.authenticate("alice", PASSWORD, IP, "PLAIN") is not refusals.AUTH_THROTTLED
        assert a.stats.auth["failed"] + b.stats.auth["failed"] == 5


async def test_a_right_password_gives_its_claim_back(root: Path) -> None:
    async with worker(root, 0, Clock(), auth_fail_limit=2) as a:
        for _ in range(5):  # the auth cache is cleared each time: every login is checked
            a.auth.forget_cached()
            assert await a.authenticate("alice", PASSWORD, IP, "PLAIN") is not refusals.AUTH_THROTTLED
        assert await a.astore.call(a.astore.store.failure_counts, [ALICE], 600, T0) == (0,)


async def test_while_the_store_cannot_be_written_each_worker_counts_alone_against_its_share(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    caplog.set_level(logging.INFO, logger="cmcd.submit")
    async with worker(root, 0, clock, auth_fail_limit=4) as a:
        a.astore.store.conn.execute("PRAGMA busy_timeout = 20")
        locker = sqlite3.connect(root / "cmcd.db", isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")  # another process holds the store's write lock
        try:
            for _ in range(2):  # its share: 4 // 2 workers
                assert await a.authenticate("alice", "wrong", IP, "PLAIN") is refusals.AUTH_INVALID
            assert await a.authenticate("alice", PASSWORD, IP, "PLAIN") is refusals.AUTH_THROTTLED
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        failed = [r.getMessage() for r in caplog.records if "event=auth_throttle_store_failed" in r.getMessage()]
        assert len(failed) == 1 and "share=1/2" in failed[0]
        # the store is back: the failures it missed still count, with those it takes, to the host's 4
        for _ in range(2):
            assert await a.authenticate("alice", "wrong", IP, "PLAIN") is refusals.AUTH_INVALID
        assert await a.authenticate("alice", PASSWORD, IP, "PLAIN") is refusals.AUTH_THROTTLED
        assert any("event=auth_throttle_store_ok" in r.getMessage() for r in caplog.records)
