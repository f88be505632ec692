"""The webhook tenancy commands against a real store in tmp_path: add (events, the SSRF guard with
the tenant's and the operator's words for a refused URL, the per-tenant cap, the "ok" row naming
what was made) and delete, each with its one operation-log row; no daemon, no sockets but a DNS
query to a closed loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dns.asyncresolver
import dns.nameserver
import pytest

from cmcd.config import ApiConfig, Config
from cmcd.store import AsyncStore
from cmcd.store.webhook_store import MAX_PER_TENANT, WEBHOOK_EVENTS
from cmcd.tenancy import Op, Tenancy
from cmcd.tenancy.refusals import Reason, Refused
from cmcd.tenancy.webhook_urls import HOST_NOT_PUBLIC, SECRET_PREFIX
from cmcd.tenancy.webhooks import UrlRefused, parse_webhook_id
from tests.unit.tenancy_parts import open_tenancy

PUBLIC_URL = "https://192.0.2.10/hook"  # TEST-NET-1: "private" to the guard, so allow_private is on


class World:
    def __init__(self, tenancy: Tenancy, astore: AsyncStore, resolver: dns.asyncresolver.Resolver):
        self.tenancy, self.astore, self.resolver = tenancy, astore, resolver
        self.store = astore.store

    def ops(self) -> list[tuple[str, str, str, str]]:
        return self.store.conn.execute("SELECT action, target, result, detail FROM ops_log ORDER BY id").fetchall()

    def version(self) -> int:
        return self.store.directory_state()[0]

    async def add(self, url: str = PUBLIC_URL, events: Any = None, tenant: str = "acme") -> tuple[dict[str, Any], str]:
        return await self.tenancy.webhooks.add(_op("webhook.add"), tenant, url, events, self.resolver)


def _op(action: str, target: str = "t", **kw: Any) -> Op:
    return Op(actor="test", action=action, target=target, **kw)


def _nowhere() -> dns.asyncresolver.Resolver:
    """A resolver whose one name server is a closed loopback port: every lookup fails at once."""
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", 9)]
    resolver.lifetime = resolver.timeout = 2.0
    return resolver


async def _world(tmp_path: Path, allow_private: bool) -> AsyncIterator[World]:
    config = Config(api=ApiConfig(webhook_allow_private=allow_private))
    async with open_tenancy(tmp_path, config) as tenancy:
        for tenant in ("acme", "beta"):
            tenancy.core.store.tenant_add(tenant)
        yield World(tenancy, tenancy.core.astore, _nowhere())


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async for w in _world(tmp_path, allow_private=True):
        yield w


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[World]:
    async for w in _world(tmp_path, allow_private=False):
        yield w


async def test_add_makes_the_endpoint_its_secret_and_one_ok_row(world: World) -> None:
    before = world.version()
    op = _op("api.webhooks.add", "-", ok_row=lambda row: (f"webhook={row['id']}", ",".join(row["events"])))
    row, secret = await world.tenancy.webhooks.add(op, "acme", PUBLIC_URL, ["Bounced", "delivered"], world.resolver)
    assert row["tenant"] == "acme" and row["url"] == PUBLIC_URL and row["events"] == ["delivered", "bounced"]
    assert secret.startswith(SECRET_PREFIX) and len(secret) == len(SECRET_PREFIX) + 64
    assert "secret" not in row
    assert world.ops() == [("api.webhooks.add", f"webhook={row['id']}", "ok", "delivered,bounced")]
    assert world.version() == before + 1
    assert world.store.webhook("acme", row["id"])["id"] == row["id"]
    endpoint = next(w for w in world.store.webhook_endpoints() if w.id == row["id"])
    assert endpoint.secret == secret.encode()  # the dispatcher signs with what was shown


async def test_events_default_to_all_and_take_the_admin_sockets_spelling(world: World) -> None:
    assert (await world.add(events=None))[0]["events"] == list(WEBHOOK_EVENTS)
    assert (await world.add(events="expired, Suppressed"))[0]["events"] == ["expired", "suppressed"]


@pytest.mark.parametrize(
    ("events", "text"),
    [(["delivered", "opened"], "unknown webhook event 'opened'"), ([], "at least one"), (",", "at least one")],
    ids=["unknown", "empty-list", "empty-text"],
)
async def test_bad_events_are_refused_and_logged(world: World, events: Any, text: str) -> None:
    with pytest.raises(Refused, match=text) as caught:
        await world.add(events=events)
    assert caught.value.refusal.reason is Reason.INVALID and caught.value.refusal.field == "events"
    assert world.store.webhooks("acme") == []
    assert [(a, r) for a, _, r, _ in world.ops()] == [("webhook.add", "refused")]


@pytest.mark.parametrize(
    ("url", "operator", "tenant"),
    [
        ("http://127.0.0.1:8080/hook", "127.0.0.1 is a loopback address; set api.webhook_allow_private", None),
        ("https://[fd00::1]/", "fd00::1 is a private address", None),
        ("https://hooks.example.test/", "host hooks.example.test has no address: the DNS lookup failed", None),
        ("ftp://192.0.2.10/", "must start with https:// or http://", "ftp://"),
        ("https://user:pw@192.0.2.10/", "must not carry a user name or password", "user name"),
        ("https:///hook", "needs a host name or IP address", "needs a host"),
    ],
    ids=["loopback", "private-v6", "unresolvable-name", "scheme", "userinfo", "no-host"],
)
async def test_refused_urls_tell_the_tenant_less_than_the_operator(
    guarded: World, url: str, operator: str, tenant: str | None
) -> None:
    """What the guard learned about a host's addresses is the operator's (the refusal's text, the
    operation log); the tenant's words (UrlRefused.public) say only that the host is not public.
    A problem with the URL's form is told as it is."""
    with pytest.raises(UrlRefused) as caught:
        await guarded.add(url=url)
    refused = caught.value
    assert operator in refused.refusal.text and refused.refusal.field == "url"
    assert refused.refusal.reason is Reason.INVALID and refused.public.reason is Reason.INVALID
    assert refused.public.field == "url"
    if tenant is None:
        assert refused.public.text == HOST_NOT_PUBLIC
    else:
        assert tenant in refused.public.text and refused.public.text == refused.refusal.text
    assert guarded.store.webhooks("acme") == []
    (row,) = guarded.ops()
    assert row[2] == "refused" and operator in row[3]


async def test_allow_private_takes_a_private_literal(world: World) -> None:
    row, _ = await world.add(url="http://127.0.0.1:8080/hook")
    assert row["url"] == "http://127.0.0.1:8080/hook"


async def test_an_unknown_tenant_is_refused_before_any_dns_lookup(guarded: World) -> None:
    """The name would fail to resolve (a URL refusal): NOT_FOUND shows the tenant came first."""
    with pytest.raises(Refused, match="no tenant 'nobody'") as caught:
        await guarded.add(url="https://hooks.example.test/", tenant="nobody")
    assert caught.value.refusal.reason is Reason.NOT_FOUND and not isinstance(caught.value, UrlRefused)
    assert [r for _, _, r, _ in guarded.ops()] == ["refused"]


async def test_a_tenant_has_at_most_the_cap_and_the_refusal_is_a_conflict(world: World) -> None:
    for n in range(MAX_PER_TENANT):
        await world.add(url=f"{PUBLIC_URL}/{n}")
    version = world.version()
    with pytest.raises(Refused, match=f"tenant 'acme' has {MAX_PER_TENANT} webhooks, the most allowed") as caught:
        await world.add(url=f"{PUBLIC_URL}/more")
    assert caught.value.refusal.reason is Reason.CONFLICT
    assert len(world.store.webhooks("acme")) == MAX_PER_TENANT and world.version() == version
    assert world.ops()[-1][2] == "refused"
    assert (await world.add(tenant="beta"))[0]["tenant"] == "beta"  # the cap is per tenant


async def test_delete_takes_an_id_or_its_digits_and_is_scoped_to_the_tenant(world: World) -> None:
    first, _ = await world.add()
    second, _ = await world.add()
    with pytest.raises(Refused) as caught:
        await world.tenancy.webhooks.delete(_op("webhook.delete"), "beta", first["id"])  # acme's
    assert caught.value.refusal.reason is Reason.NOT_FOUND
    assert await world.tenancy.webhooks.delete(_op("webhook.delete"), "acme", first["id"]) == first["id"]
    assert await world.tenancy.webhooks.delete(_op("webhook.delete"), "acme", f"000{second['id']}") == second["id"]
    assert world.store.webhooks("acme") == []
    with pytest.raises(Refused, match=f"tenant 'acme' has no webhook {first['id']}"):
        await world.tenancy.webhooks.delete(_op("webhook.delete"), "acme", first["id"])
    results = [r for a, _, r, _ in world.ops() if a == "webhook.delete"]
    assert results == ["refused", "ok", "ok", "refused"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (7, 7),
        ("7", 7),
        ("0007", 7),
        (2**63 - 1, 2**63 - 1),
        (0, None),
        (-3, None),
        ("", None),
        ("abc", None),
        ("1e3", None),
        ("\u00b2", None),  # str.isdigit() takes a superscript two
        (str(2**63), None),
        ("9" * 40, None),
        (True, None),
    ],
    ids=lambda v: repr(v)[:12],
)
def test_parse_webhook_id(value: Any, expected: int | None) -> None:
    if expected is not None:
        assert parse_webhook_id("acme", value) == expected
    else:
        with pytest.raises(Refused) as caught:
            parse_webhook_id("acme", value)
        assert caught.value.refusal.reason is Reason.NOT_FOUND and len(caught.value.refusal.text) < 60
