"""The loop checks without a daemon: Received: counting and which next hops are cmcd itself."""

from __future__ import annotations

import pytest

from cmcd.config import Config
from cmcd.deliver.client import Reply, policy_enhanced
from cmcd.deliver.routing import Host, OwnListeners, Route, Router, is_local_address
from cmcd.submit import headers

RCVD = b"Received: from a by b; Thu, 3 Dec 2026 10:00:00 +0000\r\n"


@pytest.mark.parametrize(
    ("message", "count"),
    [
        (b"From: a@b\r\n\r\nbody\r\n", 0),
        (RCVD * 3 + b"From: a@b\r\n\r\nbody\r\n", 3),
        (b"received: from x\r\n\tby y; folded\r\nRECEIVED : z\r\nFrom: a@b\r\n\r\n", 2),
        (b"From: a@b\r\n\r\n" + RCVD * 5, 0),  # in the body: not a hop
        (b"X-Received: from x\r\nFrom: a@b\r\n\r\n", 0),
        (b"From: a@b\r\nSubject: Received: no\r\n\r\n", 0),
    ],
    ids=["none", "three", "case-and-folding", "in-the-body", "x-received", "in-a-value"],
)
def test_received_fields_are_counted_in_the_header_block_only(message: bytes, count: int) -> None:
    assert headers.count_received(message) == count
    assert headers.parse(message).received == count


@pytest.mark.parametrize(
    ("bound", "target", "own"),
    [
        (["127.0.0.1:2587"], ("127.0.0.1", 2587), True),
        (["127.0.0.1:2587"], ("127.0.0.1", 25), False),  # same host, another port: a local MTA
        (["127.0.0.1:2587"], ("127.0.0.2", 2587), False),
        (["0.0.0.0:2587"], ("127.0.0.2", 2587), True),  # every local address
        (["0.0.0.0:2587"], ("192.0.2.1", 2587), False),  # TEST-NET-1 is not on this host
        (["[::1]:2587"], ("::1", 2587), True),
        (["[::]:2587"], ("127.0.0.1", 2587), True),
    ],
    ids=["exact", "other-port", "other-address", "wildcard-local", "wildcard-remote", "ipv6", "v6-wildcard"],
)
def test_own_listeners(bound: list[str], target: tuple[str, int], own: bool) -> None:
    assert (target in OwnListeners(bound)) is own


def test_local_addresses() -> None:
    assert is_local_address("127.0.0.1") and is_local_address("::1")
    assert not is_local_address("192.0.2.1") and not is_local_address("0.0.0.0")


def _route(*addresses: tuple[str, int]) -> Route:
    return Route("site", tuple((Host(f"mx{i}.test", (a,), p),) for i, (a, p) in enumerate(addresses)))


def test_a_route_to_itself_only_bounces_and_a_mixed_route_keeps_the_others() -> None:
    router = Router(Config())
    router.set_own_listeners(["127.0.0.1:2587"])
    looped = router._without_self("loop.test", _route(("127.0.0.1", 2587)))
    assert not isinstance(looped, Route)
    assert looped.verdict == "bounced" and looped.enhanced == "5.4.6" and "loops back to myself" in looped.text
    mixed = router._without_self("mixed.test", _route(("127.0.0.1", 2587), ("127.0.0.3", 25)))
    assert isinstance(mixed, Route) and [h.addresses for g in mixed.groups for h in g] == [("127.0.0.3",)]
    plain = _route(("127.0.0.3", 25))
    assert router._without_self("plain.test", plain) is plain


@pytest.mark.parametrize(
    ("reply", "enhanced"),
    [(Reply(421, "4.3.2 bye"), "4.3.2"), (Reply(421, "bye"), ""), (Reply(421, "5.3.2 mismatch"), "")],
    ids=["matching", "none", "class-mismatch"],
)
def test_the_enhanced_code_of_a_closing_reply(reply: Reply, enhanced: str) -> None:
    assert policy_enhanced(reply) == enhanced


@pytest.mark.parametrize("name", ["acme\n", "acme\r", "ac\nme", " acme"], ids=["lf", "cr", "inside", "space"])
def test_a_tenant_or_login_name_with_a_newline_is_refused(name: str) -> None:
    """The one rule every door checks names with (tenancy.rules; the store no longer checks)."""
    from cmcd.tenancy import rules
    from cmcd.tenancy.refusals import Reason, Refused

    with pytest.raises(Refused) as tenant:
        rules.check_tenant_name(name)
    with pytest.raises(Refused) as login:
        rules.check_login(name.replace("acme", "alice"))
    assert (tenant.value.refusal.reason, login.value.refusal.reason) == (Reason.INVALID, Reason.INVALID)
    assert rules.check_tenant_name("acme") == "acme" and rules.check_login("alice") == "alice"
