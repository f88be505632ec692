"""The tenancy core without a daemon: Accounts commands on a Store in tmp_path, their typed refusals,
one operation-log row per change in the change's own transaction, a directory current when a
command returns (and after another process's change once refreshed), nested transactions, and
the rules as tables."""

from __future__ import annotations

import asyncio
import ipaddress
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cmcd import crypto
from cmcd.db import transaction
from cmcd.store import AsyncStore, Store, open_store
from cmcd.tenancy import rules
from cmcd.tenancy.accounts import Accounts
from cmcd.tenancy.directory import Directory
from cmcd.tenancy.refusals import Reason, Refused
from tests.unit.tenancy_parts import op, open_tenancy

PASSWORD = "correct horse battery"  # 21 characters: the policy wants at least 12
#: the tables a command changes; a refused command leaves every one of them as it was
STATE_TABLES = ("tenants", "users", "ip_credentials", "api_keys", "suppressions", "directory")


@dataclass
class World:
    store: Store
    astore: AsyncStore
    directory: Directory
    accounts: Accounts
    store_path: Path
    key_file: Path

    def ops(self) -> list[tuple[Any, ...]]:
        """Operation-log rows, oldest first: (actor, action, target, result, tenant_id, detail)."""
        return self.store.conn.execute(
            "SELECT actor, action, target, result, tenant_id, detail FROM ops_log ORDER BY id"
        ).fetchall()

    def state(self) -> dict[str, list[tuple[Any, ...]]]:
        return {t: self.store.conn.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall() for t in STATE_TABLES}

    def version(self) -> int:
        return self.store.directory_state()[0]

    def password_ok(self, login: str, password: str) -> bool:
        found = self.store.user_for_login(login)
        return found is not None and crypto.verify_password(password, found[1])


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with open_tenancy(tmp_path) as tenancy:
        core = tenancy.core
        yield World(core.store, core.astore, tenancy.directory, tenancy.accounts,
                    tmp_path / "cmcd.db", tmp_path / "data.key")  # fmt: skip


async def tenant_with_user(w: World, role: str = "admin") -> int:
    """Tenant acme with user alice (PASSWORD); the tenant's id. The log rows it wrote are left in."""
    tenant = await w.accounts.tenant_add(op("tenant.add", "acme"), "acme")
    await w.accounts.user_add(op("user.add", "acme/alice"), "acme", "alice", role, PASSWORD)
    return tenant.id


# -- each command's happy path, its log row, and the directory when it returns -------------------


async def test_tenant_add_and_set_are_logged_and_in_the_directory(world: World) -> None:
    w = world
    start = w.version()
    tenant = await w.accounts.tenant_add(op("tenant.add", "acme"), "acme")
    assert tenant.name == "acme" and w.store.tenant("acme") == tenant
    assert w.directory.snapshot.tenant_names == {tenant.id: "acme"}

    summary = await w.accounts.tenant_set(op("tenant.set", "acme"), "acme", dsn=False, suppressed_rcpt=None)
    assert summary["dsn"] is False and summary["suppressed_rcpt"] == "accept"
    assert w.directory.snapshot.dsn_off == {tenant.id}
    assert w.directory.snapshot.refuse_suppressed == frozenset()
    await w.accounts.tenant_set(op("tenant.set", "acme"), "acme", dsn=True, suppressed_rcpt="refuse")
    assert w.directory.snapshot.dsn_off == frozenset()
    assert w.directory.snapshot.refuse_suppressed == {tenant.id}

    assert w.ops() == [
        ("root", "tenant.add", "acme", "ok", tenant.id, ""),
        ("root", "tenant.set", "acme", "ok", tenant.id, ""),
        ("root", "tenant.set", "acme", "ok", tenant.id, ""),
    ]
    assert w.version() == w.directory.snapshot.version == start + 3  # one bump per change


async def test_user_commands(world: World) -> None:
    w = world
    start = w.version()
    tenant_id = await tenant_with_user(w)
    alice = w.store.user("acme", "alice")
    assert (alice.role, alice.enabled) == ("admin", True) and w.password_ok("alice", PASSWORD)

    bob, generated = await w.accounts.user_add(op("user.add", "acme/bob"), "acme", "bob", "sender", None)
    assert bob.login == "bob" and generated is not None and len(generated) >= rules.MIN_PASSWORD_CHARS
    assert w.password_ok("bob", generated)

    user, shown = await w.accounts.user_passwd(op("user.passwd", "acme/bob"), "acme", "bob", "another long secret")
    assert shown is None and user.login == "bob"
    assert w.password_ok("bob", "another long secret") and not w.password_ok("bob", generated)
    _, shown = await w.accounts.user_passwd(op("user.passwd", "acme/bob"), "acme", "bob", None)
    assert shown is not None and w.password_ok("bob", shown)

    assert (await w.accounts.user_enable(op("user.disable", "acme/bob"), "acme", "bob", False)).enabled is False
    assert (await w.accounts.user_enable(op("user.enable", "acme/bob"), "acme", "bob", True)).enabled is True
    assert (await w.accounts.user_set_role(op("user.role", "acme/bob"), "acme", "bob", "viewer")).role == "viewer"
    await w.accounts.user_delete(op("user.delete", "acme/bob"), "acme", "bob")
    assert [u.login for u in w.store.users("acme")] == ["alice"]

    actions = ["tenant.add", "user.add", "user.add", "user.passwd", "user.passwd", "user.disable", "user.enable",
               "user.role", "user.delete"]  # fmt: skip
    assert [(r[1], r[3], r[4]) for r in w.ops()] == [(a, "ok", tenant_id) for a in actions]
    assert w.version() == start + len(actions)


async def test_ip_credentials_are_in_the_directory_when_the_command_returns(world: World) -> None:
    w = world
    tenant_id = await tenant_with_user(w)
    cred = await w.accounts.ipcred_add(op("ipcred.add", "acme/alice"), "acme", "alice", "192.0.2.7/24")
    assert cred.cidr == "192.0.2.0/24"  # normalised
    [(net, sender)] = w.directory.snapshot.ipcreds
    assert net == ipaddress.ip_network("192.0.2.0/24")
    assert (sender.tenant_id, sender.tenant, sender.login, sender.mechanism) == (tenant_id, "acme", "alice", "IP")

    # a disabled user's credential leaves the directory with the command that disabled it
    await w.accounts.user_enable(op("user.disable", "acme/alice"), "acme", "alice", False)
    assert w.directory.snapshot.ipcreds == ()
    await w.accounts.user_enable(op("user.enable", "acme/alice"), "acme", "alice", True)
    assert len(w.directory.snapshot.ipcreds) == 1

    await w.accounts.ipcred_delete(op("ipcred.delete", "acme/alice"), "acme", "alice", "192.0.2.0/24")
    assert w.directory.snapshot.ipcreds == () and w.store.ipcreds() == []
    assert [r[1] for r in w.ops()][-2:] == ["user.enable", "ipcred.delete"]


async def test_api_keys(world: World) -> None:
    w = world
    await tenant_with_user(w)
    row, token = await w.accounts.apikey_add(op("apikey.add", "acme/alice"), "acme", "alice", "sender")
    assert (row["login"], row["role"], row["revoked"]) == ("alice", "sender", None)
    caller = w.store.apikey_caller(token)
    assert caller is not None and (caller.login, caller.role) == ("alice", "sender")

    await w.accounts.apikey_revoke(op("apikey.revoke", row["key_id"]), "acme", row["key_id"])
    assert w.store.apikey_caller(token) is None
    assert [r[1:4] for r in w.ops()][-2:] == [
        ("apikey.add", "acme/alice", "ok"),
        ("apikey.revoke", row["key_id"], "ok"),
    ]


async def test_suppressions_are_in_the_directory_when_the_command_returns(world: World) -> None:
    w = world
    tenant_id = await tenant_with_user(w)
    add = op("suppression.add", "acme")
    assert await w.accounts.suppression_add(add, "acme", "gone@dst.test", "asked") is True
    assert w.directory.suppressions.contains(tenant_id, "gone@dst.test")
    assert await w.accounts.suppression_add(add, "acme", "gone@dst.test", "asked") is False
    await w.accounts.suppression_delete(op("suppression.delete", "acme"), "acme", "gone@dst.test")
    assert not w.directory.suppressions.contains(tenant_id, "gone@dst.test")
    assert [(r[1], r[3], r[5]) for r in w.ops()][-3:] == [
        ("suppression.add", "ok", "added"),
        ("suppression.add", "ok", "already listed"),
        ("suppression.delete", "ok", ""),
    ]


# -- typed refusals: one "refused" row, nothing else changed --------------------------------------

Command = Callable[[Accounts], Awaitable[Any]]

REFUSALS: list[tuple[str, Command, Reason, str]] = [
    ("tenant-name", lambda a: a.tenant_add(op("tenant.add", "x"), "bad name!"), Reason.INVALID, "name"),
    ("tenant-name-newline", lambda a: a.tenant_add(op("tenant.add", "x"), "acme\n"), Reason.INVALID, "name"),
    ("duplicate-tenant", lambda a: a.tenant_add(op("tenant.add", "acme"), "acme"), Reason.CONFLICT, ""),
    ("tenant-set-nothing",
     lambda a: a.tenant_set(op("tenant.set", "acme"), "acme", dsn=None, suppressed_rcpt=None), Reason.INVALID, ""),
    ("tenant-set-mode",
     lambda a: a.tenant_set(op("tenant.set", "acme"), "acme", dsn=None, suppressed_rcpt="drop"),
     Reason.INVALID, "suppressed_rcpt"),
    ("tenant-set-unknown",
     lambda a: a.tenant_set(op("tenant.set", "nope"), "nope", dsn=False, suppressed_rcpt=None), Reason.NOT_FOUND, ""),
    ("user-unknown-tenant",
     lambda a: a.user_add(op("user.add", "nope/bob"), "nope", "bob", "sender", PASSWORD), Reason.NOT_FOUND, ""),
    ("user-short-password",
     lambda a: a.user_add(op("user.add", "acme/bob"), "acme", "bob", "sender", "elevenchars"),
     Reason.INVALID, "password"),
    ("user-bad-login",
     lambda a: a.user_add(op("user.add", "acme/b b"), "acme", "b b", "sender", PASSWORD), Reason.INVALID, "login"),
    ("user-bad-role",
     lambda a: a.user_add(op("user.add", "acme/bob"), "acme", "bob", "root", PASSWORD), Reason.INVALID, "role"),
    ("user-duplicate",
     lambda a: a.user_add(op("user.add", "acme/alice"), "acme", "alice", "sender", PASSWORD), Reason.CONFLICT, ""),
    ("passwd-unknown-user",
     lambda a: a.user_passwd(op("user.passwd", "acme/bob"), "acme", "bob", PASSWORD), Reason.NOT_FOUND, ""),
    ("passwd-short", lambda a: a.user_passwd(op("user.passwd", "acme/alice"), "acme", "alice", "short"),
     Reason.INVALID, "password"),
    ("enable-unknown-user",
     lambda a: a.user_enable(op("user.enable", "acme/bob"), "acme", "bob", True), Reason.NOT_FOUND, ""),
    ("set-role-bad", lambda a: a.user_set_role(op("user.role", "acme/alice"), "acme", "alice", "owner"),
     Reason.INVALID, "role"),
    ("delete-unknown-user", lambda a: a.user_delete(op("user.delete", "acme/bob"), "acme", "bob"), Reason.NOT_FOUND, ""),
    ("ipcred-too-wide", lambda a: a.ipcred_add(op("ipcred.add", "acme/alice"), "acme", "alice", "10.0.0.0/8"),
     Reason.INVALID, "cidr"),
    ("ipcred-not-a-network", lambda a: a.ipcred_add(op("ipcred.add", "acme/alice"), "acme", "alice", "10.0.0"),
     Reason.INVALID, "cidr"),
    ("ipcred-delete-unknown",
     lambda a: a.ipcred_delete(op("ipcred.delete", "acme/alice"), "acme", "alice", "192.0.2.1"), Reason.NOT_FOUND, ""),
    ("apikey-bad-role", lambda a: a.apikey_add(op("apikey.add", "acme/alice"), "acme", "alice", "god"),
     Reason.INVALID, "role"),
    ("apikey-unknown-user",
     lambda a: a.apikey_add(op("apikey.add", "acme/bob"), "acme", "bob", None), Reason.NOT_FOUND, ""),
    ("apikey-revoke-unknown",
     lambda a: a.apikey_revoke(op("apikey.revoke", "k"), "acme", "nosuchkey"), Reason.NOT_FOUND, ""),
    ("suppression-bad-address",
     lambda a: a.suppression_add(op("suppression.add", "acme"), "acme", "not an address", "x"),
     Reason.BAD_ADDRESS, "address"),
    ("suppression-delete-unlisted",
     lambda a: a.suppression_delete(op("suppression.delete", "acme"), "acme", "x@dst.test"), Reason.NOT_FOUND, ""),
]  # fmt: skip


@pytest.mark.parametrize(("command", "reason", "field"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
async def test_a_refused_command_changes_nothing_and_writes_one_refused_row(
    world: World, command: Command, reason: Reason, field: str
) -> None:
    w = world
    await tenant_with_user(w)
    before, logged, snapshot = w.state(), len(w.ops()), w.directory.snapshot
    with pytest.raises(Refused) as exc:
        await command(w.accounts)
    assert (exc.value.refusal.reason, exc.value.refusal.field) == (reason, field)
    assert str(exc.value) == exc.value.refusal.text and exc.value.refusal.text
    assert w.state() == before  # nothing changed, the directory version included
    assert w.directory.snapshot is snapshot  # so nothing was reloaded
    [row] = w.ops()[logged:]
    assert (row[0], row[3], row[5]) == ("root", "refused", exc.value.refusal.text)


async def test_the_log_row_is_in_the_changes_transaction(world: World) -> None:
    """A change whose operation-log row cannot be written is not made (nor its version bump)."""
    w = world
    await tenant_with_user(w)
    before = w.state()
    w.store.conn.execute(
        "CREATE TEMP TRIGGER no_ops BEFORE INSERT ON ops_log BEGIN SELECT RAISE(ABORT, 'ops_log is full'); END"
    )
    with pytest.raises(sqlite3.IntegrityError, match="ops_log is full"):
        await w.accounts.ipcred_add(op("ipcred.add", "acme/alice"), "acme", "alice", "192.0.2.1")
    w.store.conn.execute("DROP TRIGGER no_ops")
    assert w.state() == before


# -- another process's change ------------------------------------------------------------------------


async def test_a_change_by_another_process_is_seen_at_the_next_refresh(world: World) -> None:
    w = world
    tenant_id = await tenant_with_user(w)
    other = open_store(w.store_path, w.key_file)  # a second process: its own connection to the same file
    try:
        with transaction(other.conn):
            other.tenant_set("acme", dsn=False)
            other.bump_directory()
        assert w.directory.snapshot.dsn_off == frozenset()  # nothing here knows yet
        reloads = w.directory.reloads
        await w.directory.refresh()
        assert w.directory.snapshot.dsn_off == {tenant_id} and w.directory.reloads == reloads + 1
        assert w.directory.snapshot.version == w.version()

        # a hard bounce adds a suppression row without a version bump: picked up on its own, no reload
        other.suppression_add("acme", "bounced@dst.test", "550 5.1.1 no such user")
        assert not w.directory.suppressions.contains(tenant_id, "bounced@dst.test")
        await w.directory.refresh()
        assert w.directory.suppressions.contains(tenant_id, "bounced@dst.test")
        assert w.directory.reloads == reloads + 1

        # a change without a bump is not looked for (this is why every command bumps)
        other.tenant_set("acme", dsn=True)
        await w.directory.refresh()
        assert w.directory.snapshot.dsn_off == {tenant_id}
    finally:
        other.close()


async def test_a_removal_elsewhere_reloads_the_suppressions_and_keeps_what_is_not_shipped(world: World) -> None:
    """A suppression removed by another process bumps `removals`: the whole set is read again,
    without the accounts; a hard bounce this process added in memory, whose row the store does
    not have yet, survives that reload."""
    w = world
    tenant_id = await tenant_with_user(w)
    await w.accounts.suppression_add(op("suppression.add", "acme"), "acme", "old@dst.test", "operator")
    w.directory.suppressions.add(tenant_id, "fresh-bounce@dst.test")  # the engine, before its event ships
    other = open_store(w.store_path, w.key_file)
    try:
        with transaction(other.conn):
            other.suppression_delete("acme", "old@dst.test")
            other.bump_directory(accounts=False, removals=True)
        reloads = w.directory.reloads
        await w.directory.refresh()
        assert not w.directory.suppressions.contains(tenant_id, "old@dst.test")
        assert w.directory.suppressions.contains(tenant_id, "fresh-bounce@dst.test")
        assert w.directory.reloads == reloads  # the accounts snapshot was not read again
    finally:
        other.close()


async def test_a_current_directory_makes_nobody_wait(world: World) -> None:
    """A check that finds every version current takes no lock: sessions never wait on a poll."""
    w = world
    await tenant_with_user(w)
    await w.directory.refresh()
    task = asyncio.get_running_loop().create_task(w.directory.refresh())
    await asyncio.sleep(0)  # the refresh is now waiting on the store thread
    assert not w.directory.reloading
    await task


# -- transactions nest ---------------------------------------------------------------------------------


@pytest.fixture
def conn(tmp_path: Path) -> Any:
    c = sqlite3.connect(tmp_path / "t.db", isolation_level=None)  # autocommit, as the store and spool open theirs
    c.execute("CREATE TABLE t (v TEXT)")
    yield c
    c.close()


def _rows(c: sqlite3.Connection) -> list[str]:
    return [r[0] for r in c.execute("SELECT v FROM t ORDER BY rowid")]


class Boom(Exception):
    pass


def test_a_caught_inner_failure_rolls_back_the_inner_part_only(conn: sqlite3.Connection) -> None:
    with transaction(conn):
        conn.execute("INSERT INTO t VALUES ('outer')")
        with pytest.raises(Boom), transaction(conn):
            conn.execute("INSERT INTO t VALUES ('inner')")
            raise Boom
        conn.execute("INSERT INTO t VALUES ('after')")
    assert _rows(conn) == ["outer", "after"] and not conn.in_transaction


def test_an_outer_failure_rolls_back_both(conn: sqlite3.Connection) -> None:
    with pytest.raises(Boom), transaction(conn):
        conn.execute("INSERT INTO t VALUES ('outer')")
        with transaction(conn):
            conn.execute("INSERT INTO t VALUES ('inner')")
        raise Boom
    assert _rows(conn) == [] and not conn.in_transaction


def test_an_uncaught_inner_failure_rolls_back_both(conn: sqlite3.Connection) -> None:
    with pytest.raises(Boom), transaction(conn):
        conn.execute("INSERT INTO t VALUES ('outer')")
        with transaction(conn):
            conn.execute("INSERT INTO t VALUES ('inner')")
            raise Boom
    assert _rows(conn) == [] and not conn.in_transaction


def test_savepoints_nest_three_deep(conn: sqlite3.Connection) -> None:
    with transaction(conn):
        conn.execute("INSERT INTO t VALUES ('1')")
        with transaction(conn):
            conn.execute("INSERT INTO t VALUES ('2')")
            with pytest.raises(Boom), transaction(conn):
                conn.execute("INSERT INTO t VALUES ('3')")
                raise Boom
            conn.execute("INSERT INTO t VALUES ('2b')")
    assert _rows(conn) == ["1", "2", "2b"]


# -- the rules, as tables ---------------------------------------------------------------------------

ADDRESSES = [
    ("plain", "alice@example.com", True, None),
    ("subdomain", "a.b+tag@mail.example.co.uk", True, None),
    ("ip-literal", "postmaster@[192.0.2.1]", True, None),
    ("utf8-allowed", "jöran@example.com", True, None),
    ("utf8-without-smtputf8", "jöran@example.com", False, "Non-ASCII address requires SMTPUTF8"),
    ("idn-domain", "ユーザー@例え.jp", True, None),
    ("idn-domain-mixed-case", "user@Bücher.Example", True, None),
    ("idn-domain-as-a-label", "user@xn--bcher-kva.example", True, None),
    ("idn-domain-without-smtputf8", "user@bücher.example", False, "Non-ASCII address requires SMTPUTF8"),
    ("idn-bad-label", "user@bü-.example", True, "expected local-part@domain"),
    ("idn-disallowed-code-point", "user@a\u2764\ufe0f.example", True, "expected local-part@domain"),
    ("c1-control", "jö\x85ran@example.com", True, "control characters or spaces"),
    ("line-separator", "jö\u2028ran@example.com", True, "control characters or spaces"),
    ("space", "al ice@example.com", True, "control characters or spaces"),
    ("control-char", "alice\r\n@example.com", True, "control characters or spaces"),
    ("nul", "alice\x00@example.com", True, "control characters or spaces"),
    ("no-at", "alice.example.com", True, "expected local-part@domain"),
    ("empty-local", "@example.com", True, "expected local-part@domain"),
    ("single-label-domain", "alice@localhost", True, "expected local-part@domain"),
    ("domain-with-underscore", "alice@ex_ample.com", True, "expected local-part@domain"),
    ("trailing-dot-label", "alice@example.", True, "expected local-part@domain"),
    (
        "too-long",
        "a" * 64 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 58 + ".com",
        True,
        "Address too long (at most 254 octets)",
    ),
    ("longest", "a" * 64 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 57 + ".com", True, None),
    ("too-long-in-octets", "ü.b" * 62 + "@例え.jp", True, "Address too long (at most 254 octets)"),
    ("local-part-65-octets", "a" * 65 + "@example.com", True, "Local part too long (at most 64 octets)"),
    ("local-part-64-octets", "a" * 64 + "@example.com", True, None),
    ("local-part-22-characters-66-octets", "ユ" * 22 + "@例え.jp", True, "Local part too long (at most 64 octets)"),
]


@pytest.mark.parametrize(("address", "smtputf8", "problem"), [a[1:] for a in ADDRESSES], ids=[a[0] for a in ADDRESSES])
def test_address_rule(address: str, smtputf8: bool, problem: str | None) -> None:
    refusal = rules.address_refusal(address, smtputf8=smtputf8)
    if problem is None:
        assert refusal is None
    else:
        assert refusal is not None and problem in refusal.text
        assert (refusal.reason, refusal.code, refusal.enhanced) == (Reason.BAD_ADDRESS, 501, "5.1.3")
        assert refusal.reply == f"501 5.1.3 {refusal.text}"


def test_check_address_names_the_field() -> None:
    assert rules.check_address("a@example.com", "to") == "a@example.com"
    with pytest.raises(Refused) as exc:
        rules.check_address("nope", "to")
    assert exc.value.refusal.field == "to" and exc.value.refusal.text.startswith("to: Bad address syntax")


NAMES: list[tuple[str, Callable[[str], str], str, bool]] = [
    ("tenant-plain", rules.check_tenant_name, "acme", True),
    ("tenant-punctuation", rules.check_tenant_name, "acme-2.eu_west", True),
    ("tenant-63", rules.check_tenant_name, "a" * 63, True),
    ("tenant-64", rules.check_tenant_name, "a" * 64, False),
    ("tenant-leading-dot", rules.check_tenant_name, ".acme", False),
    ("tenant-trailing-newline", rules.check_tenant_name, "acme\n", False),
    ("tenant-slash", rules.check_tenant_name, "ac/me", False),
    ("tenant-empty", rules.check_tenant_name, "", False),
    ("login-address-like", rules.check_login, "app+1@acme.test", True),
    ("login-128", rules.check_login, "a" * 128, True),
    ("login-129", rules.check_login, "a" * 129, False),
    ("login-leading-dash", rules.check_login, "-app", False),
    ("login-colon", rules.check_login, "a:b", False),
    ("login-trailing-newline", rules.check_login, "app\n", False),
    ("role-admin", rules.check_role, "admin", True),
    ("role-sender", rules.check_role, "sender", True),
    ("role-viewer", rules.check_role, "viewer", True),
    ("role-upper-case", rules.check_role, "Admin", False),
    ("role-unknown", rules.check_role, "owner", False),
    ("password-12", rules.check_password, "x" * 12, True),
    ("password-11", rules.check_password, "x" * 11, False),
    ("password-1024", rules.check_password, "x" * 1024, True),
    ("password-1025", rules.check_password, "x" * 1025, False),
    ("password-nul", rules.check_password, "x" * 12 + "\x00", False),
]


@pytest.mark.parametrize(("check", "value", "ok"), [n[1:] for n in NAMES], ids=[n[0] for n in NAMES])
def test_name_rules(check: Callable[[str], str], value: str, ok: bool) -> None:
    if ok:
        assert check(value) == value
    else:
        with pytest.raises(Refused) as exc:
            check(value)
        assert exc.value.refusal.reason is Reason.INVALID and exc.value.refusal.code == 501
        assert exc.value.refusal.field in ("name", "login", "role", "password")


DOMAINS = [
    ("lower-case", "example.com", "example.com"),
    ("upper-case", "Mail.Example.COM", "mail.example.com"),
    ("trailing-dot", "example.com.", "example.com"),
    ("spaces-around", "  example.com ", "example.com"),
    ("single-label", "localhost", None),
    ("numeric-tld", "example.123", None),
    ("underscore", "ex_ample.com", None),
    ("leading-hyphen-label", "-x.example.com", None),
    ("empty", "", None),
]


@pytest.mark.parametrize(("name", "normal"), [d[1:] for d in DOMAINS], ids=[d[0] for d in DOMAINS])
def test_sender_domain(name: str, normal: str | None) -> None:
    if normal is not None:
        assert rules.sender_domain(name) == normal
    else:
        with pytest.raises(Refused) as exc:
            rules.sender_domain(name)
        assert (exc.value.refusal.reason, exc.value.refusal.field) == (Reason.INVALID, "domain")


def test_send_roles_are_roles() -> None:
    assert set(rules.SEND_ROLES) < set(rules.ROLES) and "viewer" not in rules.SEND_ROLES
