"""Backups of the store as pure file work: round trip, refusal of altered or cut files, keys, rotation, a live snapshot."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cmcd import crypto
from cmcd.db import transaction
from cmcd.errors import BackupError
from cmcd.store import Store, backup_chunks, backup_file, open_store
from cmcd.store import backup as bk
from cmcd.store.log_store import LoginRecord

T0 = 1_794_999_600.0  # 2026-11-18T11:00:00Z, the tests' clock


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(tmp_path / "cmcd.db", tmp_path / "data.key")
    fill(s, 1)
    try:
        yield s
    finally:
        s.close()


def fill(s: Store, n: int, prefix: str = "t") -> None:
    """N tenants, each with a user, a domain, a login and an operation logged, and two mail-log events."""
    for i in range(n):
        name = f"{prefix}{i}"
        t = s.tenant_add(name)
        s.user_add(name, f"app-{name}", "sender", "scrypt$1$1$1$c2FsdA==$aGFzaA==")
        s.domain_add(name, f"{name}.example")
        s.log_logins([LoginRecord(T0, f"app-{name}", "192.0.2.1", "PLAIN", "ok", t.id)])
        s.log_op(actor_uid=0, actor="root", action="tenant.add", target=name, result="ok", tenant_id=t.id)
        rcpt = f"bob@{name}.example"
        rows = [
            (f"{name}-{k}", T0, t.id, f"Q{name}{k}", "delivered", s.keys.encrypt("a@x.example"),
             s.keys.index("a@x.example"), s.keys.encrypt(rcpt), s.keys.index(rcpt), f"{name}.example", "sent",
             "250 ok", 1, "mx.example", "192.0.2.9", "TLSv1.3", 0.5, 1234, "<m@x>")
            for k in range(2)
        ]  # fmt: skip
        s.insert_mail_events(rows)


def dump(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in rowid order."""
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: conn.execute(f'SELECT * FROM "{t}" ORDER BY rowid').fetchall() for t in tables}
    finally:
        conn.close()


def backup(
    tmp_path: Path, store_path: Path | None = None, now: float = T0, keep: int = 480, **kw: Any
) -> bk.BackupInfo:
    return bk.take_backup(
        store_path or tmp_path / "cmcd.db", tmp_path / "backups", tmp_path / "backup.key", keep, now, **kw
    )


def verify(tmp_path: Path, file: Path) -> bk.VerifyResult:
    return bk.verify_backup(file, tmp_path / "backup.key", work_dir=tmp_path)


def altered(path: Path, data: bytes, name: str = "altered.bak") -> Path:
    out = path.with_name(name)
    out.write_bytes(data)
    return out


# -- round trip ----------------------------------------------------------------------------


def test_backup_then_restore_gives_the_same_rows(tmp_path: Path, store: Store) -> None:
    fill(store, 3, "more")
    info = backup(tmp_path)
    assert info.name == "cmcd-store-20261118T110000Z.bak" and info.created == T0
    assert info.size_bytes == info.path.stat().st_size
    expected = dump(store.path)

    target = tmp_path / "elsewhere" / "cmcd.db"
    result = bk.restore_backup(info.path, tmp_path / "backup.key", target, data_key_file=tmp_path / "data.key", now=T0)
    assert result.previous is None and result.store_path == target
    assert result.verified.rows["tenants"] == 4 and result.verified.rows["mail_log"] == 8
    assert result.verified.data_key_ok is True
    assert dump(target) == expected
    reopened = open_store(target, tmp_path / "data.key", create_key=False)  # the data key still opens it
    assert sorted(t.name for t in reopened.tenants()) == ["more0", "more1", "more2", "t0"]
    reopened.close()


def test_restore_over_the_store_keeps_the_old_one_aside(tmp_path: Path, store: Store) -> None:
    info = backup(tmp_path)
    expected = dump(store.path)
    store.tenant_add("after-the-backup")
    store.close()
    (tmp_path / "cmcd.db-wal").write_bytes(b"stale wal of the old store")  # must never meet the restored file

    result = bk.restore_backup(
        info.path, tmp_path / "backup.key", tmp_path / "cmcd.db", data_key_file=tmp_path / "data.key", now=T0 + 60
    )
    assert dump(tmp_path / "cmcd.db") == expected
    assert result.previous == tmp_path / "cmcd.db.pre-restore-20261118T110100Z"
    assert (tmp_path / "cmcd.db.pre-restore-20261118T110100Z-wal").read_bytes() == b"stale wal of the old store"
    assert not (tmp_path / "cmcd.db-wal").exists() and not (tmp_path / "cmcd.db-shm").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cmcd-")]  # no temporary file left
    old = sqlite3.connect(result.previous)
    assert ("after-the-backup",) in old.execute("SELECT name FROM tenants").fetchall()
    old.close()


def test_verify_counts_rows_and_checks_the_data_key(tmp_path: Path, store: Store) -> None:
    info = backup(tmp_path)
    r = bk.verify_backup(info.path, tmp_path / "backup.key", data_keys=store.keys, work_dir=tmp_path)
    assert r.integrity == "ok" and r.data_key_ok is True and r.created == T0
    assert r.rows == {
        "tenants": 1, "users": 1, "domains": 1, "dkim_keys": 0, "suppressions": 0, "mail_log": 2, "login_log": 1,
        "ops_log": 1,
    }  # fmt: skip
    other = crypto.DataKeys(os.urandom(32), os.urandom(32))
    assert bk.verify_backup(info.path, tmp_path / "backup.key", data_keys=other).data_key_ok is False
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cmcd-")]


def test_small_segments_round_trip(tmp_path: Path, store: Store) -> None:
    fill(store, 40, "seg")
    info = backup(tmp_path, segment_bytes=4096, chunked=False)  # version 1: the whole snapshot in the file
    assert info.size_bytes > 3 * 4096  # several segments
    target = tmp_path / "r" / "cmcd.db"
    bk.restore_backup(info.path, tmp_path / "backup.key", target, now=T0)
    assert dump(target) == dump(store.path)


def test_the_backup_is_not_readable_without_the_key(tmp_path: Path, store: Store) -> None:
    info = backup(tmp_path)
    data = info.path.read_bytes()
    assert b"SQLite format 3" not in data and b"t0.example" not in data and b"app-t0" not in data


# -- refusing altered, cut and foreign files -----------------------------------------------

TAMPERED = [
    pytest.param(0, "not a cmcd store backup", id="magic"),
    pytest.param(8, "format version", id="version"),
    pytest.param(9, "header is damaged", id="compression"),
    pytest.param(10, "fails authentication", id="segment-size"),  # 2**20 -> 2**21: a size allowed, so the tag says no
    pytest.param(11, "header is damaged", id="reserved-byte"),
    pytest.param(15, "fails authentication", id="created-time"),
    pytest.param(20, "another backup key", id="key-id"),
    pytest.param(30, "fails authentication", id="salt"),
    pytest.param(bk.HEADER_BYTES, "fails authentication", id="first-body-byte"),
    pytest.param(-200, "fails authentication", id="body-middle"),
    pytest.param(-1, "fails authentication", id="last-tag-byte"),
]


@pytest.mark.parametrize(("offset", "message"), TAMPERED)
def test_one_changed_byte_is_refused(tmp_path: Path, store: Store, offset: int, message: str) -> None:
    info = backup(tmp_path)
    data = bytearray(info.path.read_bytes())
    data[offset] ^= 0x01
    bad = altered(info.path, bytes(data))
    with pytest.raises(BackupError, match=message) as caught:
        verify(tmp_path, bad)
    assert str(bad) in str(caught.value)
    target = tmp_path / "cmcd.db"
    before = dump(target)
    store.close()
    with pytest.raises(BackupError, match=message):
        bk.restore_backup(bad, tmp_path / "backup.key", target, now=T0)
    assert dump(target) == before  # the store was not touched
    assert not [p for p in tmp_path.iterdir() if "pre-restore" in p.name or p.name.startswith(".cmcd-")]


TRUNCATED = [
    pytest.param(lambda n: 0, "empty", id="empty"),
    pytest.param(lambda n: 5, "truncated", id="inside-magic"),
    pytest.param(lambda n: bk.HEADER_BYTES - 1, "truncated", id="inside-header"),
    pytest.param(lambda n: bk.HEADER_BYTES, "truncated", id="header-only"),
    pytest.param(lambda n: bk.HEADER_BYTES + 100, "fails authentication", id="inside-the-segment"),
    pytest.param(lambda n: n - 1, "fails authentication", id="last-byte-missing"),
    pytest.param(lambda n: n - 16, "fails authentication", id="tag-missing"),
]


@pytest.mark.parametrize(("length", "message"), TRUNCATED)
def test_truncated_backup_is_refused(tmp_path: Path, store: Store, length: Any, message: str) -> None:
    info = backup(tmp_path)
    data = info.path.read_bytes()
    bad = altered(info.path, data[: length(len(data))])
    with pytest.raises(BackupError, match=message):
        verify(tmp_path, bad)
    with pytest.raises(BackupError, match=message):
        bk.restore_backup(bad, tmp_path / "backup.key", tmp_path / "new" / "cmcd.db", now=T0)
    assert not (tmp_path / "new" / "cmcd.db").exists()


def _segments(tmp_path: Path, store: Store) -> tuple[bk.BackupInfo, bytes, list[bytes]]:
    fill(store, 40, "seg")
    info = backup(tmp_path, segment_bytes=4096, chunked=False)  # the sealing both versions share
    data = info.path.read_bytes()
    body = data[bk.HEADER_BYTES :]
    sealed = 4096 + 16
    segments = [body[i : i + sealed] for i in range(0, len(body), sealed)]
    assert len(segments) >= 4 and len(segments[-1]) < sealed
    return info, data[: bk.HEADER_BYTES], segments


def test_cut_at_a_segment_boundary_is_refused_as_truncated(tmp_path: Path, store: Store) -> None:
    info, header, segments = _segments(tmp_path, store)
    bad = altered(info.path, header + b"".join(segments[:-1]))
    with pytest.raises(BackupError, match="truncated: it ends at byte .* before its last segment"):
        verify(tmp_path, bad)


@pytest.mark.parametrize(
    "reorder",
    [
        pytest.param(lambda s: [s[1], s[0], *s[2:]], id="two-segments-swapped"),
        pytest.param(lambda s: [s[0], *s[2:]], id="a-middle-segment-dropped"),
        pytest.param(lambda s: [*s[:-1], s[0], s[-1]], id="a-segment-repeated"),
        pytest.param(lambda s: [*s, s[-1]], id="the-last-segment-twice"),
    ],
)
def test_rearranged_segments_are_refused(tmp_path: Path, store: Store, reorder: Any) -> None:
    info, header, segments = _segments(tmp_path, store)
    bad = altered(info.path, header + b"".join(reorder(segments)))
    with pytest.raises(BackupError, match="fails authentication"):
        verify(tmp_path, bad)


def test_a_file_that_is_not_a_backup_is_refused(tmp_path: Path, store: Store) -> None:
    backup(tmp_path)
    with pytest.raises(BackupError, match="not a cmcd store backup"):
        verify(tmp_path, store.path)  # the plain store
    with pytest.raises(BackupError, match="cannot read the backup: No such file"):
        verify(tmp_path, tmp_path / "missing.bak")
    with pytest.raises(BackupError, match="cannot read the backup: Is a directory"):
        verify(tmp_path, tmp_path)


def test_another_backup_key_is_refused_with_both_key_ids(tmp_path: Path, store: Store) -> None:
    info = backup(tmp_path)
    bk.generate_backup_key_file(tmp_path / "other.key")
    with pytest.raises(BackupError, match=r"written with another backup key \(key id [0-9a-f]{16}\)"):
        bk.verify_backup(info.path, tmp_path / "other.key")


def test_restore_refuses_a_store_written_with_another_data_key(tmp_path: Path, store: Store) -> None:
    info = backup(tmp_path)
    crypto.generate_key_file(tmp_path / "other-data.key")
    target = tmp_path / "r" / "cmcd.db"
    with pytest.raises(BackupError, match="written with another data key than .*other-data.key"):
        bk.restore_backup(info.path, tmp_path / "backup.key", target, data_key_file=tmp_path / "other-data.key", now=T0)
    with pytest.raises(BackupError, match=r"missing.key: key file missing .*put that key file in place"):
        bk.restore_backup(info.path, tmp_path / "backup.key", target, data_key_file=tmp_path / "missing.key", now=T0)
    assert not target.exists() and not [p for p in target.parent.iterdir() if p.name.startswith(".cmcd-")]


# -- the backup key ------------------------------------------------------------------------


def test_first_backup_creates_the_key_file_0600(tmp_path: Path, store: Store) -> None:
    key_file = tmp_path / "keys" / "backup.key"
    bk.take_backup(store.path, tmp_path / "backups", key_file, 3, T0)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.read_text().startswith("cmcd-backup-key-v1\nkey ")
    key = bk.read_backup_key(key_file)
    assert len(key.key) == 32 and key.key != crypto.read_key_file(tmp_path / "data.key").enc_key
    bk.take_backup(store.path, tmp_path / "backups", key_file, 3, T0 + 1)
    assert bk.read_backup_key(key_file) == key  # kept, not replaced


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_file_readable_by_others_is_refused(tmp_path: Path, store: Store, mode: int) -> None:
    key_file = tmp_path / "backup.key"
    bk.generate_backup_key_file(key_file)
    key_file.chmod(mode)
    message = f"{key_file}: backup key file is readable by group or others \\(mode {mode:04o}\\); run: chmod 600"
    with pytest.raises(BackupError, match=message):
        backup(tmp_path)
    assert not (tmp_path / "backups").exists() or not bk.list_backups(tmp_path / "backups")


def test_verify_and_restore_never_create_a_key(tmp_path: Path, store: Store) -> None:
    info = backup(tmp_path)
    (tmp_path / "backup.key").unlink()
    with pytest.raises(BackupError, match="backup.key: backup key file missing"):
        verify(tmp_path, info.path)
    with pytest.raises(BackupError, match="backup key file missing"):
        bk.restore_backup(info.path, tmp_path / "backup.key", tmp_path / "r.db", now=T0)
    assert not (tmp_path / "backup.key").exists()


def test_the_data_key_is_refused_as_a_backup_key(tmp_path: Path, store: Store) -> None:
    with pytest.raises(BackupError, match="data.key: this is the store's data key, not a backup key"):
        bk.take_backup(store.path, tmp_path / "backups", tmp_path / "data.key", 3, T0)
    (tmp_path / "junk.key").write_text("hello\n")
    (tmp_path / "junk.key").chmod(0o600)
    with pytest.raises(BackupError, match="junk.key: not a cmcd backup key file"):
        bk.take_backup(store.path, tmp_path / "backups", tmp_path / "junk.key", 3, T0)


# -- generations ---------------------------------------------------------------------------


def test_keep_3_leaves_the_newest_three(tmp_path: Path, store: Store) -> None:
    names = [backup(tmp_path, now=T0 + 3600 * i, keep=3).name for i in range(5)]
    listed = bk.list_backups(tmp_path / "backups")
    assert [b.name for b in listed] == names[2:]
    assert [b.created for b in listed] == [T0 + 7200, T0 + 10800, T0 + 14400]
    assert all(b.size_bytes == b.path.stat().st_size > 0 for b in listed)
    for b in listed:
        verify(tmp_path, b.path)


def test_backups_in_the_same_second_get_their_own_names_in_order(tmp_path: Path, store: Store) -> None:
    names = [backup(tmp_path, now=T0 + 0.1 * i, keep=3).name for i in range(4)]
    assert names == [
        "cmcd-store-20261118T110000Z.bak",
        "cmcd-store-20261118T110000Z-2.bak",
        "cmcd-store-20261118T110000Z-3.bak",
        "cmcd-store-20261118T110000Z-4.bak",
    ]
    assert [b.name for b in bk.list_backups(tmp_path / "backups")] == names[1:]
    # the first name is free again, but a fifth backup in that second still sorts last
    assert backup(tmp_path, now=T0 + 0.5, keep=3).name == "cmcd-store-20261118T110000Z-5.bak"
    assert [b.name for b in bk.list_backups(tmp_path / "backups")] == [*names[2:], "cmcd-store-20261118T110000Z-5.bak"]


def test_other_files_in_the_directory_are_left_alone(tmp_path: Path, store: Store) -> None:
    d = tmp_path / "backups"
    d.mkdir()
    (d / "README").write_text("operator's notes")
    (d / "cmcd-store-old.bak").write_text("not ours by name")
    (d / ".cmcd-store-abc.tmp").write_text("left by a backup that died")  # removed: it is ours
    for i in range(3):
        backup(tmp_path, now=T0 + i, keep=1)
    assert sorted(p.name for p in d.iterdir()) == [
        ".cmcd-backup.lock", "README", "chunks", "cmcd-store-20261118T110002Z.bak", "cmcd-store-old.bak",
    ]  # fmt: skip
    assert bk.list_backups(tmp_path / "nowhere") == []


def test_keep_below_one_is_refused(tmp_path: Path, store: Store) -> None:
    with pytest.raises(BackupError, match="backup.keep is 0; it must be at least 1"):
        backup(tmp_path, keep=0)


def test_no_store_no_backup(tmp_path: Path) -> None:
    with pytest.raises(BackupError, match="no store to back up"):
        backup(tmp_path, store_path=tmp_path / "none.db")
    assert not (tmp_path / "backups").exists()


def test_an_unwritable_backup_dir_is_a_clear_error(tmp_path: Path, store: Store) -> None:
    (tmp_path / "backups").write_text("a file where the directory should be")
    with pytest.raises(BackupError, match="backups: cannot create the backup directory \\(backup.dir\\)"):
        backup(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cmcd-")]


# -- a snapshot while the store is written -------------------------------------------------


def test_backup_while_the_store_is_written_is_consistent(tmp_path: Path, store: Store) -> None:
    """A writer adds a tenant and its ops-log row in one transaction, nonstop; every backup holds whole
    transactions only (as many tenants as rows), passes the integrity check, and the writer is never
    held up for long by a backup."""
    conn = store.conn
    with transaction(conn):  # bulk, so a snapshot takes a moment
        conn.executemany(
            "INSERT INTO login_log(ts, login, client_ip, mechanism, result, detail) VALUES (?,?,?,?,?,?)",
            [(T0 + i, f"user{i}", "192.0.2.7", "PLAIN", "ok", os.urandom(64).hex()) for i in range(10_000)],
        )
    stop = threading.Event()
    done: list[int] = []
    errors: list[BaseException] = []

    def writer() -> None:
        w = sqlite3.connect(str(store.path), isolation_level=None, timeout=30)
        w.execute("PRAGMA synchronous=OFF")  # as fast as it goes, to collide with the snapshot often
        try:
            i = 0
            while not stop.is_set():
                with transaction(w):
                    w.execute("INSERT INTO tenants(name, created) VALUES (?, ?)", (f"w{i}", T0))
                    w.execute(
                        "INSERT INTO ops_log(ts, actor, action, target, result) VALUES (?, 'test', 'pair', ?, 'ok')",
                        (T0, f"w{i}"),
                    )
                i += 1
                done.append(i)
        except BaseException as exc:
            errors.append(exc)
        finally:
            w.close()

    thread = threading.Thread(target=writer)
    thread.start()
    progress = []
    try:
        for k in range(3):
            before = len(done)
            info = backup(tmp_path, now=T0 + k)
            progress.append(len(done) - before)
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert sum(progress) > 0, "the writer made no progress while backups ran"
    counts = []
    for k, b in enumerate(bk.list_backups(tmp_path / "backups")):
        assert verify(tmp_path, b.path).integrity == "ok"
        target = tmp_path / f"restored{k}" / "cmcd.db"
        bk.restore_backup(b.path, tmp_path / "backup.key", target, now=T0)
        r = sqlite3.connect(target)
        tenants = {n for (n,) in r.execute("SELECT name FROM tenants WHERE name LIKE 'w%'")}
        pairs = [t for (t,) in r.execute("SELECT target FROM ops_log WHERE action = 'pair'")]
        r.close()
        assert sorted(tenants) == sorted(pairs)  # whole transactions only
        assert tenants == {f"w{i}" for i in range(len(tenants))}  # and every one before the last
        counts.append(len(tenants))
    assert counts == sorted(counts) and info is not None


# -- deduplicated generations (format version 2) ---------------------------------------------


def mail_rows(s: Store, tenant: str, start: int, n: int) -> None:
    """N mail-log rows of TENANT with encrypted addresses and replies, as the spool ships them."""
    t = s.tenant(tenant)
    rows = []
    for k in range(start, start + n):
        rcpt = f"user{k}@dest{k % 97}.example"
        rows.append(
            (f"{tenant}-ev{k}", T0 + k, t.id, f"Q{k:010d}", "delivered", s.keys.encrypt(f"app@{tenant}.example"),
             s.keys.index(f"app@{tenant}.example"), s.keys.encrypt(rcpt), s.keys.index(rcpt), f"dest{k % 97}.example",
             "sent", f"250 2.0.0 Ok: queued as {k:X}", 1, "mx.dest.example", "192.0.2.9", "TLSv1.3", 0.5, 1234,
             f"<{k}@{tenant}.example>")
        )  # fmt: skip
    s.insert_mail_events(rows)


def chunk_files(tmp_path: Path) -> set[Path]:
    return {p for p in (tmp_path / "backups" / "chunks").rglob("*") if p.is_file()}


def indexes(path: Path) -> list[tuple[str, str]]:
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        return conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' ORDER BY name").fetchall()
    finally:
        conn.close()


def test_an_hourly_generation_stores_only_the_chunks_that_changed(tmp_path: Path, store: Store) -> None:
    mail_rows(store, "t0", 0, 20_000)
    first = backup(tmp_path)
    expected_first = dump(store.path)
    full = sum(p.stat().st_size for p in chunk_files(tmp_path))
    mail_rows(store, "t0", 20_000, 500)  # an hour's worth, scaled down
    before = chunk_files(tmp_path)
    second = backup(tmp_path, now=T0 + 3600)
    added = sum(p.stat().st_size for p in chunk_files(tmp_path) - before)
    assert added < full / 5, (added, full)  # the secondary indexes (on hashes) are not in the chunks
    assert first.size_bytes < 4096 and second.size_bytes < 4096  # the generations themselves are manifests

    for info, expected in ((first, expected_first), (second, dump(store.path))):
        target = tmp_path / info.name / "cmcd.db"
        r = bk.restore_backup(info.path, tmp_path / "backup.key", target, data_key_file=tmp_path / "data.key", now=T0)
        assert r.verified.integrity == "ok" and dump(target) == expected
        assert indexes(target) == indexes(store.path)  # built again on restore
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cmcd-")]


def test_pruning_removes_the_chunks_no_kept_generation_lists(tmp_path: Path, store: Store) -> None:
    names = []
    for hour in range(5):
        mail_rows(store, "t0", hour * 3000, 3000)
        store.expire_rows("mail_log", T0 + hour * 3000 - 1500)  # retention frees pages, which are used again
        names.append(backup(tmp_path, now=T0 + 3600 * hour, keep=2).name)
    key = bk.read_backup_key(tmp_path / "backup.key")
    listed = [backup_file.read_manifest(b.path, key) for b in bk.list_backups(tmp_path / "backups")]
    referenced = {backup_chunks.chunk_path(tmp_path / "backups", c) for m in listed if m is not None for c in m.ids}
    assert [b.name for b in bk.list_backups(tmp_path / "backups")] == names[-2:]
    assert chunk_files(tmp_path) == referenced
    for b in bk.list_backups(tmp_path / "backups"):
        assert verify(tmp_path, b.path).integrity == "ok"


def _a_chunk(tmp_path: Path, info: bk.BackupInfo) -> Path:
    manifest = backup_file.read_manifest(info.path, bk.read_backup_key(tmp_path / "backup.key"))
    assert manifest is not None and len(manifest.ids) >= 2
    return backup_chunks.chunk_path(tmp_path / "backups", manifest.ids[1])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        pytest.param(lambda p, q: p.unlink(), r"chunk 1 \(.*\) is missing; .*copy backup.dir whole", id="missing"),
        pytest.param(lambda p, q: p.write_bytes(p.read_bytes()[:-1]), "chunk 1 .* fails authentication", id="cut"),
        pytest.param(
            lambda p, q: p.write_bytes(p.read_bytes()[:40] + bytes([p.read_bytes()[40] ^ 1]) + p.read_bytes()[41:]),
            "chunk 1 .* fails authentication", id="one-byte-changed",
        ),
        pytest.param(lambda p, q: p.write_bytes(q.read_bytes()), "chunk 1 .* fails authentication", id="swapped"),
    ],
)  # fmt: skip
def test_a_damaged_chunk_is_refused_by_name(tmp_path: Path, store: Store, damage: Any, message: str) -> None:
    mail_rows(store, "t0", 0, 3000)
    info = backup(tmp_path)
    chunk = _a_chunk(tmp_path, info)
    other = next(p for p in chunk_files(tmp_path) if p != chunk)
    damage(chunk, other)
    with pytest.raises(BackupError, match=message):
        verify(tmp_path, info.path)
    with pytest.raises(BackupError, match=message):
        bk.restore_backup(info.path, tmp_path / "backup.key", tmp_path / "r" / "cmcd.db", now=T0)
    assert not (tmp_path / "r" / "cmcd.db").exists()


def test_a_version_1_backup_still_verifies_and_restores_beside_version_2(tmp_path: Path, store: Store) -> None:
    old = backup(tmp_path, chunked=False)
    new = backup(tmp_path, now=T0 + 3600)
    assert old.path.read_bytes()[8] == 1 and new.path.read_bytes()[8] == 2
    for info in (old, new):
        assert verify(tmp_path, info.path).rows["tenants"] == 1
        target = tmp_path / info.name / "cmcd.db"
        bk.restore_backup(info.path, tmp_path / "backup.key", target, now=T0)
        assert dump(target) == dump(store.path)


# -- removing a purged tenant from every kept backup -----------------------------------------

VICTIM = ("zqvictim", "zqlogin-42", "zqvictim.example", "zq-suppressed-domain.example")


def decrypted_generations(tmp_path: Path) -> list[bytes]:
    """Every kept generation decrypted: the raw store file (indexes not rebuilt), then the restored one."""
    key = bk.read_backup_key(tmp_path / "backup.key")
    out = []
    for b in bk.list_backups(tmp_path / "backups"):
        raw = tmp_path / "raw.db"
        with raw.open("wb") as f:
            backup_file.unseal_store(b.path, key, f)
        out.append(raw.read_bytes())
        target = tmp_path / "restored" / b.name
        bk.restore_backup(b.path, tmp_path / "backup.key", target, now=T0)
        out.append(target.read_bytes())
    return out


def test_purge_tenant_leaves_nothing_of_it_in_any_decrypted_backup(tmp_path: Path, store: Store) -> None:
    name, login, domain, suppressed = VICTIM
    store.tenant_add(name)
    store.user_add(name, login, "sender", "scrypt$1$1$1$c2FsdA==$aGFzaA==")
    store.domain_add(name, domain)
    store.suppression_add(name, f"bounced@{suppressed}", "550 no such user")
    store.log_logins([LoginRecord(T0, login, "192.0.2.1", "PLAIN", "failed")])  # logged without a tenant
    mail_rows(store, name, 0, 2000)
    mail_rows(store, "t0", 10_000, 2000)
    backup(tmp_path, chunked=False)  # a generation from before version 2
    backup(tmp_path, now=T0 + 3600)
    mail_rows(store, "t0", 20_000, 300)
    backup(tmp_path, now=T0 + 7200)
    assert all(name.encode() in g and login.encode() in g for g in decrypted_generations(tmp_path))
    old_chunks = chunk_files(tmp_path)

    store.tenant_purge(name)
    store.finish_erase()
    backup(tmp_path, now=T0 + 10800)  # taken after the purge: holds nothing of it already
    others = dump(store.path)
    result = bk.purge_tenant(tmp_path / "backups", tmp_path / "backup.key", name, work_dir=tmp_path)

    assert result.generations == 4 and len(result.rewritten) == 3 and len(result.tenant_ids) == 1
    assert result.rows["users"] == 3 and result.rows["mail_log"] == 3 * 2000 and result.rows["login_log"] == 3
    assert result.chunks_removed > 0 and old_chunks - chunk_files(tmp_path)  # the chunks that held it are gone
    generations = decrypted_generations(tmp_path)
    assert len(generations) == 8
    for g in generations:
        for text in VICTIM:
            assert text.encode() not in g, text
        assert b"t0.example" in g and b"app-t0" in g  # the other tenant is still there
    for b in bk.list_backups(tmp_path / "backups"):
        assert verify(tmp_path, b.path).integrity == "ok"
        assert b.path.read_bytes()[8] == 2  # the version 1 file was rewritten as a manifest
    newest = tmp_path / "restored" / bk.list_backups(tmp_path / "backups")[-1].name
    assert dump(newest) == others  # the generation taken after the purge: unchanged
    again = bk.purge_tenant(tmp_path / "backups", tmp_path / "backup.key", name, work_dir=tmp_path)
    assert again.rewritten == [] and again.chunks_removed == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cmcd-")]
