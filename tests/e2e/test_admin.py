"""The admin socket end to end: a real AdminServer on a Unix socket with a real store and spool, driven by cmcctl."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cmcd import crypto
from cmcd.admin.server import AdminServer
from cmcd.config import AdminConfig, Config
from cmcd.errors import CmcdError
from cmcd.queue.audit import AuditLog
from cmcd.queue.ids import QueueIdGenerator
from cmcd.queue.spool import Spool
from cmcd.records import Recipient, SpoolMessage
from cmcd.store import AsyncStore, open_store
from cmcd.tenancy import Directory, Tenancy

STATUS = {"state": "running", "version": "test"}


@dataclass
class Daemon:
    server: AdminServer
    tenancy: Tenancy
    astore: AsyncStore
    spool: Spool
    socket: Path
    version_at_start: int

    async def changes(self) -> int:
        """How many changes tenancy commands made (how far the store's directory version moved)."""
        return (await self.astore.call(self.astore.store.directory_state))[0] - self.version_at_start

    async def ops(self) -> list[dict[str, Any]]:
        """The operation log, oldest first."""
        store = self.astore.store
        rows = await self.astore.call(lambda: list(store.ops_log(1000)))
        return list(reversed(rows))


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="cmcd-adm-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _config(sock: Path) -> Config:
    return Config(admin=AdminConfig(socket=str(sock)))


async def tenancy_of(config: Config, astore: AsyncStore, spool: Spool) -> Tenancy:
    """The tenancy layer as the daemon builds it (its directory read once; no poller)."""
    directory = Directory(astore, poll_s=0)
    await directory.start()
    return Tenancy(config, astore, AuditLog(spool, astore), directory)


@pytest.fixture
async def daemon(tmp_path: Path, sock_dir: Path) -> AsyncIterator[Daemon]:
    store = open_store(tmp_path / "cmcd.db", tmp_path / "data.key")
    astore = AsyncStore(store)
    spool = Spool(tmp_path / "spool", store.keys)
    spool.start()
    sock = sock_dir / "admin.sock"
    tenancy = await tenancy_of(_config(sock), astore, spool)
    server = AdminServer(_config(sock), tenancy, spool, status=lambda: STATUS)
    await server.start()
    try:
        yield Daemon(server, tenancy, astore, spool, sock, store.directory_state()[0])
    finally:
        await server.close()
        await tenancy.directory.close()
        spool.stop()
        astore.close()


async def cmcctl(d: Daemon | Path, *args: str, stdin: bytes = b"") -> Run:
    sock = d.socket if isinstance(d, Daemon) else d
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cmcd.admin.cli",
        "--socket",
        str(sock),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


async def ok(d: Daemon, *args: str, stdin: bytes = b"") -> str:
    r = await cmcctl(d, *args, stdin=stdin)
    assert r.code == 0, r.err
    assert r.err == ""
    return r.out


async def refused(d: Daemon, *args: str, stdin: bytes = b"") -> str:
    r = await cmcctl(d, *args, stdin=stdin)
    assert r.code == 1, (r.out, r.err)
    assert r.out == ""
    assert r.err.startswith("cmcctl: ") and r.err.count("\n") == 1, r.err
    return r.err.removeprefix("cmcctl: ").strip()


async def verifies(d: Daemon, login: str, password: str) -> bool:
    found = await d.astore.call(d.astore.store.user_for_login, login)
    assert found is not None
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, crypto.verify_password, password, found[1])


def generated_password(out: str) -> str:
    m = re.search(r"^generated password: (\S+)$", out, re.M)
    assert m, out
    assert "Store it now" in out
    return m.group(1)


def table_rows(out: str) -> list[list[str]]:
    """The data rows of a cmcctl table, split on runs of two or more spaces."""
    return [re.split(r"\s{2,}", line.strip()) for line in out.splitlines()[1:]]


def my_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


# -- socket --------------------------------------------------------------------------------


async def test_socket_is_mode_0660_and_removed_on_close(daemon: Daemon) -> None:
    st = os.lstat(daemon.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    reader, writer = await asyncio.open_unix_connection(str(daemon.socket))  # an idle client does not block close
    try:
        await asyncio.wait_for(daemon.server.close(), timeout=10)
        assert await reader.read() == b""
    finally:
        writer.close()
        await writer.wait_closed()
    assert not daemon.socket.exists()


async def test_stale_socket_replaced_live_socket_refused(sock_dir: Path, daemon: Daemon) -> None:
    stale = sock_dir / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # leaves the file behind with nothing listening, like a crashed daemon
    assert stale.exists()
    other = AdminServer(_config(stale), daemon.tenancy, daemon.spool, status=lambda: STATUS)
    await other.start()
    try:
        r = await cmcctl(stale, "--json", "status")
        assert r.code == 0 and json.loads(r.out) == STATUS
    finally:
        await other.close()

    rival = AdminServer(_config(daemon.socket), daemon.tenancy, daemon.spool, status=dict)
    with pytest.raises(CmcdError, match="another process is serving the admin socket"):
        await rival.start()
    assert json.loads(await ok(daemon, "--json", "status")) == STATUS  # the first server is untouched


async def test_unreachable_socket(sock_dir: Path) -> None:
    missing = sock_dir / "nothing.sock"
    r = await cmcctl(missing, "status")
    assert r.code == 1
    assert r.err.startswith(f"cmcctl: cannot reach cmcd at {missing}: No such file or directory")
    assert r.err.rstrip().endswith("(is the daemon running?)")


async def test_raw_protocol_bad_lines_keep_connection_usable(daemon: Daemon) -> None:
    reader, writer = await asyncio.open_unix_connection(str(daemon.socket))
    try:

        async def ask(line: bytes) -> dict[str, Any]:
            writer.write(line + b"\n")
            await writer.drain()
            reply: dict[str, Any] = json.loads(await reader.readline())
            return reply

        bad = await ask(b'{"verb": "status"')
        assert bad["ok"] is False and "not valid JSON" in bad["error"]
        assert await ask(b'{"verb": "status", "args": {}}') == {"ok": True, "result": STATUS}
        unknown = await ask(b'{"verb": "tenant.explode", "args": {}}')
        assert unknown["ok"] is False and "unknown verb 'tenant.explode'" in unknown["error"]
        assert "tenant.add" in unknown["error"]
        not_object = await ask(b'["status"]')
        assert not_object == {"ok": False, "error": not_object["error"]} and '"verb"' in not_object["error"]
        typo = await ask(b'{"verb": "tenant.add", "args": {"nmae": "acme"}}')
        assert typo["ok"] is False and "unknown argument 'nmae'" in typo["error"]
        missing = await ask(b'{"verb": "tenant.add", "args": {}}')
        assert missing["ok"] is False and "missing argument 'name'" in missing["error"]
        bad_limit = await ask(b'{"verb": "queue.list", "args": {"limit": "lots"}}')
        assert bad_limit["ok"] is False and "'limit' must be an integer" in bad_limit["error"]
        added = await ask(b'{"verb": "tenant.add", "args": {"name": "acme"}}')
        assert added == {"ok": True, "result": {"id": 1, "name": "acme"}}
    finally:
        writer.close()
        await writer.wait_closed()
    assert await daemon.changes() == 1  # only the one successful mutation
    assert [(o["action"], o["result"]) for o in await daemon.ops()] == [
        ("tenant.add", "refused"),
        ("tenant.add", "refused"),
        ("queue.list", "refused"),  # a refused read that named something is on record too
        ("tenant.add", "ok"),
    ]


async def test_status_and_config_option(daemon: Daemon, tmp_path: Path) -> None:
    out = await ok(daemon, "status")
    assert re.search(r"^state:\s+running$", out, re.M) and re.search(r"^version:\s+test$", out, re.M)
    cfg = tmp_path / "cmcd.toml"
    cfg.write_text(f'[smtp]\nlisten = []\n[admin]\nsocket = "{daemon.socket}"\n')
    r = await cmcctl(tmp_path / "wrong.sock", "--config", str(cfg), "--json", "status")
    assert r.code == 0, r.err
    assert json.loads(r.out) == STATUS


# -- tenants -------------------------------------------------------------------------------


async def test_tenant_add_list_show(daemon: Daemon) -> None:
    assert (await ok(daemon, "tenant", "add", "acme")).strip() == "added tenant acme (id 1)"
    await ok(daemon, "tenant", "add", "globex")
    assert await daemon.changes() == 2
    assert table_rows(await ok(daemon, "tenant", "list")) == [["acme", "1", "-"], ["globex", "2", "-"]]
    assert json.loads(await ok(daemon, "--json", "tenant", "list")) == [
        {"id": 1, "name": "acme", "block_actions": {}},
        {"id": 2, "name": "globex", "block_actions": {}},
    ]
    await ok(daemon, "domain", "add", "acme", "acme.example")
    show = await ok(daemon, "tenant", "show", "acme")
    assert re.search(r"^users:\s+0$", show, re.M)
    assert re.search(r"^domains:\s+acme.example$", show, re.M)
    shown = json.loads(await ok(daemon, "--json", "tenant", "show", "globex"))
    assert shown == {
        "name": "globex",
        "id": 2,
        "users": 0,
        "domains": [],
        "ip_credentials": 0,
        "dsn": True,
        "suppressed_rcpt": "accept",
        "suppressions": 0,
        "console_otp": False,
        "timezone": "",
        "block_actions": {},
        "block_policy": "invalid_recipient=suppress,bad_domain=suppress,mailbox_full=count,message_too_large=none,"
        "spam_block=alert,policy=none,authentication=alert,rate_limited=none,tls=none,dns=none,other=none",
        "block_count_threshold": 3,
        "block_count_window_s": 7 * 86400,
        "block_watch_s": 30 * 86400,
    }


async def test_tenant_errors(daemon: Daemon) -> None:
    await ok(daemon, "tenant", "add", "acme")
    assert await refused(daemon, "tenant", "add", "acme") == "tenant 'acme' already exists"
    assert "use letters, digits" in await refused(daemon, "tenant", "add", "bad name!")
    assert await refused(daemon, "tenant", "show", "nosuch") == "no tenant 'nosuch'"
    assert await daemon.changes() == 1
    dup = (await daemon.ops())[1]
    assert (dup["action"], dup["target"], dup["result"]) == ("tenant.add", "acme", "refused")
    assert dup["detail"] == "tenant 'acme' already exists" and dup["tenant"] == "acme"
    assert table_rows(await ok(daemon, "tenant", "list")) == [["acme", "1", "-"]]


# -- users ---------------------------------------------------------------------------------


async def test_user_add_with_password_from_stdin(daemon: Daemon) -> None:
    await ok(daemon, "tenant", "add", "acme")
    out = await ok(
        daemon, "user", "add", "acme", "app1", "--role", "admin", "--password-stdin", stdin=b"s3cret-Pass-1\n"
    )
    assert out.strip() == "added user app1 (admin) to tenant acme"
    assert await verifies(daemon, "app1", "s3cret-Pass-1")
    assert table_rows(await ok(daemon, "user", "list", "acme"))[0][:3] == ["app1", "admin", "yes"]
    assert "no password on stdin" in await refused(daemon, "user", "add", "acme", "app2", "--password-stdin")
    assert await refused(daemon, "user", "add", "acme", "app1", "--password-stdin", stdin=b"another-password\n") == (
        "login 'app1' already exists"
    )


async def test_user_add_generates_password_once(daemon: Daemon) -> None:
    await ok(daemon, "tenant", "add", "acme")
    out = await ok(daemon, "user", "add", "acme", "app1")
    assert out.startswith("added user app1 (sender) to tenant acme\n")
    password = generated_password(out)
    assert len(password) >= 20 and await verifies(daemon, "app1", password)
    result = json.loads(await ok(daemon, "--json", "user", "add", "acme", "app2"))
    assert result["login"] == "app2" and result["role"] == "sender" and result["enabled"] is True
    assert await verifies(daemon, "app2", result["password"])
    listed = json.loads(await ok(daemon, "--json", "user", "list", "acme"))
    assert [u["login"] for u in listed] == ["app1", "app2"]
    assert all("password" not in u for u in listed)


async def test_user_passwd(daemon: Daemon) -> None:
    await ok(daemon, "tenant", "add", "acme")
    await ok(daemon, "user", "add", "acme", "app1", "--password-stdin", stdin=b"first-password")
    out = await ok(daemon, "user", "passwd", "acme", "app1", "--password-stdin", stdin=b"second-password\n")
    assert out.strip() == "changed the password of app1 in tenant acme"
    assert await verifies(daemon, "app1", "second-password")
    assert not await verifies(daemon, "app1", "first-password")
    third = generated_password(await ok(daemon, "user", "passwd", "acme", "app1"))
    assert await verifies(daemon, "app1", third)
    assert await refused(daemon, "user", "passwd", "acme", "ghost") == "no user 'ghost' in tenant 'acme'"


async def test_user_disable_enable_delete(daemon: Daemon) -> None:
    await ok(daemon, "tenant", "add", "acme")
    await ok(daemon, "tenant", "add", "globex")
    await ok(daemon, "user", "add", "acme", "app1")
    await ok(daemon, "user", "add", "globex", "gx1")
    assert (await ok(daemon, "user", "disable", "acme", "app1")).strip() == "disabled user app1 in tenant acme"
    assert table_rows(await ok(daemon, "user", "list", "acme"))[0][:3] == ["app1", "sender", "no"]
    assert not (await daemon.astore.call(daemon.astore.store.user, "acme", "app1")).enabled
    await ok(daemon, "user", "enable", "acme", "app1")
    assert json.loads(await ok(daemon, "--json", "user", "list", "acme"))[0]["enabled"] is True
    # a tenant's users are reachable only through that tenant
    assert await refused(daemon, "user", "disable", "globex", "app1") == "no user 'app1' in tenant 'globex'"
    assert [r[0] for r in table_rows(await ok(daemon, "user", "list", "globex"))] == ["gx1"]
    assert (await ok(daemon, "user", "delete", "acme", "app1")).strip() == "deleted user app1 in tenant acme"
    assert (await ok(daemon, "user", "list", "acme")).strip() == "no users in tenant acme"
    assert await refused(daemon, "user", "delete", "acme", "app1") == "no user 'app1' in tenant 'acme'"


async def test_unknown_tenant(daemon: Daemon) -> None:
    assert await refused(daemon, "user", "add", "nosuch", "app1") == "no tenant 'nosuch'"
    assert await refused(daemon, "user", "list", "nosuch") == "no tenant 'nosuch'"
    assert await refused(daemon, "domain", "add", "nosuch", "a.example") == "no tenant 'nosuch'"
    assert await refused(daemon, "queue", "list", "--tenant", "nosuch") == "no tenant 'nosuch'"
    assert await daemon.changes() == 0
    ops = await daemon.ops()
    assert [(o["action"], o["target"], o["result"], o["tenant"]) for o in ops] == [
        ("user.add", "nosuch/app1", "refused", None),
        ("user.list", "tenant=nosuch", "refused", None),
        ("domain.add", "nosuch/a.example", "refused", None),
        ("queue.list", "tenant=nosuch", "refused", None),
    ]


# -- IP credentials and domains ------------------------------------------------------------


async def test_ipcred_add_list_delete(daemon: Daemon) -> None:
    await ok(daemon, "tenant", "add", "acme")
    await ok(daemon, "user", "add", "acme", "app1")
    out = await ok(daemon, "ipcred", "add", "acme", "app1", "192.0.2.7/24")
    assert out.strip() == "added IP credential 192.0.2.0/24 of app1 in tenant acme"
    await ok(daemon, "ipcred", "add", "acme", "app1", "2001:db8::1")
    assert table_rows(await ok(daemon, "ipcred", "list", "acme")) == [
        ["app1", "192.0.2.0/24"],
        ["app1", "2001:db8::1/128"],
    ]
    assert "is not an address or CIDR network" in await refused(daemon, "ipcred", "add", "acme", "app1", "10.0.0.300/8")
    assert "already a credential" in await refused(daemon, "ipcred", "add", "acme", "app1", "192.0.2.0/24")
    await ok(daemon, "ipcred", "delete", "acme", "app1", "192.0.2.0/24")
    listed = json.loads(await ok(daemon, "--json", "ipcred", "list", "acme"))
    assert listed == [{"tenant": "acme", "login": "app1", "cidr": "2001:db8::1/128"}]
    assert "has no credential" in await refused(daemon, "ipcred", "delete", "acme", "app1", "192.0.2.0/24")
    assert await daemon.changes() == 5  # tenant, user, two adds, one delete


async def test_domain_add_list(daemon: Daemon) -> None:
    await ok(daemon, "tenant", "add", "acme")
    await ok(daemon, "tenant", "add", "globex")
    assert re.fullmatch(
        r"added domain mail\.acme\.example to tenant acme \(DKIM selectors: cmc\d{6}r, cmc\d{6}e\)",
        (await ok(daemon, "domain", "add", "acme", "Mail.ACME.example.")).strip(),
    )
    await ok(daemon, "domain", "add", "globex", "globex.example")
    assert "is not a domain name" in await refused(daemon, "domain", "add", "acme", "not_a_domain")
    assert await refused(daemon, "domain", "add", "globex", "mail.acme.example") == (
        "domain 'mail.acme.example' is already registered"
    )
    assert table_rows(await ok(daemon, "domain", "list")) == [
        ["globex.example", "globex"],
        ["mail.acme.example", "acme"],
    ]
    assert json.loads(await ok(daemon, "--json", "domain", "list", "acme")) == [
        {"tenant": "acme", "domain": "mail.acme.example"}
    ]


# -- queue ---------------------------------------------------------------------------------


async def test_queue_empty_and_unknown_id(daemon: Daemon) -> None:
    assert (await ok(daemon, "queue", "list")).strip() == "the queue is empty"
    assert json.loads(await ok(daemon, "--json", "queue", "list")) == {"items": [], "next": None}
    assert await refused(daemon, "queue", "show", "NOSUCHID") == "no message 'NOSUCHID' in the queue"


async def test_queue_list_and_show_never_show_the_body(daemon: Daemon) -> None:
    await ok(daemon, "tenant", "add", "acme")
    await ok(daemon, "tenant", "add", "globex")
    await ok(daemon, "user", "add", "acme", "app1")
    u = await daemon.astore.call(daemon.astore.store.user, "acme", "app1")
    queue_id = QueueIdGenerator().next()
    body = b"Subject: hello\r\n\r\nTOP-SECRET-BODY-TEXT\r\n"
    rcpts = (Recipient("bob@example.net", "example.net"), Recipient("carol@example.org", "example.org"))
    msg = SpoolMessage(queue_id, u.tenant_id, u.id, "app1@acme.example", rcpts, body, time.time())
    await daemon.spool.commit(msg, "2024-01-01")

    listing = await ok(daemon, "queue", "list")
    row = table_rows(listing)[0]
    assert row[:3] == [queue_id, "acme", "app1@acme.example"] and row[-2:] == ["2", "queued"]
    assert (await ok(daemon, "queue", "list", "--tenant", "globex")).strip() == "the queue is empty"
    shown = json.loads(await ok(daemon, "--json", "queue", "show", queue_id))
    assert shown["tenant"] == "acme" and shown["sender"] == "app1@acme.example" and shown["size_bytes"] == len(body)
    assert [(r["address"], r["state"]) for r in shown["recipients"]] == [
        ("bob@example.net", "queued"),
        ("carol@example.org", "queued"),
    ]
    human = await ok(daemon, "queue", "show", queue_id)
    assert "bob@example.net" in human and "carol@example.org" in human
    for text in (listing, human, json.dumps(shown)):
        assert "TOP-SECRET" not in text and "Subject" not in text


# -- operation log -------------------------------------------------------------------------


async def test_ops_log_records_caller_and_never_passwords(daemon: Daemon) -> None:
    await ok(daemon, "tenant", "add", "acme")
    await ok(daemon, "user", "add", "acme", "app1", "--password-stdin", stdin=b"given-Password-1")
    generated = generated_password(await ok(daemon, "user", "add", "acme", "app2"))
    changed = generated_password(await ok(daemon, "user", "passwd", "acme", "app1"))
    await refused(daemon, "user", "passwd", "acme", "ghost", "--password-stdin", stdin=b"refused-Password-2")
    await ok(daemon, "ipcred", "add", "acme", "app1", "198.51.100.0/24")
    await ok(daemon, "domain", "add", "acme", "acme.example")
    await ok(daemon, "user", "disable", "acme", "app2")
    await ok(daemon, "tenant", "list")  # reads are not logged
    await ok(daemon, "queue", "list")

    ops = await daemon.ops()
    assert [(o["action"], o["target"], o["result"]) for o in ops] == [
        ("tenant.add", "acme", "ok"),
        ("user.add", "acme/app1", "ok"),
        ("user.add", "acme/app2", "ok"),
        ("user.passwd", "acme/app1", "ok"),
        ("user.passwd", "acme/ghost", "refused"),
        ("ipcred.add", "acme/app1 198.51.100.0/24", "ok"),
        ("domain.add", "acme/acme.example", "ok"),
        ("user.disable", "acme/app2", "ok"),
    ]
    assert {(o["actor_uid"], o["actor"], o["tenant"]) for o in ops} == {(os.getuid(), my_name(), "acme")}
    assert ops[4]["detail"] == "no user 'ghost' in tenant 'acme'"
    dump = json.dumps(ops)
    for secret in ("given-Password-1", generated, changed, "refused-Password-2"):
        assert secret not in dump
    assert await daemon.changes() == 7


async def test_overlong_request_line_is_discarded_and_connection_stays_usable(daemon: Daemon) -> None:
    reader, writer = await asyncio.open_unix_connection(str(daemon.socket))
    try:
        for pad in (2 * 1024 * 1024, 1024 * 1024 + 10):  # far past the limit, and just past it
            writer.write(b'{"verb": "tenant.add", "args": {"name": "' + b"x" * pad + b'"}}\n')
            writer.write(b'{"verb": "status"}\n')
            await writer.drain()
            reply = json.loads(await reader.readline())
            assert reply["ok"] is False and "request longer than" in reply["error"]
            assert json.loads(await reader.readline()) == {"ok": True, "result": STATUS}
    finally:
        writer.close()
        await writer.wait_closed()
    assert await daemon.ops() == [] and await daemon.changes() == 0
