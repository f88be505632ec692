"""The console's Domains and Blocks pages over real HTTPS, driven as a browser would drive them: the
DNS records of a domain as cmcctl prints them, a DNS check against a real DNS server on loopback,
the DKIM keys' states, another tenant's domain not found; the block list added to, listed, searched,
paged, downloaded as CSV and removed from; a viewer who reads but cannot change; and the operation
log naming the console user."""

from __future__ import annotations

import csv
import html
import io
import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Cmcd, wait_until
from tests.console_client import ConsoleClient, Reply
from tests.e2e.test_console import Person, World
from tests.peers import DnsServer


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, ca: Any, dns_server: DnsServer) -> Iterator[World]:
    d = Cmcd(
        tmp_path_factory.mktemp("console-domains"),
        ca,
        {"api": {"listen": "127.0.0.1:0"}, "dns": {"nameservers": [dns_server.address], "timeout": "2s"}},
    )
    d.start().provision()
    w = World(d, Person("acme", "", ""), Person("beta", "", ""))
    w.acme_admin = w.person("acme", "admin")
    w.beta_admin = w.person("beta", "admin")
    yield w
    d.stop()


def _text(reply: Reply) -> str:
    """The page's text without tags, for asserting on what a person reads."""
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", reply.text)))


def _by_id(reply: Reply, element_id: str) -> str:
    m = re.search(rf'<(\w+)[^>]* id="{re.escape(element_id)}"[^>]*>(.*?)</\1>', reply.text, re.S)
    assert m is not None, f"no element {element_id!r} on the page"
    return html.unescape(m.group(2))


def _csrf(b: ConsoleClient) -> str:
    return b.get("/").form("/logout").fields["csrf"]


def _ops(world: World, action: str, login: str) -> list[dict[str, Any]]:
    return [r for r in world.d.ops_log() if r["action"] == action and r["actor"].startswith(f"console:{login} (")]


# -- domains ----------------------------------------------------------------------------------------


def test_the_domain_page_shows_the_records_cmcctl_prints(world: World) -> None:
    b = world.signed_in(world.acme_admin)
    listing = b.get("/domains")
    assert listing.status == 200
    assert 'href="/domains/acme.test"' in listing.text and "beta.test" not in listing.text
    assert "cmcctl domain add" in _text(listing)  # adding a domain is the operator's

    page = b.get("/domains/acme.test")
    assert page.status == 200
    dns = world.d.admin("domain.dns", tenant="acme", domain="acme.test")
    records = dns["records"]
    assert {r["purpose"].split()[0] for r in records} == {"DKIM", "SPF", "DMARC"}
    for i, r in enumerate(records, start=1):
        assert _by_id(page, f"record-{i}-name") == r["name"]
        assert _by_id(page, f"record-{i}-value") == r["value"]
        for part in ("name", "value"):
            assert f'class="copy secondary" data-copy="record-{i}-{part}"' in page.text
    assert len(re.findall(r'id="record-\d+-value"', page.text)) == len(records)
    assert _by_id(page, "zone-lines") == "\n".join(dns["zone"])
    text = _text(page)
    assert "cmcctl domain dkim-rotate" in text and "Run a check now" in text
    for k in world.d.admin("domain.keys", tenant="acme", domain="acme.test"):
        row = re.search(rf"<tr>\s*<td><code>{k['selector']}</code></td>(.*?)</tr>", page.text, re.S)
        assert row is not None, k["selector"]
        cells = [html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", row.group(1))]
        assert cells[:3] == [k["algorithm"], k["state"], "not checked yet"]
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", cells[3])


def test_a_check_shows_what_dns_holds_record_by_record(world: World, dns_server: DnsServer) -> None:
    admin = world.person("acme", "admin")
    b = world.signed_in(admin)
    records = world.d.admin("domain.dns", tenant="acme", domain="acme.test")["records"]
    for r in records:  # everything but DMARC published, as an operator part way through would have it
        dns_server.remove(r["name"], "TXT")
        if not r["name"].startswith("_dmarc."):
            dns_server.add(r["name"], "TXT", " ".join(f'"{s}"' for s in r["strings"]))
    page = b.get("/domains/acme.test")
    got = b.submit(page, "/domains/acme.test/check")
    assert got.status == 200, got.text[:1000]
    found = dict(re.findall(r'<tr class="record-(\w+)">.*?<strong class="dns-(\w+)">', got.text, re.S))
    kinds = re.findall(r'<tr class="record-(\w+)">.*?<strong class="dns-(\w+)">(.*?)</strong>', got.text, re.S)
    assert len(kinds) == len(records)
    assert {kind for kind, status, _ in kinds if status == "published"} == {"dkim", "spf"}
    assert found["dmarc"] == "missing" and "no such name" in _text(got)  # the lookup's reason
    assert all(word == status for _, status, word in kinds)  # in English the word is the status
    keys = world.d.admin("domain.keys", tenant="acme", domain="acme.test")
    assert {k["dns_state"] for k in keys} == {"published"}  # the check is recorded, key by key
    again = b.get("/domains/acme.test").text
    assert "not checked yet" not in _text(b.get("/domains/acme.test")) and "published" in again
    # the last check is kept for every record, SPF and DMARC too, with its time
    last = dict(re.findall(r'<tr class="record-(spf|dmarc)">.*?</td>\s*<td>([^<]*)</td>\s*</tr>', again, re.S))
    assert last["spf"].startswith("published (") and last["dmarc"].startswith("missing ("), last
    rows = wait_until(lambda: _ops(world, "console.domains.check", admin.login), "the check in the operation log")
    assert rows[-1]["target"] == "acme.test" and rows[-1]["result"] == "ok"


def test_another_tenants_domain_is_not_found(world: World) -> None:
    b = world.signed_in(world.acme_admin)
    foreign, missing = b.get("/domains/beta.test"), b.get("/domains/nowhere.test")
    assert foreign.status == missing.status == 404
    assert _text(foreign) == _text(missing)  # nothing says beta.test exists
    checked = b.post("/domains/beta.test/check", {"csrf": _csrf(b)})
    assert checked.status == 404
    assert {k["dns_state"] for k in world.d.admin("domain.keys", tenant="beta", domain="beta.test")} == {"unchecked"}


# -- blocks -----------------------------------------------------------------------------------------


def _listed(world: World, tenant: str) -> set[str]:
    return {r["address"] for r in world.d.admin("suppression.list", tenant=tenant)}


def test_blocks_add_list_search_download_and_remove(world: World) -> None:
    admin = world.person("acme", "admin")
    b = world.signed_in(admin)
    world.d.admin("suppression.add", tenant="beta", address="betas-own@dst.test")
    page = b.get("/blocks")
    assert page.status == 200 and "betas-own@dst.test" not in page.text
    added = b.submit(page, "/blocks", address="gone.away@dst.test", reason="=asked us to stop")
    assert added.status == 303 and added.location == "/blocks?done=blocks_added"
    assert "gone.away@dst.test" in _listed(world, "acme")
    shown = b.get(added.location)
    assert "The address is blocked" in _text(shown)
    row = re.search(r'<td class="mono">gone\.away@dst\.test</td>\s*<td>(.*?)</td>\s*<td>(.*?)</td>', shown.text)
    assert row is not None
    assert html.unescape(row.group(1)) == "=asked us to stop"
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", row.group(2))
    again = b.submit(shown, "/blocks", address="gone.away@dst.test", reason="")
    assert again.location == "/blocks?done=blocks_listed"

    search = b.get("/blocks?address=GONE.AWAY@dst.test")
    assert "gone.away@dst.test" in search.text and len(re.findall(r'<td class="mono">', search.text)) == 1
    assert "That address is not on your block list" in _text(b.get("/blocks?address=nobody@dst.test"))

    download = b.get("/blocks.csv")
    assert download.status == 200 and download.headers["Content-Type"].startswith("text/csv")
    assert "attachment" in download.headers["Content-Disposition"]
    assert download.headers["X-Content-Type-Options"] == "nosniff"
    rows = list(csv.DictReader(io.StringIO(download.text)))
    mine = [r for r in rows if r["address"] == "gone.away@dst.test"]
    assert len(mine) == 1 and mine[0]["domain"] == "dst.test"
    assert mine[0]["reason"] == "'=asked us to stop"  # no spreadsheet runs it
    assert re.match(r"\d{4}-\d\d-\d\dT", mine[0]["created"])
    assert not any(r["address"] == "betas-own@dst.test" for r in rows)

    listing = b.get("/blocks")
    remove = [
        f for f in listing.forms() if f.action == "/blocks/delete" and f.fields["address"] == "gone.away@dst.test"
    ]
    assert len(remove) == 1 and 'data-confirm="Remove this address' in listing.text
    removed = b.post("/blocks/delete", remove[0].fields)
    assert removed.status == 303 and removed.location == "/blocks?done=blocks_removed"
    assert "gone.away@dst.test" not in _listed(world, "acme")
    assert "gone.away@dst.test" not in b.get("/blocks").text
    not_there = b.post("/blocks/delete", {"csrf": _csrf(b), "address": "gone.away@dst.test"})
    assert not_there.status == 404 and "not on your block list" in _text(not_there)

    adds = wait_until(lambda: _ops(world, "console.blocks.add", admin.login), "the adds in the operation log")
    assert [(r["target"], r["result"], r["detail"]) for r in adds] == [
        ("1 address", "ok", "added"),
        ("1 address", "ok", "already listed"),
    ]
    deletes = _ops(world, "console.blocks.delete", admin.login)
    assert [(r["target"], r["result"]) for r in deletes] == [("1 address", "ok"), ("1 address", "refused")]
    assert not any("gone.away" in (r["target"] + (r["detail"] or "")) for r in world.d.ops_log())


def test_a_bad_address_is_refused_on_the_page_and_changes_nothing(world: World) -> None:
    b = world.signed_in(world.acme_admin)
    before = _listed(world, "acme")
    got = b.submit(b.get("/blocks"), "/blocks", address="not an address", reason="typo")
    assert got.status == 400
    error = re.search(r'<p class="error" role="alert" id="blocks-error">(.*?)</p>', got.text, re.S)
    assert error is not None and html.unescape(error.group(1)).startswith("address:")
    assert got.form("/blocks").fields["address"] == "not an address"  # what was typed, to correct
    assert _listed(world, "acme") == before


def test_a_viewer_reads_but_cannot_change(world: World) -> None:
    world.d.admin("suppression.add", tenant="acme", address="kept@dst.test")
    viewer = world.person("acme", "viewer")
    b = world.signed_in(viewer)
    page = b.get("/blocks")
    assert page.status == 200 and "kept@dst.test" in page.text
    assert {f.action for f in page.forms() if f.method == "post"} == {"/logout"}  # no add, no remove
    token = _csrf(b)
    assert b.post("/blocks", {"csrf": token, "address": "new@dst.test", "reason": "x"}).status == 403
    assert b.post("/blocks/delete", {"csrf": token, "address": "kept@dst.test"}).status == 403
    listed = _listed(world, "acme")
    assert "kept@dst.test" in listed and "new@dst.test" not in listed
    assert b.get("/blocks.csv").status == 200
    domain = b.get("/domains/acme.test")
    assert domain.status == 200 and "/domains/acme.test/check" not in domain.text
    assert b.post("/domains/acme.test/check", {"csrf": token}).status == 403
    assert not _ops(world, "console.blocks.add", viewer.login)


def test_the_block_list_pages_and_the_csv_holds_every_page(world: World) -> None:
    world.d.admin("tenant.add", name="gamma")
    for i in range(53):
        world.d.admin("suppression.add", tenant="gamma", address=f"r{i:02d}@dst.test")
    b = world.signed_in(world.person("gamma", "admin"))
    first = b.get("/blocks")
    shown = re.findall(r'<td class="mono">(.*?)</td>', first.text)
    assert len(shown) == 50
    link = re.search(r'<a href="([^"]+)" rel="next">', first.text)
    assert link is not None
    second = b.get(html.unescape(link.group(1)))
    rest = re.findall(r'<td class="mono">(.*?)</td>', second.text)
    assert len(rest) == 3 and 'rel="next"' not in second.text
    assert set(shown) | set(rest) == {f"r{i:02d}@dst.test" for i in range(53)}
    assert b.get("/blocks?after=not-a-cursor").status == 400
    rows = list(csv.DictReader(io.StringIO(b.get("/blocks.csv").text)))
    assert [r["address"] for r in rows] == [f"r{i:02d}@dst.test" for i in range(53)]
