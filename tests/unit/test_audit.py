"""Login and operation-log rows through the spool's outbox: none lost while the store fails, none doubled after."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cmcd.queue.audit import AuditLog
from cmcd.queue.events import EventShipper
from cmcd.queue.spool import Spool
from cmcd.store import AsyncStore, open_store
from cmcd.store.log_store import LoginRecord, OpRecord

T0 = 1_794_999_600.0


class Parts:
    def __init__(self, spool: Spool, astore: AsyncStore, audit: AuditLog, shipper: EventShipper):
        self.spool, self.astore, self.audit, self.shipper = spool, astore, audit, shipper

    def rows(self, table: str) -> list[Any]:
        return self.astore.store.conn.execute(f"SELECT event_key, tenant_id FROM {table} ORDER BY id").fetchall()

    async def backlog(self) -> dict[str, int]:
        return await self.spool.outbox_backlog()


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[Parts]:
    store = open_store(tmp_path / "cmcd.db", tmp_path / "data.key")
    store.tenant_add("acme")
    astore = AsyncStore(store)
    spool = Spool(tmp_path / "spool", store.keys)
    spool.start()
    audit = AuditLog(spool, astore)
    shipper = EventShipper(spool, astore, audit)  # not started: the tests ship by hand
    try:
        yield Parts(spool, astore, audit, shipper)
    finally:
        spool.stop()
        astore.close()


def _full(*args: Any, **kwargs: Any) -> Any:
    raise sqlite3.OperationalError("database or disk is full")


def _logins(n: int, tenant_id: int | None = 1) -> list[LoginRecord]:
    return [
        LoginRecord(T0 + i, f"app{i}", "192.0.2.1", "PLAIN", "ok" if i % 2 else "fail", tenant_id) for i in range(n)
    ]


async def test_rows_go_to_the_store_directly_when_it_can_take_them(parts: Parts) -> None:
    await parts.audit.logins(_logins(3))
    await parts.audit.op(ts=T0, actor_uid=0, actor="root", action="tenant.add", target="acme", result="ok")
    assert len(parts.rows("login_log")) == 3 and len(parts.rows("ops_log")) == 1
    assert await parts.backlog() == {"mail": 0, "login": 0, "ops": 0}
    assert parts.audit.deferred == 0


async def test_a_failing_store_sends_rows_to_the_outbox_and_shipping_later_adds_each_once(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    woken: list[int] = []
    parts.audit.on_outbox = lambda: woken.append(1)
    store = parts.astore.store
    with monkeypatch.context() as m:
        m.setattr(store, "log_logins", _full)
        m.setattr(store, "log_ops", _full)
        logins = _logins(22)
        for i in range(0, 22, 5):
            await parts.audit.logins(logins[i : i + 5])
        await parts.audit.op(ts=T0, actor_uid=0, actor="root", action="user.add", target="acme/x", result="ok")
        assert await parts.backlog() == {"mail": 0, "login": 22, "ops": 1}
        with pytest.raises(sqlite3.OperationalError):  # still full: the rows stay in the outbox
            await parts.shipper.ship_all()
        assert await parts.backlog() == {"mail": 0, "login": 22, "ops": 1}
    assert woken and parts.audit.deferred == 23 and parts.rows("login_log") == []
    assert await parts.shipper.ship_all() == 23
    assert sorted(k for k, _ in parts.rows("login_log")) == sorted(r.event_key for r in logins)
    assert len(parts.rows("ops_log")) == 1
    assert await parts.backlog() == {"mail": 0, "login": 0, "ops": 0}
    # shipped again (a crash between the store's commit and the outbox's delete): nothing doubles
    await parts.spool.put_audit("login", logins)
    assert await parts.shipper.ship_all() == 22
    assert len(parts.rows("login_log")) == 22


async def test_rows_are_held_in_memory_when_neither_store_nor_spool_can_be_written(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = parts.astore.store
    with monkeypatch.context() as m:
        m.setattr(store, "log_logins", _full)
        m.setattr(store, "log_ops", _full)
        m.setattr(parts.spool, "put_audit", _async_full)
        await parts.audit.logins(_logins(4))
        await parts.audit.ops([OpRecord(T0, 0, "root", "tenant.add", "acme", "ok")])
        assert parts.audit.backlog_in_memory() == 5
        await parts.audit.retry_unwritten()  # the spool still fails: still held, nothing lost
        assert parts.audit.backlog_in_memory() == 5 and parts.audit.lost == 0
    assert await parts.shipper.ship_all() == 5
    assert len(parts.rows("login_log")) == 4 and len(parts.rows("ops_log")) == 1
    assert parts.audit.backlog_in_memory() == 0


async def _async_full(*args: Any, **kwargs: Any) -> Any:
    raise sqlite3.OperationalError("disk I/O error")


async def test_rows_of_a_tenant_purged_meanwhile_are_not_brought_back(parts: Parts) -> None:
    store = parts.astore.store
    await parts.spool.put_audit("login", _logins(3, tenant_id=1) + _logins(2, None))
    store.tenant_purge("acme")
    assert await parts.shipper.ship_all() == 5
    assert [t for _, t in parts.rows("login_log")] == [None, None]


def test_a_purge_begun_is_pending_until_its_transaction_commits_and_then_erased(tmp_path: Path) -> None:
    store = open_store(tmp_path / "cmcd.db", tmp_path / "data.key")
    try:
        t = store.tenant_add("acme")
        store.user_add("acme", "alice", "sender", "x")
        store.purge_begin("acme", "root", 0)
        assert store.purges_pending() == [{"tenant_id": t.id, "name": "acme", "actor": "root", "actor_uid": 0}]
        op = OpRecord(T0, 0, "root", "tenant.purge", f"tenant #{t.id}", "ok", detail="messages=0")
        counts = store.tenant_purge("acme", op)
        assert counts["users"] == 1 and store.purges_pending() == []
        (detail,) = store.conn.execute("SELECT detail FROM ops_log WHERE action = 'tenant.purge'").fetchone()
        assert detail.startswith("messages=0 ") and "users=1" in detail
        assert store.finish_erase() is True
        assert store.finish_erase() is False
    finally:
        store.close()


async def test_a_tenant_purge_takes_its_rows_out_of_the_outbox_too(parts: Parts) -> None:
    rows = [
        LoginRecord(T0, "alice", "192.0.2.1", "PLAIN", "ok", 1),
        LoginRecord(T0, "alice", "192.0.2.1", "PLAIN", "fail", None),  # a failed login of one of its names
        LoginRecord(T0, "mallory", "192.0.2.1", "PLAIN", "fail", None),
    ]
    await parts.spool.put_audit("login", rows)
    await parts.spool.put_audit("ops", [OpRecord(T0, 0, "root", "x", "y", "ok", 1)])
    await parts.spool.purge_tenant(1, ("alice",))
    assert await parts.backlog() == {"mail": 0, "login": 1, "ops": 0}
