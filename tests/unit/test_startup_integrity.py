"""open_checked() on files from older releases and on interrupted starts: no sockets, tmp files only."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cmcd.errors import UntrustedFileError
from cmcd.queue.startup import Opened, open_checked
from cmcd.store import Store, open_store
from cmcd.store.lost import set_spool_id, spool_id, unfinished

NOW = 2_000_000_000.0


def _open(root: Path, accept_loss: bool = False) -> Opened:
    return open_checked(root / "cmcd.db", root / "data.key", root / "spool", accept_loss=accept_loss, now=NOW)


def _close(o: Opened) -> None:
    o.spool.stop()
    o.store.close()


def _accepted(store: Store, queue_id: str, rcpt: str, final: str | None = None) -> None:
    """An "accepted" mail-log row for RCPT of QUEUE_ID (and a FINAL one, if given)."""
    k = store.keys
    tenant = store.tenants()[0].id
    rows = []
    for event, status in [("accepted", "queued")] + ([(final, final)] if final else []):
        rows.append(
            (f"{queue_id}:{rcpt}:{event}", NOW - 60, tenant, queue_id, event, k.encrypt("a@acme.test"),
             k.index("a@acme.test"), k.encrypt(rcpt), k.index(rcpt), rcpt.split("@")[1], status, "", 0, "", "", "",
             0.0, 10, "")
        )  # fmt: skip
    store.insert_mail_events(rows)


def _spool_meta(root: Path) -> str | None:
    conn = sqlite3.connect(root / "spool" / "queue.db")
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'spool_id'").fetchone()
    finally:
        conn.close()
    return None if row is None else str(row[0])


def test_first_start_gives_store_and_spool_one_id_that_later_starts_keep(tmp_path: Path) -> None:
    o = _open(tmp_path)
    first = o.spool_id
    assert spool_id(o.store) == first == _spool_meta(tmp_path)
    assert o.lost == [] and o.set_aside == []
    _close(o)
    o = _open(tmp_path)
    assert o.spool_id == first
    _close(o)


def test_a_spool_and_store_from_before_ids_are_adopted(tmp_path: Path) -> None:
    o = _open(tmp_path)
    o.store.conn.execute("DELETE FROM meta WHERE key = 'spool_id'")
    _close(o)
    conn = sqlite3.connect(tmp_path / "spool" / "queue.db")
    conn.execute("DROP TABLE meta")
    conn.close()
    o = _open(tmp_path)
    assert spool_id(o.store) == o.spool_id == _spool_meta(tmp_path) is not None
    _close(o)


def test_a_start_cut_short_before_the_store_took_the_id_is_adopted(tmp_path: Path) -> None:
    o = _open(tmp_path)
    kept = o.spool_id
    o.store.conn.execute("DELETE FROM meta WHERE key = 'spool_id'")
    _close(o)
    o = _open(tmp_path)
    assert o.spool_id == kept == spool_id(o.store)
    _close(o)


def test_an_older_store_with_mail_in_flight_refuses_a_missing_spool(tmp_path: Path) -> None:
    """No spool id to compare (a store from before ids), but its mail log says mail was in flight."""
    store = open_store(tmp_path / "cmcd.db", tmp_path / "data.key")
    store.tenant_add("acme")
    _accepted(store, "Q1", "one@dst.test")
    _accepted(store, "Q1", "two@dst.test", final="delivered")
    store.close()
    with pytest.raises(
        UntrustedFileError, match=r"queue\.db: the spool is missing.* 1 accepted recipient has no final"
    ):
        _open(tmp_path)
    o = _open(tmp_path, accept_loss=True)
    assert [(m.queue_id, m.tenant, m.recipients) for m in o.lost] == [("Q1", "acme", 1)]
    assert unfinished(o.store) == []
    rows = o.store.log_page("mail", status="lost")
    assert [(r["rcpt"], r["event"], r["status"]) for r in rows] == [("one@dst.test", "lost", "lost")]
    _close(o)
    o = _open(tmp_path)  # the new spool is the store's own: nothing more to refuse or lose
    assert o.lost == []
    _close(o)


def test_recording_the_loss_twice_logs_each_recipient_once(tmp_path: Path) -> None:
    """A start with --accept-loss cut short after the log rows were written but before the store took
    the new spool's id: the next one finds the recipients final and adds no row."""
    o = _open(tmp_path)
    o.store.tenant_add("acme")
    _accepted(o.store, "Q2", "x@dst.test")
    _close(o)
    (tmp_path / "spool" / "queue.db").write_bytes(b"")
    o = _open(tmp_path, accept_loss=True)
    set_spool_id(o.store, "a-spool-never-made")
    _close(o)
    with pytest.raises(UntrustedFileError, match="not the spool of the store"):
        _open(tmp_path)
    o = _open(tmp_path, accept_loss=True)
    assert o.lost == []
    assert len(o.store.log_page("mail", status="lost")) == 1
    assert len(list((tmp_path / "spool").glob("queue.db.lost-*"))) == 2  # both kept, neither deleted
    _close(o)
