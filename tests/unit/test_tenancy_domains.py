"""Tenancy's domain and DKIM commands without a daemon, on a Store in tmp_path: add with the first
keys, rotate, the DNS state a check records, activate (forced or not), retire, import a key; each
change one operation-log row in its transaction and the DKIM signing keys of the directory as they
are when the command returns; each refusal typed, on record, and changing nothing. Then the tenant
purge's store part, and the records to publish as pure tables."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cmcd.config import DkimConfig
from cmcd.store import Store
from cmcd.tenancy import Directory, Op, Tenancy
from cmcd.tenancy.domains import Record, dns_states, domain_name, records, zone_lines
from cmcd.tenancy.refusals import Reason, Refused
from tests.unit.tenancy_parts import op, open_tenancy

DKIM = DkimConfig(rsa_bits=1024)  # the shortest RSA key DKIM takes: quick to make
HOST = "mx.cmcd.test"
#: the tables a domain command changes; a refused command leaves every one of them as it was
STATE_TABLES = ("tenants", "domains", "dkim_keys", "directory")


@dataclass
class World:
    store: Store
    tenancy: Tenancy

    @property
    def directory(self) -> Directory:
        return self.tenancy.directory

    def ops(self) -> list[tuple[Any, ...]]:
        """(action, target, result, tenant_id, detail), oldest first."""
        return self.store.conn.execute(
            "SELECT action, target, result, tenant_id, detail FROM ops_log ORDER BY id"
        ).fetchall()

    def state(self) -> dict[str, list[tuple[Any, ...]]]:
        return {t: self.store.conn.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall() for t in STATE_TABLES}

    def keys(self, domain: str) -> dict[str, tuple[str, str]]:
        """selector -> (state, dns_state)."""
        rows = self.store.conn.execute(
            "SELECT k.selector, k.state, k.dns_state FROM dkim_keys k JOIN domains d ON d.id = k.domain_id "
            "WHERE d.name = ?",
            (domain,),
        )
        return {r[0]: (r[1], r[2]) for r in rows}

    def signing(self) -> set[tuple[str, str]]:
        """(domain, selector) of every key the directory in this process signs with."""
        return {(d, s) for d, s, _, _ in self.directory.snapshot.dkim_keys}


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with open_tenancy(tmp_path) as tenancy:
        for name in ("acme", "beta"):
            await tenancy.accounts.tenant_add(op("tenant.add", name), name)
        yield World(tenancy.core.store, tenancy)


def lookup_saying(status: str) -> Any:
    """A DNS lookup (the door's) that finds every record with STATUS."""

    async def lookup(recs: list[Record]) -> list[Record]:
        return [{"name": r["name"], "status": status} for r in recs]

    return lookup


async def refused(w: World, reason: Reason, text: str, call: Any) -> None:
    """CALL is refused for REASON with TEXT in its words, changes nothing and writes one refused row."""
    before, rows = w.state(), len(w.ops())
    with pytest.raises(Refused) as caught:
        await call
    assert caught.value.refusal.reason is reason and text in str(caught.value), str(caught.value)
    assert w.state() == before
    new = w.ops()[rows:]
    assert [r[2] for r in new] == ["refused"] and text in new[0][4]  # (the audit log shortens URLs in it)


async def test_domain_add_signs_with_its_first_keys_when_the_command_returns(world: World) -> None:
    w = world
    domain, selectors = await w.tenancy.domains.add(
        op("domain.add", "acme/Mail.ACME.test."), "acme", "Mail.ACME.test.", DKIM
    )
    assert (domain.tenant, domain.name) == ("acme", "mail.acme.test")
    assert len(selectors) == 2 and selectors[0].endswith("r") and selectors[1].endswith("e")
    assert w.signing() == {("mail.acme.test", s) for s in selectors}
    acme = w.store.tenant("acme").id
    assert w.directory.snapshot.tenant_domains[acme] == frozenset({"mail.acme.test"})
    assert w.ops()[-1] == ("domain.add", "acme/Mail.ACME.test.", "ok", acme, "")
    assert {state for state, _ in w.keys("mail.acme.test").values()} == {"active"}


async def test_domain_add_refusals(world: World) -> None:
    w = world
    d = w.tenancy.domains
    await d.add(op("domain.add", "acme/acme.test"), "acme", "acme.test", DKIM)
    await refused(w, Reason.INVALID, "is not a domain name", d.add(op("domain.add", "x"), "acme", "not_a_domain", DKIM))
    await refused(w, Reason.NOT_FOUND, "no tenant 'nosuch'", d.add(op("domain.add", "x"), "nosuch", "n.test", DKIM))
    await refused(
        w, Reason.CONFLICT, "domain 'acme.test' is already registered",
        d.add(op("domain.add", "x"), "beta", "ACME.test", DKIM),
    )  # fmt: skip


async def test_rotate_check_activate_retire(world: World) -> None:
    w = world
    d = w.tenancy.domains
    _, first = await d.add(op("domain.add", "acme/acme.test"), "acme", "acme.test", DKIM)
    pending = await d.rotate(op("domain.dkim-rotate", "acme/acme.test"), "acme", "acme.test", DKIM)
    assert len(pending) == 2 and not set(pending) & set(first)  # selectors not used before
    assert w.signing() == {("acme.test", s) for s in first}  # pending keys are published, not used
    await refused(
        w, Reason.INVALID, "already has pending keys",
        d.rotate(op("domain.dkim-rotate", "acme/acme.test"), "acme", "acme.test", DKIM),
    )  # fmt: skip
    await refused(
        w, Reason.INVALID, f"DNS does not show {', '.join(reversed(pending))} yet",  # newest key first
        d.activate(op("domain.dkim-activate", "acme/acme.test"), "acme", "acme.test", force=False),
    )  # fmt: skip

    results = await d.check(op("domain.check", "acme/acme.test"), "acme", "acme.test", HOST, lookup_saying("published"))
    assert len(results) == 6  # four keys, SPF and DMARC
    assert {dns for _, dns in w.keys("acme.test").values()} == {"published"}
    assert w.ops()[-1][:3] == ("domain.check", "acme/acme.test", "ok")

    active, standby = await d.activate(op("domain.dkim-activate", "acme/acme.test"), "acme", "acme.test", force=False)
    assert (sorted(active), standby) == (sorted(pending), sorted(first))
    assert w.signing() == {("acme.test", s) for s in pending}  # when the command returns
    assert {s: st for s, (st, _) in w.keys("acme.test").items()} == dict.fromkeys(first, "standby") | dict.fromkeys(
        pending, "active"
    )
    assert await d.retire(op("domain.dkim-retire", "acme/acme.test"), "acme", "acme.test") == 2
    wiped = w.store.conn.execute("SELECT COUNT(*) FROM dkim_keys WHERE state = 'retired' AND private_enc = X''")
    assert wiped.fetchone()[0] == 2
    published = {r["selector"] for r in await d.records("acme", "acme.test", HOST) if "selector" in r}
    assert published == set(pending)  # retired keys leave the records to publish
    await refused(
        w, Reason.INVALID, "has no standby keys to retire",
        d.retire(op("domain.dkim-retire", "acme/acme.test"), "acme", "acme.test"),
    )  # fmt: skip
    await refused(
        w, Reason.INVALID, "has no pending keys",
        d.activate(op("domain.dkim-activate", "acme/acme.test"), "acme", "acme.test", force=True),
    )  # fmt: skip


async def test_activate_forced_before_dns_shows_the_keys(world: World) -> None:
    w = world
    d = w.tenancy.domains
    await d.add(op("domain.add", "acme/acme.test"), "acme", "acme.test", DKIM)
    pending = await d.rotate(op("domain.dkim-rotate", "acme/acme.test"), "acme", "acme.test", DKIM)
    active, _ = await d.activate(op("domain.dkim-activate", "acme/acme.test"), "acme", "acme.test", force=True)
    assert sorted(active) == sorted(pending) and w.signing() == {("acme.test", s) for s in pending}


async def test_a_key_dns_shows_missing_stops_signing_when_the_check_returns(world: World) -> None:
    w = world
    d = w.tenancy.domains
    _, first = await d.add(op("domain.add", "acme/acme.test"), "acme", "acme.test", DKIM)
    await d.check(op("domain.check", "acme/acme.test"), "acme", "acme.test", HOST, lookup_saying("missing"))
    assert w.signing() == set()
    assert {dns for _, dns in w.keys("acme.test").values()} == {"missing"}
    # a lookup that failed ("lookup failed" is no DNS state) changes no key
    await d.check(op("domain.check", "acme/acme.test"), "acme", "acme.test", HOST, lookup_saying("differs"))
    assert {dns for _, dns in w.keys("acme.test").values()} == {"missing"}
    await d.check(op("domain.check", "acme/acme.test"), "acme", "acme.test", HOST, lookup_saying("published"))
    assert w.signing() == {("acme.test", s) for s in first}


async def test_another_tenants_domain_is_not_found_by_every_command(world: World) -> None:
    w = world
    d = w.tenancy.domains
    await d.add(op("domain.add", "beta/beta.test"), "beta", "beta.test", DKIM)
    await d.rotate(op("domain.dkim-rotate", "beta/beta.test"), "beta", "beta.test", DKIM)
    no = "tenant 'acme' has no domain 'beta.test'"
    o = op("x", "acme/beta.test")
    pem = _ed25519_pem()
    for call in (
        d.rotate(o, "acme", "beta.test", DKIM),
        d.activate(o, "acme", "beta.test", force=True),
        d.retire(o, "acme", "beta.test"),
        d.check(o, "acme", "beta.test", HOST, lookup_saying("published")),
        d.import_key(o, "acme", "beta.test", "imp1", pem),
    ):
        await refused(w, Reason.NOT_FOUND, no, call)
    with pytest.raises(Refused, match=no):
        await d.keys("acme", "beta.test")  # a read: refused, and no row (the door logs a refused read)


def _ed25519_pem() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


async def test_import_key(world: World) -> None:
    w = world
    d = w.tenancy.domains
    _, first = await d.add(op("domain.add", "acme/acme.test"), "acme", "acme.test", DKIM)
    ed_first = next(s for s in first if s.endswith("e"))
    algorithm, standby = await d.import_key(
        op("domain.import-key", "acme/acme.test IMP1"), "acme", "acme.test", "IMP1", _ed25519_pem()
    )
    assert (algorithm, standby) == ("ed25519-sha256", [ed_first])
    assert w.keys("acme.test")["imp1"][0] == "active" and w.keys("acme.test")[ed_first][0] == "standby"
    assert ("acme.test", "imp1") in w.signing() and ("acme.test", ed_first) not in w.signing()
    await refused(
        w, Reason.INVALID, "domain.import-key: DKIM private key is not a readable PEM",
        d.import_key(op("domain.import-key", "acme/acme.test imp2"), "acme", "acme.test", "imp2", b"not a key"),
    )  # fmt: skip
    await refused(
        w, Reason.CONFLICT, "already has a key with selector 'imp1'",
        d.import_key(op("domain.import-key", "acme/acme.test imp1"), "acme", "acme.test", "imp1", _ed25519_pem()),
    )  # fmt: skip


# -- the tenant purge's store part ---------------------------------------------------------------


async def test_purge_erases_the_tenant_and_the_directory_forgets_it_when_it_returns(world: World) -> None:
    w = world
    t = w.tenancy
    await t.domains.add(op("domain.add", "beta/beta.test"), "beta", "beta.test", DKIM)
    await t.domains.add(op("domain.add", "acme/acme.test"), "acme", "acme.test", DKIM)
    await t.accounts.suppression_add(op("suppression.add", "beta"), "beta", "gone@dst.test", "test")
    beta = w.store.tenant("beta")
    await refused(
        w, Reason.NOT_FOUND, "no tenant 'nosuch'", t.tenants.begin_purge(op("tenant.delete", "name=nosuch"), "nosuch")
    )
    marked = await t.tenants.begin_purge(op("tenant.delete", "name=beta"), "beta")
    assert marked == beta and await t.tenants.pending_purges() == [
        {"tenant_id": beta.id, "name": "beta", "actor": "root", "actor_uid": 0}
    ]
    purge_op = Op(
        actor="root", actor_uid=0, action="tenant.purge", target=f"tenant #{beta.id}", detail="sessions=0 messages=0"
    )
    counts = await t.tenants.purge(purge_op, beta)
    assert counts["domains"] == 1 and counts["dkim_keys"] == 2 and counts["suppressions"] == 1
    assert beta.id not in w.directory.snapshot.tenant_names  # when the command returns
    assert {d for d, _ in w.signing()} == {"acme.test"}
    assert not w.directory.suppressions.contains(beta.id, "gone@dst.test")
    assert await t.tenants.pending_purges() == [] and not await t.tenants.finish_erase()  # erased already
    action, target, result, tenant_id, detail = w.ops()[-1]
    assert (action, target, result, tenant_id) == ("tenant.purge", f"tenant #{beta.id}", "ok", None)
    assert detail.startswith("sessions=0 messages=0 ") and "dkim_keys=2" in detail


# -- what to publish (pure) ------------------------------------------------------------------------

KEYS = [
    {"selector": "new1", "algorithm": "rsa", "public_txt": "v=DKIM1; k=rsa; p=" + "A" * 400, "state": "pending"},
    {"selector": "cur1", "algorithm": "ed25519", "public_txt": "v=DKIM1; k=ed25519; p=B", "state": "active"},
    {"selector": "old1", "algorithm": "rsa", "public_txt": "v=DKIM1; k=rsa; p=C", "state": "standby"},
    {"selector": "gone", "algorithm": "rsa", "public_txt": "v=DKIM1; k=rsa; p=D", "state": "retired"},
]


def test_records_publish_every_key_but_retired_ones_and_suggest_spf_and_dmarc() -> None:
    recs = records("acme.test", KEYS, HOST)
    assert [(r["name"], r.get("selector")) for r in recs] == [
        ("new1._domainkey.acme.test", "new1"),
        ("cur1._domainkey.acme.test", "cur1"),
        ("old1._domainkey.acme.test", "old1"),
        ("acme.test", None),
        ("_dmarc.acme.test", None),
    ]
    assert recs[0]["strings"] == [KEYS[0]["public_txt"][:255], KEYS[0]["public_txt"][255:]]
    assert recs[3]["value"] == f"v=spf1 a:{HOST} ~all" and recs[4]["value"].startswith("v=DMARC1; p=none;")
    zone = zone_lines(recs)
    assert zone[0] == "; DKIM rsa key, pending"
    assert zone[1].startswith('new1._domainkey.acme.test. 3600 IN TXT ( "v=DKIM1; k=rsa; p=A') and zone[1].endswith(
        '" )'
    )
    assert zone[3] == 'cur1._domainkey.acme.test. 3600 IN TXT "v=DKIM1; k=ed25519; p=B"'


@pytest.mark.parametrize(
    ("statuses", "states"),
    [
        pytest.param(["published"] * 5, {"new1": "published", "cur1": "published", "old1": "published"}, id="all-seen"),
        pytest.param(
            ["missing", "mismatch", "published", "missing", "missing"],
            {"new1": "missing", "cur1": "mismatch", "old1": "published"},
            id="per-key",
        ),  # fmt: skip
        pytest.param(
            ["differs", "published", "missing", "published", "published"],
            {"cur1": "published", "old1": "missing"},
            id="no-answer-changes-nothing",
        ),  # fmt: skip
    ],
)
def test_dns_states(statuses: list[str], states: dict[str, str]) -> None:
    recs = records("acme.test", KEYS, HOST)
    assert dns_states(recs, [{"status": s} for s in statuses]) == states


@pytest.mark.parametrize(
    ("name", "normal"),
    [("Mail.ACME.test.", "mail.acme.test"), (" acme.test ", "acme.test"), ("not_a_domain", "not_a_domain")],
)
def test_domain_name(name: str, normal: str) -> None:
    assert domain_name(name) == normal
