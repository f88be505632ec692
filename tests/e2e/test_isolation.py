"""Tenant isolation matrix (issue 6 item 5): acting as tenant A (acme) on tenant B's (beta) objects.

Every admin verb that takes a tenant is run through cmcctl with A as the tenant and one of B's objects
as the target: a refusal must name what is missing, a mutation's refusal must be in the operation log
(result "refused", the verb, the target, attributed to A), and B's rows in the store and the spool must
be byte-for-byte what they were. Verbs that list or change A's own data must show and touch A's rows
only. Over SMTP, A's credentials (AUTH on 587 and 465, and an IP credential) never send with B's
envelope or From: domain, and get an enhanced status code saying why.

COVERAGE below lists every verb of the admin socket (cmcd.admin.verbs.VERBS) and where it is
covered; test_every_admin_verb_is_in_the_matrix fails when a verb is added without a line here.
One daemon serves the whole module; delivery is off, so B's queue ids stay put.
"""

from __future__ import annotations

import json
import smtplib
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cmcd.admin.verbs import VERBS
from tests.conftest import Cmcd, message, queue_id

#: verb -> where its tenant isolation is tested. "matrix" means a row of REFUSED or SCOPED below.
COVERAGE: dict[str, str] = {
    "status": "no tenant scope: daemon-wide counters",
    "tenant.add": "no tenant scope: makes a new name; a duplicate is refused in test_admin.py::test_tenant_errors",
    "tenant.list": "no tenant scope: the operator's list of every tenant",
    "tenant.show": "matrix (scoped: A's summary holds none of B's domains)",
    "tenant.delete": "by name only; purging one tenant keeps the other's messages: "
    "test_operations.py::test_tenant_purge_leaves_nothing_behind (too destructive for this shared daemon)",
    "tenant.set": "matrix (scoped: changing A leaves B's settings alone)",
    "user.add": "matrix (refused: B's login under A)",
    "user.list": "matrix (scoped)",
    "user.passwd": "matrix (refused)",
    "user.disable": "matrix (refused)",
    "user.enable": "matrix (refused)",
    "user.delete": "matrix (refused)",
    "ipcred.add": "matrix (refused: B's login under A; A's network overlapping B's)",
    "ipcred.list": "matrix (scoped)",
    "ipcred.delete": "matrix (refused)",
    "domain.add": "matrix (refused: B's domain added to A)",
    "domain.list": "matrix (scoped)",
    "domain.keys": "matrix (refused)",
    "domain.dns": "matrix (refused)",
    "domain.check": "matrix (refused)",
    "domain.dkim-rotate": "matrix (refused)",
    "domain.dkim-activate": "matrix (refused)",
    "domain.dkim-retire": "matrix (refused)",
    "domain.import-key": "matrix (refused)",
    "log.mail": "matrix (scoped, also --queue-id/--sender/--rcpt of B's message)",
    "log.login": "matrix (scoped)",
    "log.ops": "matrix (scoped)",
    "retention.run": "no tenant scope: removes rows by age for everyone; "
    "test_operations.py::test_retention_at_the_boundary",
    "queue.list": "matrix (scoped)",
    "queue.show": "matrix (refused)",
    "queue.summary": "matrix (scoped)",
    "shaping.status": "matrix (scoped: a tenant's suspensions only; sites and limits are no tenant's)",
    "queue.retry": "matrix (refused: B's queue id; scoped: --domain and --all with --tenant A)",
    "queue.hold": "matrix (refused: B's queue id; scoped: --tenant A)",
    "queue.release": "matrix (refused: B's queue id; scoped: --tenant A leaves B's held message held)",
    "queue.delete": "matrix (refused)",
    "suppression.list": "matrix (scoped)",
    "suppression.add": "matrix (scoped: A adding B's address leaves B's entry alone)",
    "suppression.delete": "matrix (refused) and test_suppression_entries_stay_per_tenant_in_memory",
    "apikey.add": "matrix (refused: B's login under A)",
    "apikey.list": "matrix (scoped: A's keys only)",
    "apikey.revoke": "matrix (refused: B's key id under A)",
    "user.otp-enroll": "matrix (refused: B's admin under A)",
    "user.otp-confirm": "matrix (refused: B's admin under A)",
    "user.otp-disable": "matrix (refused: B's admin under A)",
    "user.set-role": "matrix (refused: B's login under A)",
    "user.otp-require": "matrix (refused: B's login under A)",
    "user.set-stream": "matrix (refused: B's login under A)",
    "session.list": "matrix (refused: B's login under A)",
    "session.revoke": "matrix (refused: B's login under A, one id and --all)",
    "webhook.add": "matrix (refused: a URL that is not http(s) under A's name; the refusal is logged)",
    "webhook.list": "matrix (scoped: A's endpoints only)",
    "webhook.delete": "matrix (refused: B's webhook id under A)",
    "webhook.status": "matrix (scoped: A's endpoints only)",
    "backup.now": "no tenant scope: snapshots the whole store",
    "backup.list": "no tenant scope",
    "backup.verify": "no tenant scope",
    "backup.purge-tenant": "by name of a tenant already deleted (refused while it exists); erasing one tenant "
    "from the backups keeps the other's rows: test_backup_admin.py and unit/test_backup.py (destructive)",
    "evidence": "matrix (scoped: --tenant acme shows none of B's users, keys, logs or purges)",
}

# SMTP paths that take a tenant: AUTH on 587 (STARTTLS) and 465 (implicit TLS), and an IP credential,
# each with B's envelope domain and B's From: domain, below (test_smtp_sender_of_another_tenant_is_refused).
# Related cases already tested elsewhere, not repeated here:
#   test_hostile.py::test_login_of_one_user_with_password_of_another_fails (A's login, B's password)
#   test_submission.py::test_bad_credentials_are_refused_and_logged (B's login, wrong password)
#   test_queue_admin.py::test_list_show_summary_and_paging (queue.show of B's id with tenant A, at the socket)

CMCCTL = [sys.executable, "-m", "cmcd.admin.cli"]
B_ADDRESS = "blocked@dst.test"  # on B's suppression list
B_RCPT = "beta-only@dst.test"  # a recipient only B's messages have


@dataclass
class World:
    d: Cmcd
    a_id: int
    b_id: int
    a_qids: list[str]
    names: dict[str, str]  # placeholders in the argv templates: b_queued, b_held, pem

    def argv(self, template: str) -> list[str]:
        return [part.format(**self.names) for part in template.split()]


def cmcctl(d: Cmcd, argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CMCCTL, "--socket", str(d.root / "admin.sock"), *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _rows(conn: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in conn.execute(sql, args)]


def b_data(w: World) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of tenant B in the store and the spool, read from the files."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    b = (w.b_id,)
    conn = sqlite3.connect(f"file:{w.d.root / 'cmcd.db'}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            columns = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
            if table == "webhooks":  # the dispatcher moves cursor and attempt state on its own
                out[table] = _rows(
                    conn, "SELECT id, url, events, secret_enc, created FROM webhooks WHERE tenant_id = ?", b
                )
            elif "tenant_id" in columns:
                out[table] = _rows(conn, f"SELECT * FROM {table} WHERE tenant_id = ? ORDER BY rowid", b)
        out["tenants"] = _rows(conn, "SELECT * FROM tenants WHERE id = ?", b)
        out["dkim_keys"] = _rows(
            conn, "SELECT * FROM dkim_keys WHERE domain_id IN (SELECT id FROM domains WHERE tenant_id = ?)", b
        )
    finally:
        conn.close()
    out["spool.messages"], out["spool.recipients"] = [], []
    for shard in w.d.shards():  # every worker's shard, in file order: row ids are per shard
        spool = sqlite3.connect(f"file:{shard}?mode=ro", uri=True)
        try:
            out["spool.messages"] += _rows(spool, "SELECT * FROM messages WHERE tenant_id = ? ORDER BY queue_id", b)
            out["spool.recipients"] += _rows(
                spool,
                "SELECT * FROM recipients WHERE queue_id IN "
                "(SELECT queue_id FROM messages WHERE tenant_id = ?) ORDER BY id",
                b,
            )
        finally:
            spool.close()
    assert out["users"] and out["domains"] and out["dkim_keys"] and out["spool.messages"] and out["suppressions"]
    return out


def _wait(what: str, done: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _count(d: Cmcd, sql: str, *args: Any) -> int:
    conn = sqlite3.connect(f"file:{d.root / 'cmcd.db'}?mode=ro", uri=True)
    try:
        return int(conn.execute(sql, args).fetchone()[0])
    finally:
        conn.close()


def _send(c: smtplib.SMTP, sender: str, rcpt: str) -> str:
    assert c.mail(sender)[0] == 250
    assert c.rcpt(rcpt)[0] == 250
    code, reply = c.data(message(sender=sender, to=rcpt))
    assert code == 250, reply
    return queue_id(reply)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> Iterator[World]:
    d = Cmcd(tmp_path_factory.mktemp("isolation"), ca, {"api": {"webhook_allow_private": True}})
    d.start().provision()
    ids = {t["name"]: t["id"] for t in d.admin("tenant.list")}
    # B: a second (disabled) user, an IP credential, a suppression, DKIM keys in every state
    # (standby, active, pending: each dkim verb would change something), two messages (one held)
    d.admin("user.add", tenant="beta", login="bob-off", role="sender", password="beta's other secret")
    d.admin("user.disable", tenant="beta", login="bob-off")
    d.admin("ipcred.add", tenant="beta", login="bob", cidr="192.0.2.0/24")
    d.admin("suppression.add", tenant="beta", address=B_ADDRESS)
    d.admin("tenant.set", name="beta", suppressed_rcpt="refuse")
    d.admin("domain.dkim-rotate", tenant="beta", domain="beta.test")
    d.admin("domain.dkim-activate", tenant="beta", domain="beta.test", force=True)
    d.admin("domain.dkim-rotate", tenant="beta", domain="beta.test")
    # B: an admin with a TOTP enrolment waiting for confirmation, and an API key
    d.admin("user.add", tenant="beta", login="beta-admin", role="admin", password="beta admin secret")
    d.admin("user.otp-enroll", tenant="beta", login="beta-admin")
    # B: a webhook (to a closed port on loopback: this daemon allows private addresses for that)
    b_hook = d.admin("webhook.add", tenant="beta", url="http://127.0.0.1:9/beta")["id"]
    b_key = d.admin("apikey.add", tenant="beta", login="bob")["key_id"]
    a_key = d.admin("apikey.add", tenant="acme", login="alice")["key_id"]
    # A: its own messages, sent by AUTH and (the SMTP matrix's third path) by an IP credential
    d.admin("ipcred.add", tenant="acme", login="alice", cidr="127.0.0.1/32")
    with d.smtp() as c:
        a_qids = [_send(c, "alice@acme.test", f"a{n}@dst.test") for n in range(2)]
    with d.smtp(login="bob") as c:
        b_held = _send(c, "bob@beta.test", B_RCPT)
        b_queued = _send(c, "bob@beta.test", B_RCPT)
    d.admin("queue.hold", queue_id=b_held)
    pem = d.root / "imported.pem"
    pem.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    # the mail and login logs are written behind the replies: wait until B's rows are all in
    _wait(
        "B's accepted rows in the mail log",
        lambda: len([r for r in d.mail_log() if r["tenant_id"] == ids["beta"]]) == 2,
    )
    _wait("bob's login in the login log", lambda: _count(d, "SELECT COUNT(*) FROM login_log WHERE login = 'bob'") == 1)
    _wait("alice's logins", lambda: _count(d, "SELECT COUNT(*) FROM login_log WHERE tenant_id = ?", ids["acme"]) >= 1)
    _wait("A's accepted rows", lambda: len([r for r in d.mail_log() if r["tenant_id"] == ids["acme"]]) == 2)
    yield World(
        d,
        ids["acme"],
        ids["beta"],
        a_qids,
        {
            "b_queued": b_queued,
            "b_held": b_held,
            "pem": str(pem),
            "b_key": b_key,
            "a_key": a_key,
            "b_hook": str(b_hook),
        },
    )
    d.stop()


def test_every_admin_verb_is_in_the_matrix() -> None:
    verbs = set(VERBS)
    assert sorted(verbs - set(COVERAGE)) == [], (
        "new admin verb: add it to COVERAGE (and to the matrix if it has a tenant)"
    )
    assert sorted(set(COVERAGE) - verbs) == [], "COVERAGE names a verb the admin socket no longer has"
    in_rows = {r.verb for r in REFUSED} | {r.verb for r in SCOPED}
    claimed = {v for v, where in COVERAGE.items() if where.startswith("matrix")}
    assert claimed == in_rows
    takes_tenant = {v for v, spec in VERBS.items() if "tenant" in spec.args or spec.tenant_arg in spec.args}
    assert takes_tenant - claimed <= {"tenant.add", "tenant.delete"}, "a verb with a tenant argument has no row"


# -- admin verbs refused on B's objects ------------------------------------------------------


@dataclass(frozen=True)
class Refused:
    verb: str
    argv: str  # cmcctl arguments, {placeholders} from World.names
    error: str  # the refusal cmcctl prints
    target: str = ""  # for a mutation: what the operation log's target must contain
    stdin: str | None = None
    name: str = ""

    @property
    def id(self) -> str:
        return self.name or self.verb


NO_DOMAIN = "tenant 'acme' has no domain 'beta.test'"
NO_BOB = "no user 'bob' in tenant 'acme'"
NO_B_ADMIN = "no user 'beta-admin' in tenant 'acme'"
NO_MESSAGE = "no message '{}' in the queue"

REFUSED = [
    Refused("domain.add", "domain add acme BETA.TEST.", "domain 'beta.test' is already registered", "acme/BETA.TEST."),
    Refused("domain.keys", "domain keys acme beta.test", NO_DOMAIN),
    Refused("domain.dns", "domain dns acme beta.test", NO_DOMAIN),
    Refused("domain.check", "domain check acme beta.test", NO_DOMAIN, "acme/beta.test"),
    Refused("domain.dkim-rotate", "domain dkim-rotate acme beta.test", NO_DOMAIN, "acme/beta.test"),
    Refused("domain.dkim-activate", "domain dkim-activate acme beta.test --force", NO_DOMAIN, "acme/beta.test"),
    Refused("domain.dkim-retire", "domain dkim-retire acme beta.test", NO_DOMAIN, "acme/beta.test"),
    Refused("domain.import-key", "domain import-key acme beta.test imp1 {pem}", NO_DOMAIN, "acme/beta.test imp1"),
    Refused(
        "user.add", "user add acme bob --password-stdin", "login 'bob' already exists", "acme/bob", "password-of-a\n"
    ),
    Refused("user.passwd", "user passwd acme bob --password-stdin", NO_BOB, "acme/bob", "a new secret\n"),
    Refused("user.disable", "user disable acme bob", NO_BOB, "acme/bob"),
    Refused("user.enable", "user enable acme bob-off", "no user 'bob-off' in tenant 'acme'", "acme/bob-off"),
    Refused("user.delete", "user delete acme bob", NO_BOB, "acme/bob"),
    Refused("ipcred.add", "ipcred add acme bob 198.51.100.0/24", NO_BOB, "acme/bob 198.51.100.0/24"),
    Refused(
        "ipcred.add",
        "ipcred add acme alice 192.0.2.128/25",
        "192.0.2.128/25 overlaps 192.0.2.0/24, an IP credential of another tenant",
        "acme/alice 192.0.2.128/25",
        name="ipcred.add-overlapping-B",
    ),
    Refused("ipcred.delete", "ipcred delete acme bob 192.0.2.0/24", NO_BOB, "acme/bob 192.0.2.0/24"),
    Refused("queue.show", "queue show {b_queued} --tenant acme", NO_MESSAGE.format("{b_queued}")),
    Refused("queue.hold", "queue hold {b_queued} --tenant acme", NO_MESSAGE.format("{b_queued}"), "{b_queued}"),
    Refused("queue.release", "queue release {b_held} --tenant acme", NO_MESSAGE.format("{b_held}"), "{b_held}"),
    Refused("queue.retry", "queue retry {b_queued} --tenant acme", NO_MESSAGE.format("{b_queued}"), "{b_queued}"),
    Refused("queue.delete", "queue delete {b_queued} --tenant acme", NO_MESSAGE.format("{b_queued}"), "{b_queued}"),
    Refused("apikey.add", "apikey add acme bob", NO_BOB, "acme/bob"),
    Refused(
        "webhook.add",
        "webhook add acme ftp://hooks.beta.test/",
        "'ftp://hooks.beta.test/': a webhook URL must start with https:// or http://",
        "acme ftp://hooks.beta.test/",
    ),
    Refused(
        "webhook.delete", "webhook delete acme {b_hook}", "tenant 'acme' has no webhook {b_hook}", "webhook={b_hook}"
    ),
    Refused("apikey.revoke", "apikey revoke acme {b_key}", "no active API key '{b_key}' in tenant 'acme'", "{b_key}"),
    Refused("user.otp-enroll", "user otp-enroll acme beta-admin", NO_B_ADMIN, "acme/beta-admin"),
    Refused("user.otp-confirm", "user otp-confirm acme beta-admin 123456", NO_B_ADMIN, "acme/beta-admin"),
    Refused("user.otp-disable", "user otp-disable acme beta-admin", NO_B_ADMIN, "acme/beta-admin"),
    Refused("user.set-role", "user set-role acme bob admin", NO_BOB, "acme/bob role=admin"),
    Refused("user.otp-require", "user otp-require acme bob --on", NO_BOB, "acme/bob"),
    Refused("user.set-stream", "user set-stream acme bob broadcast", NO_BOB, "acme/bob stream=broadcast"),
    Refused("session.list", "session list acme beta-admin", NO_B_ADMIN, "acme"),
    Refused("session.revoke", "session revoke acme beta-admin --all", NO_B_ADMIN, "acme/beta-admin"),
    Refused(
        "session.revoke",
        "session revoke acme beta-admin 0123456789abcdef",
        NO_B_ADMIN,
        "acme/beta-admin 0123456789abcdef",
        name="session.revoke-one",
    ),
    Refused(
        "suppression.delete",
        f"suppression delete acme {B_ADDRESS}",
        "that address is not on tenant 'acme''s suppression list",
        "acme",
    ),
]


@pytest.mark.parametrize("row", REFUSED, ids=[r.id for r in REFUSED])
def test_admin_verb_on_another_tenants_object_is_refused(world: World, row: Refused) -> None:
    d = world.d
    before, last_op = b_data(world), d.ops_log()[-1]["id"]
    proc = cmcctl(d, world.argv(row.argv), row.stdin)
    error = row.error.format(**world.names)
    assert (proc.returncode, proc.stdout, proc.stderr.strip()) == (1, "", f"cmcctl: {error}")
    assert b_data(world) == before
    ops = [o for o in d.ops_log() if o["id"] > last_op]
    assert len(ops) == 1, ops  # refused reads are on record as well as refused changes
    (op,) = ops
    assert (op["action"], op["result"], op["tenant_id"], op["detail"]) == (row.verb, "refused", world.a_id, error)
    assert row.target.format(**world.names) in op["target"], op


# -- admin verbs scoped to A show and change A's rows only -----------------------------------


Check = Callable[[World, Any], None]


@dataclass(frozen=True)
class Scoped:
    verb: str
    argv: str  # run as `cmcctl --json ARGV`
    check: Check  # on the parsed output
    name: str = ""
    undo: tuple[str, dict[str, Any]] | None = None  # an admin call that puts A back as it was


def _no_webhooks(w: World, out: Any) -> None:
    assert out == []  # B's endpoint is not A's


def _apikeys(w: World, out: Any) -> None:
    assert [(k["key_id"], k["login"]) for k in out] == [(w.names["a_key"], "alice")]
    assert "token" not in str(out)


def _logins(w: World, out: Any) -> None:
    assert [u["login"] for u in out] == ["alice"]


def _ipcreds(w: World, out: Any) -> None:
    assert out == [{"tenant": "acme", "login": "alice", "cidr": "127.0.0.1/32"}]


def _domains(w: World, out: Any) -> None:
    assert out == [{"tenant": "acme", "domain": "acme.test"}]


def _summary(w: World, out: Any) -> None:
    assert (out["name"], out["domains"], out["users"], out["suppressions"]) == ("acme", ["acme.test"], 1, 0)


def _tenant_set(w: World, out: Any) -> None:
    assert (out["name"], out["dsn"], out["suppressed_rcpt"]) == ("acme", False, "refuse")


def _queue_list(w: World, out: Any) -> None:
    assert [m["queue_id"] for m in out["items"]] == w.a_qids and {m["tenant"] for m in out["items"]} == {"acme"}


def _queue_summary(w: World, out: Any) -> None:
    assert sum(out["states"].values()) == 2 and [x["domain"] for x in out["domains"]] == ["dst.test"]


def _shaping_status(w: World, out: Any) -> None:
    assert out["workers"] and all(
        c["tenant_id"] in (None, w.a_id) for worker in out["workers"] for c in worker["changes"]
    )


def _recipients(n: int) -> Check:
    def check(w: World, out: Any) -> None:
        assert out == {"recipients": n}

    return check


def _only_a(kind: str) -> Check:
    def check(w: World, out: Any) -> None:
        assert out and {r["tenant"] for r in out} == {"acme"}, out
        if kind != "ops":  # A's ops log does name B's objects: the refused attempts above, made as A
            text = json.dumps(out)
            assert "beta.test" not in text and B_RCPT not in text and w.names["b_queued"] not in text
        if kind == "mail":
            assert {r["queue_id"] for r in out} == set(w.a_qids)
        if kind == "login":
            assert {r["login"] for r in out} == {"alice"}

    return check


def _nothing(w: World, out: Any) -> None:
    assert out == []


def _evidence(w: World, out: Any) -> None:
    assert out["tenant"] == "acme" and out["lines"]
    text = json.dumps(out)
    for b_thing in ("beta", "bob", w.names["b_key"], B_RCPT, B_ADDRESS):
        assert b_thing not in text, b_thing
    named = {
        line["item"].rsplit(" of ", 1)[1] for line in out["lines"] if line["item"].startswith(("users of", "admins of"))
    }
    assert named == {"acme"}


def _suppressions(w: World, out: Any) -> None:
    assert out == []


def _suppression_added(w: World, out: Any) -> None:
    assert out == {"tenant": "acme", "address": B_ADDRESS, "added": True}


SCOPED = [
    Scoped("tenant.show", "tenant show acme", _summary),
    Scoped("apikey.list", "apikey list acme", _apikeys),
    Scoped("webhook.list", "webhook list acme", _no_webhooks),
    Scoped("webhook.status", "webhook status acme", _no_webhooks),
    Scoped(
        "tenant.set",
        "tenant set acme --dsn off --suppressed refuse",
        _tenant_set,
        undo=("tenant.set", {"name": "acme", "dsn": True, "suppressed_rcpt": "accept"}),
    ),
    Scoped("user.list", "user list acme", _logins),
    Scoped("ipcred.list", "ipcred list acme", _ipcreds),
    Scoped("domain.list", "domain list acme", _domains),
    Scoped("queue.list", "queue list --tenant acme", _queue_list),
    Scoped("queue.summary", "queue summary --tenant acme", _queue_summary),
    Scoped("shaping.status", "shaping status --tenant acme", _shaping_status),
    Scoped("queue.retry", "queue retry --all --tenant acme", _recipients(2), name="queue.retry-all"),
    Scoped("queue.retry", "queue retry --domain dst.test --tenant acme", _recipients(2), name="queue.retry-domain"),
    Scoped(
        "queue.hold",
        "queue hold --tenant acme",
        _recipients(2),
        undo=("queue.release", {"tenant": "acme"}),
    ),
    Scoped("queue.release", "queue release --tenant acme", _recipients(0)),  # B's held message stays held
    Scoped("log.mail", "log mail --tenant acme", _only_a("mail")),
    Scoped("log.mail", "log mail --tenant acme --queue-id {b_queued}", _nothing, name="log.mail-B-queue-id"),
    Scoped("log.mail", "log mail --tenant acme --sender bob@beta.test", _nothing, name="log.mail-B-sender"),
    Scoped("log.mail", f"log mail --tenant acme --rcpt {B_RCPT}", _nothing, name="log.mail-B-rcpt"),
    Scoped("log.login", "log login --tenant acme", _only_a("login")),
    Scoped("log.ops", "log ops --tenant acme", _only_a("ops")),
    Scoped("suppression.list", "suppression list acme", _suppressions),
    Scoped("evidence", "evidence --tenant acme", _evidence),
    Scoped(
        "suppression.add",
        f"suppression add acme {B_ADDRESS}",
        _suppression_added,
        undo=("suppression.delete", {"tenant": "acme", "address": B_ADDRESS}),
    ),
]


@pytest.mark.parametrize("row", SCOPED, ids=[r.name or r.verb for r in SCOPED])
def test_admin_verb_scoped_to_a_tenant_sees_and_changes_only_its_rows(world: World, row: Scoped) -> None:
    d = world.d
    before, last_op = b_data(world), d.ops_log()[-1]["id"]
    proc = cmcctl(d, ["--json", *world.argv(row.argv)])
    assert proc.returncode == 0, proc.stderr
    try:
        row.check(world, json.loads(proc.stdout))
        assert b_data(world) == before
        ops = [(o["action"], o["result"], o["tenant_id"]) for o in d.ops_log() if o["id"] > last_op]
        assert ops == ([(row.verb, "ok", world.a_id)] if VERBS[row.verb].mutation else [])
    finally:
        if row.undo is not None:
            d.admin(row.undo[0], **row.undo[1])


# -- SMTP: A's credentials never send as B ---------------------------------------------------

PATHS: dict[str, Callable[[Cmcd], smtplib.SMTP]] = {
    "auth-587-starttls": lambda d: d.smtp(),
    "auth-465-tls": lambda d: d.smtps(),
    "ip-credential": lambda d: d.smtp(starttls=False, login=None),  # alice's 127.0.0.1/32
}

# header blocks sent byte for byte (smtplib's data() would rewrite bare CR and LF); where A's From:
# comes first, a parser that missed B's field would accept the message instead of refusing it
HEADERS = {
    "from-header": b"From: <bob@beta.test>\r\n",
    "from-header-uppercase": b"From: BOB@BETA.TEST\r\n",
    "from-header-second-mailbox": b"From: alice@acme.test, bob@beta.test\r\n",
    "from-header-folded-mailbox": b"From: alice@acme.test,\r\n bob@beta.test\r\n",
    "from-header-display-name": b'From: "alice@acme.test" <bob@beta.test>\r\n',
    "from-header-second-field": b"From: alice@acme.test\r\nFrom: bob@beta.test\r\n",
    "from-header-after-bare-lf": b"From: alice@acme.test\r\nSubject: x\nFrom: bob@beta.test\r\n",
    "from-header-after-bare-cr": b"From: alice@acme.test\r\nSubject: x\rFrom: bob@beta.test\r\n",
}
ENVELOPES = {"envelope": "bob@beta.test", "envelope-uppercase": "BOB@BETA.TEST", "envelope-other-user": "x@beta.test"}
CASES = [(path, case) for path in PATHS for case in [*ENVELOPES, *HEADERS]]


@pytest.mark.parametrize(("path", "case"), CASES, ids=[f"{p}-{c}" for p, c in CASES])
def test_smtp_sender_of_another_tenant_is_refused(world: World, path: str, case: str) -> None:
    d = world.d
    before, spooled = b_data(world), len(d.spooled())
    with PATHS[path](d) as c:
        if case in ENVELOPES:
            code, text = c.mail(ENVELOPES[case])
            assert (code, text[:5]) == (553, b"5.7.1"), text
            assert b"not one of your tenant's domains" in text
        else:
            assert c.mail("alice@acme.test")[0] == 250
            assert c.rcpt("r@dst.test")[0] == 250
            assert c.docmd("DATA")[0] == 354
            c.send(HEADERS[case] + b"To: <r@dst.test>\r\n\r\nhi\r\n.\r\n")
            code, text = c.getreply()
            assert (code, text[:5]) == (550, b"5.7.1"), text
            assert b"From: header rejected" in text
        assert c.noop()[0] == 250  # a refusal, not a dropped session
    assert len(d.spooled()) == spooled
    assert b_data(world) == before


def test_suppression_entries_stay_per_tenant_in_memory(world: World) -> None:
    """A adding and removing an address B has suppressed leaves B's entry in effect at RCPT
    (the daemon's in-memory suppression set is keyed by tenant, like the store)."""
    d = world.d
    d.admin("suppression.add", tenant="acme", address=B_ADDRESS)
    d.admin("suppression.delete", tenant="acme", address=B_ADDRESS)
    with d.smtp(login="bob") as c:
        assert c.mail("bob@beta.test")[0] == 250
        code, text = c.rcpt(B_ADDRESS)
        assert (code, text[:5]) == (550, b"5.7.1"), text
        c.rset()
    with d.smtp() as c:  # and A, which never suppressed it (accept mode), is not refused
        assert c.mail("alice@acme.test")[0] == 250
        assert c.rcpt(B_ADDRESS)[0] == 250
        c.rset()
