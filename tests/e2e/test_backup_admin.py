"""Backups end to end: cmcctl backup now|list|verify against a real AdminServer, `cmcd restore` as a subprocess,
and the periodic backup task."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import cmcd.admin.backup_verbs as backup_verbs
import cmcd.admin.cli as ctl
import cmcd.daemon.cli as daemon_mod
from cmcd.admin.backup_verbs import BackupScheduler
from cmcd.admin.server import AdminServer
from cmcd.config import AdminConfig, BackupConfig, Config, Duration, SpoolConfig, StoreConfig
from cmcd.queue.audit import AuditLog
from cmcd.queue.ids import QueueIdGenerator
from cmcd.queue.spool import Spool
from cmcd.records import Recipient, SpoolMessage
from cmcd.store import AsyncStore, backup_file, open_store
from cmcd.store import backup as bk
from cmcd.tenancy import Directory, Tenancy

# Until cli.py, server.py and daemon.py wire the backup commands in, drive them the way they will be.
if "backup" in ctl.cli.commands:
    CMCCTL = [sys.executable, "-m", "cmcd.admin.cli"]
else:
    CMCCTL = [
        sys.executable, "-c",
        "from cmcd.admin.cli import cli; from cmcd.admin.backup_cli import backup; cli.add_command(backup); "
        "cli(prog_name='cmcctl')",
    ]  # fmt: skip
if "restore" in daemon_mod.main.commands:
    RESTORE = [sys.executable, "-m", "cmcd.daemon", "restore"]
else:
    RESTORE = [sys.executable, "-c", "from cmcd.admin.backup_cli import restore_command; restore_command()"]


@dataclass
class Env:
    root: Path
    config: Config
    config_path: Path
    server: AdminServer
    astore: AsyncStore
    spool: Spool
    directory: Directory
    running: bool = True

    @property
    def socket(self) -> Path:
        return self.server.path

    @property
    def store_path(self) -> Path:
        return self.root / "cmcd.db"

    @property
    def backup_dir(self) -> Path:
        return self.root / "backups"

    async def stop(self) -> None:
        if self.running:
            self.running = False
            await self.server.close()
            await self.directory.close()
            self.spool.stop()
            self.astore.close()


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


@pytest.fixture
def root() -> Iterator[Path]:
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="cmcd-bak-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _config(root: Path, **backup: Any) -> Config:
    return Config(
        admin=AdminConfig(socket=str(root / "admin.sock")),
        store=StoreConfig(path=str(root / "cmcd.db"), key_file=str(root / "data.key")),
        spool=SpoolConfig(dir=str(root / "spool")),
        backup=BackupConfig(dir=str(root / "backups"), key_file=str(root / "backup.key"), **({"keep": 3} | backup)),
    )


def _config_file(root: Path) -> Path:
    path = root / "cmcd.toml"
    path.write_text(
        f"""\
[smtp]
tls_cert = "{root}/cert.pem"
tls_key = "{root}/key.pem"
[store]
path = "{root}/cmcd.db"
key_file = "{root}/data.key"
[spool]
dir = "{root}/spool"
[admin]
socket = "{root}/admin.sock"
[backup]
dir = "{root}/backups"
key_file = "{root}/backup.key"
keep = 3
"""
    )
    return path


@pytest.fixture
async def env(root: Path) -> AsyncIterator[Env]:
    store = open_store(root / "cmcd.db", root / "data.key")
    astore = AsyncStore(store)
    spool = Spool(root / "spool", store.keys)
    spool.start()
    config = _config(root)
    directory = Directory(astore, poll_s=0)
    await directory.start()
    server = AdminServer(config, Tenancy(config, astore, AuditLog(spool, astore), directory), spool, status=lambda: {})
    await server.start()
    e = Env(root, config, _config_file(root), server, astore, spool, directory)
    try:
        yield e
    finally:
        await e.stop()


async def run(argv: list[str], stdin: bytes = b"", cwd: Path | None = None) -> Run:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=cwd
    )
    out, err = await proc.communicate(stdin)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


async def cmcctl(e: Env, *args: str) -> Run:
    return await run([*CMCCTL, "--socket", str(e.socket), *args])


async def ok(e: Env, *args: str) -> str:
    r = await cmcctl(e, *args)
    assert r.code == 0 and r.err == "", r.err
    return r.out


async def refused(e: Env, *args: str) -> str:
    r = await cmcctl(e, *args)
    assert r.code == 1 and r.out == "", (r.out, r.err)
    assert r.err.startswith("cmcctl: ") and r.err.count("\n") == 1, r.err
    return r.err.removeprefix("cmcctl: ").strip()


async def restore(e: Env, file: Path | str) -> Run:
    return await run([*RESTORE, str(file), "--config", str(e.config_path)])


def tenants(path: Path) -> list[str]:
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        return [n for (n,) in conn.execute("SELECT name FROM tenants ORDER BY id")]
    finally:
        conn.close()


def rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines()[1:]]


# -- cmcctl backup ---------------------------------------------------------------------------


async def test_backup_now_list_and_verify(env: Env) -> None:
    await env.astore.call(env.astore.store.tenant_add, "acme")
    out = await ok(env, "backup", "now")
    assert out.startswith(f"wrote {env.backup_dir}/cmcd-store-") and out.rstrip().endswith("s)")
    [b] = bk.list_backups(env.backup_dir)

    listing = await ok(env, "backup", "list")
    assert listing.splitlines()[0].split() == ["NAME", "SIZE", "CREATED"]
    [[name, *_]] = rows(listing)
    assert name == b.name

    verified = await ok(env, "backup", "verify", b.name)
    assert f"file:       {b.path}" in verified
    assert "integrity:  ok" in verified
    assert "tenants=1 users=0" in verified and "data key:   matches" in verified

    as_json = json.loads(await ok(env, "--json", "backup", "verify", str(b.path)))
    assert as_json["integrity"] == "ok" and as_json["rows"]["tenants"] == 1 and as_json["size_bytes"] == b.size_bytes
    assert json.loads(await ok(env, "--json", "backup", "list")) == [
        {"name": b.name, "path": str(b.path), "size_bytes": b.size_bytes, "created": b.created}
    ]

    ops = await env.astore.call(lambda: list(env.astore.store.ops_log(10)))
    assert [(o["action"], o["target"], o["result"]) for o in ops] == [("backup.now", "store", "ok")]


async def test_keep_3_generations(env: Env) -> None:
    for _ in range(5):
        await ok(env, "backup", "now")
    names = [r[0] for r in rows(await ok(env, "backup", "list"))]
    assert len(names) == 3 and names == [b.name for b in bk.list_backups(env.backup_dir)]
    assert len(list(env.backup_dir.glob("*.bak"))) == 3


async def test_empty_list(env: Env) -> None:
    assert (await ok(env, "backup", "list")).strip() == "no backups"


async def test_verify_refuses_a_tampered_or_truncated_backup(env: Env) -> None:
    await ok(env, "backup", "now")
    [b] = bk.list_backups(env.backup_dir)
    data = bytearray(b.path.read_bytes())
    data[len(data) // 2] ^= 0x40
    (env.backup_dir / "tampered.bak").write_bytes(bytes(data))
    (env.backup_dir / "cut.bak").write_bytes(b.path.read_bytes()[:-10])
    message = await refused(env, "backup", "verify", "tampered.bak")
    assert message.startswith(f"{env.backup_dir.resolve()}/tampered.bak: fails authentication"), message
    assert "refused" in message
    message = await refused(env, "backup", "verify", "cut.bak")
    assert "cut.bak: fails authentication" in message and "cut short" in message


async def test_verify_reads_only_backups_in_backup_dir(env: Env) -> None:
    await ok(env, "backup", "now")
    [b] = bk.list_backups(env.backup_dir)
    outside = env.root / "copy.bak"
    shutil.copy(b.path, outside)
    (env.backup_dir / "link.bak").symlink_to(outside)
    for arg in (str(outside), f"{env.backup_dir}/../copy.bak", "link.bak", str(env.backup_dir)):
        message = await refused(env, "backup", "verify", arg)
        assert "is not in backup.dir" in message and "only backups there are verified" in message, message
    assert (await refused(env, "backup", "verify", "nosuch.bak")).endswith("nosuch.bak: no such backup file")
    # a relative path is made absolute by cmcctl, so it names the file the operator means
    r = await run([*CMCCTL, "--socket", str(env.socket), "backup", "verify", f"backups/{b.name}"])
    assert r.code == 1 and "is not in backup.dir" in r.err  # run from the test's cwd: not in backup.dir
    r = await run([*CMCCTL, "--socket", str(env.socket), "backup", "verify", f"./{b.name}"], cwd=env.backup_dir)
    assert r.code == 0 and "integrity:  ok" in r.out, r.err


async def test_the_backup_holds_the_store_only_never_the_spool_or_a_body(env: Env) -> None:
    store = env.astore.store
    await env.astore.call(store.tenant_add, "acme")
    u = await env.astore.call(store.user_add, "acme", "app1", "sender", "x")
    body = b"Subject: hello\r\n\r\nTOP-SECRET-BODY-TEXT\r\n" * 50
    msg = SpoolMessage(
        QueueIdGenerator().next(), u.tenant_id, u.id, "app1@acme.example", (Recipient("b@x.example", "x.example"),),
        body, time.time(),
    )  # fmt: skip
    await env.spool.commit(msg, "2024-01-01")
    await ok(env, "backup", "now")
    [b] = bk.list_backups(env.backup_dir)
    await env.stop()

    target = env.root / "restored" / "cmcd.db"
    bk.restore_backup(b.path, env.root / "backup.key", target, now=time.time())
    conn = sqlite3.connect(target)
    restored_tables = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    conn.close()
    conn = sqlite3.connect(env.root / "spool" / "queue.db")
    spool_tables = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    [(sealed_body,)] = conn.execute("SELECT body FROM messages").fetchall()
    conn.close()
    assert "messages" in spool_tables and not (spool_tables - {"meta"}) & restored_tables
    assert restored_tables == {n for (n,) in sqlite3.connect(env.store_path).execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}  # fmt: skip
    data = target.read_bytes()
    assert sealed_body[20:60] not in data and b"TOP-SECRET-BODY-TEXT" not in data and msg.queue_id.encode() not in data


async def test_backup_now_runs_off_the_event_loop(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[threading.Thread] = []
    real = backup_verbs.take_backup

    def spy(*args: Any, **kwargs: Any) -> bk.BackupInfo:
        threads.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(backup_verbs, "take_backup", spy)
    await ok(env, "backup", "now")
    assert threads and threads[0] is not threading.main_thread()


async def test_backup_now_failure_is_a_clear_refusal(env: Env) -> None:
    (env.root / "backup.key").write_text("cmcd-backup-key-v1\nkey " + "ab" * 32 + "\n")
    (env.root / "backup.key").chmod(0o644)
    message = await refused(env, "backup", "now")
    assert message.startswith(f"{env.root}/backup.key: backup key file is readable by group or others (mode 0644)")
    ops = await env.astore.call(lambda: list(env.astore.store.ops_log(10)))
    assert [(o["action"], o["result"]) for o in ops] == [("backup.now", "refused")]


# -- cmcd restore ------------------------------------------------------------------------------


async def test_restore_brings_back_the_rows_of_the_backup(env: Env) -> None:
    for name in ("acme", "globex"):
        await env.astore.call(env.astore.store.tenant_add, name)
    await ok(env, "backup", "now")
    [b] = bk.list_backups(env.backup_dir)
    await env.astore.call(env.astore.store.tenant_add, "after-the-backup")
    await env.stop()

    r = await restore(env, b.path)
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].startswith(f"restored {b.path} (taken ") and lines[0].endswith(f"into {env.store_path}")
    assert lines[1].startswith("rows: tenants=2 users=0")
    assert lines[2].startswith(f"the store it replaced is kept as {env.store_path}.pre-restore-")
    assert tenants(env.store_path) == ["acme", "globex"]
    [previous] = env.root.glob("cmcd.db.pre-restore-*Z")
    assert tenants(previous) == ["acme", "globex", "after-the-backup"]
    store = open_store(env.store_path, env.root / "data.key", create_key=False)  # cmcd can open it again
    assert [t.name for t in store.tenants()] == ["acme", "globex"]
    store.close()


async def test_restore_refuses_while_cmcd_answers(env: Env) -> None:
    await ok(env, "backup", "now")
    [b] = bk.list_backups(env.backup_dir)
    r = await restore(env, b.path)
    assert r.code == 1 and r.out == ""
    assert r.err == f"cmcd: cmcd is running (its admin socket {env.socket} answers); stop it before restoring\n"
    assert not list(env.root.glob("*.pre-restore-*"))


async def test_restore_refuses_a_store_another_process_has_open(env: Env) -> None:
    await ok(env, "backup", "now")
    [b] = bk.list_backups(env.backup_dir)
    await env.stop()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
         "c.execute('SELECT count(*) FROM tenants').fetchall(); print('open', flush=True); sys.stdin.read()",
         str(env.store_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        r = await restore(env, b.path)
    finally:
        holder.communicate("", timeout=30)
    assert r.code == 1
    assert (
        r.err == f"cmcd: {env.store_path}: the store is open in another process (is cmcd running?); stop cmcd first\n"
    )


@pytest.mark.parametrize("cut", [pytest.param(False, id="tampered"), pytest.param(True, id="truncated")])
async def test_restore_refuses_a_backup_that_fails_authentication(env: Env, cut: bool) -> None:
    await env.astore.call(env.astore.store.tenant_add, "acme")
    await ok(env, "backup", "now")
    [b] = bk.list_backups(env.backup_dir)
    await env.astore.call(env.astore.store.tenant_add, "kept")
    await env.stop()
    data = bytearray(b.path.read_bytes())
    if cut:
        del data[-1:]
    else:
        data[bk.HEADER_BYTES + 5] ^= 0x01
    bad = env.root / "bad.bak"
    bad.write_bytes(bytes(data))
    r = await restore(env, bad)
    assert r.code == 1 and r.out == ""
    assert r.err.startswith(f"cmcd: {bad}: fails authentication") and r.err.count("\n") == 1, r.err
    assert tenants(env.store_path) == ["acme", "kept"]
    assert not list(env.root.glob("*.pre-restore-*")) and not list(env.root.glob(".cmcd-*"))


async def test_restore_with_a_bad_config_exits_2(env: Env) -> None:
    await env.stop()
    env.config_path.write_text("[backup]\nkeep = 'many'\n")
    r = await restore(env, env.root / "x.bak")
    assert r.code == 2 and r.err.startswith(f"cmcd: {env.config_path}: ")


# -- the periodic backup ------------------------------------------------------------------------


async def test_scheduler_backs_up_every_interval_off_the_loop(
    root: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(root / "cmcd.db", root / "data.key")
    store.close()
    threads: list[threading.Thread] = []
    real = backup_verbs.take_backup

    def spy(*args: Any, **kwargs: Any) -> bk.BackupInfo:
        threads.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(backup_verbs, "take_backup", spy)
    caplog.set_level(logging.INFO, logger="cmcd.backup")
    scheduler = BackupScheduler(_config(root, interval=Duration(0.05), keep=2), root / "cmcd.db")
    assert scheduler.last_success == 0.0
    started = time.time()
    scheduler.start()
    try:
        await asyncio.wait_for(scheduler.wait_attempts(3), 30)
    finally:
        await scheduler.close()
    assert scheduler.failures == 0 and scheduler.last_success >= int(started)
    assert len(bk.list_backups(root / "backups")) == 2
    assert all(t is not threading.main_thread() for t in threads) and len(threads) >= 3
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("event=backup_done")]
    assert len(done) >= 3 and " bytes=" in done[0] and " seconds=" in done[0] and " file=" in done[0]

    restarted = BackupScheduler(_config(root), root / "cmcd.db")  # an hour's interval: none taken here
    restarted.start()
    await asyncio.wait_for(restarted.ready.wait(), 30)
    await restarted.close()
    assert restarted.attempts == 0
    assert restarted.last_success == bk.list_backups(root / "backups")[-1].created  # known before the first


async def test_scheduler_logs_a_failure_and_carries_on(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cmcd.backup")
    scheduler = BackupScheduler(_config(root, interval=Duration(0.05)), root / "no-store.db")
    scheduler.start()
    try:
        await asyncio.wait_for(scheduler.wait_attempts(2), 30)
    finally:
        await scheduler.close()
    assert scheduler.failures >= 2 and scheduler.last_success == 0.0
    failed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("event=backup_failed")]
    assert failed[0] == f"event=backup_failed error='{root}/no-store.db: no store to back up (store.path)'"


async def test_scheduler_close_waits_for_a_backup_in_progress(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(root / "cmcd.db", root / "data.key")
    store.close()
    entered, release = threading.Event(), threading.Event()
    real = backup_verbs.take_backup

    def slow(*args: Any, **kwargs: Any) -> bk.BackupInfo:
        entered.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(backup_verbs, "take_backup", slow)
    scheduler = BackupScheduler(_config(root, interval=Duration(0.01)), root / "cmcd.db")
    scheduler.start()
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, entered.wait, 30)
    closing = asyncio.ensure_future(scheduler.close())
    # close() has stopped the schedule and taken the backup in progress, whose thread is still held
    deadline = loop.time() + 30
    while scheduler._task is not None or scheduler._running is not None:
        assert loop.time() < deadline, "close() never reached the backup in progress"
        await asyncio.sleep(0.01)
    assert not closing.done()  # still waiting for the backup thread
    release.set()
    await asyncio.wait_for(closing, 30)
    assert len(bk.list_backups(root / "backups")) == 1
    assert not [p for p in (root / "backups").iterdir() if p.name.endswith(".tmp")]
    assert os.path.exists(root / "backup.key")


# -- the real daemon ----------------------------------------------------------------------------


@pytest.mark.skipif("restore" not in daemon_mod.main.commands, reason="cmcd/daemon.py does not wire in backups yet")
def test_real_daemon_backup_now_then_restore(make_cmcd: Any) -> None:
    d = make_cmcd({"backup": {"dir": "backups", "key_file": "backup.key", "keep": 3}})
    taken = d.admin("backup.now")
    assert taken["path"].startswith(str(d.root / "backups" / "cmcd-store-"))
    assert [b["name"] for b in d.admin("backup.list")] == [taken["name"]]
    assert d.admin("backup.verify", file=taken["name"])["rows"]["tenants"] == 2
    d.admin("tenant.add", name="after-the-backup")
    argv = [sys.executable, "-m", "cmcd.daemon", "restore", taken["path"], "--config", str(d.config_path)]
    running = subprocess.run(argv, cwd=d.root, capture_output=True, text=True, timeout=60)
    assert running.returncode == 1 and "cmcd is running" in running.stderr
    assert d.stop() == 0
    assert any("event=backup_done trigger=admin" in line for line in d.log)

    restored = subprocess.run(argv, cwd=d.root, capture_output=True, text=True, timeout=60)
    assert restored.returncode == 0, restored.stderr
    assert "rows: tenants=2 users=2" in restored.stdout
    d.start()
    assert [t["name"] for t in d.admin("tenant.list")] == ["acme", "beta"]


# -- a purged tenant out of every kept backup ------------------------------------------------------


def decrypted(e: Env) -> list[bytes]:
    """Each kept generation decrypted: the raw file (as stored, indexes not built) and the restored store."""
    key = bk.read_backup_key(e.root / "backup.key")
    out = []
    for b in bk.list_backups(e.backup_dir):
        raw = e.root / "raw.db"
        with raw.open("wb") as f:
            backup_file.unseal_store(b.path, key, f)
        out.append(raw.read_bytes())
        target = e.root / "restored" / b.name
        bk.restore_backup(b.path, e.root / "backup.key", target, now=time.time())
        out.append(target.read_bytes())
    return out


async def test_tenant_delete_purge_from_backups_leaves_nothing_in_any_backup(env: Env) -> None:
    store = env.astore.store
    secrets = ("zqvictim", "zqlogin-7", "zqvictim.example", "zq-bounced.example")
    for name in ("acme", secrets[0]):
        await env.astore.call(store.tenant_add, name)
    await env.astore.call(store.user_add, secrets[0], secrets[1], "sender", "x")
    await env.astore.call(store.user_add, "acme", "acme-app", "sender", "x")
    await env.astore.call(store.domain_add, secrets[0], secrets[2])
    await env.astore.call(store.suppression_add, secrets[0], f"gone@{secrets[3]}", "550 unknown")
    await ok(env, "backup", "now")
    await ok(env, "backup", "now")
    assert all(secrets[0].encode() in g and secrets[1].encode() in g for g in decrypted(env))

    assert "still exists" in await refused(env, "backup", "purge-tenant", "acme")
    out = await ok(env, "tenant", "delete", secrets[0], "--purge", "--yes", "--from-backups")
    assert out.startswith(f"purged tenant {secrets[0]}: ")
    assert f"removed tenant {secrets[0]} from 2 of 2 backups (" in out and "chunks that held it erased" in out

    for g in decrypted(env):
        for text in secrets:
            assert text.encode() not in g, text
        assert b"acme-app" in g
    ops = await env.astore.call(lambda: list(store.ops_log(20)))
    [row] = [o for o in ops if o["action"] == "backup.purge-tenant" and o["result"] == "ok"]
    assert row["target"].startswith("tenant #") and "rewritten=2" in row["detail"] and row["result"] == "ok"
    assert not [o for o in ops if any(secrets[0] in str(v) for v in o.values())]  # the name is not kept
    again = json.loads(await ok(env, "--json", "backup", "purge-tenant", secrets[0]))
    assert again["rewritten"] == [] and again["generations"] == 2
