"""The limits every door shares (cmcd/doors.py): the descriptor rule, connection caps, the data budget."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from cmcd import config, policy
from cmcd.doors import (
    FD_RESERVE,
    JSON_BODY_WEIGHT,
    JSON_NODE_BYTES,
    DataBudget,
    Door,
    json_node_cap,
    json_nodes,
    listener_caps,
)
from cmcd.smtp.context import SessionRegistry
from cmcd.submit.auth import throttle_key


@pytest.mark.parametrize(
    ("soft", "open_at_start", "api_max", "metrics_max", "expected"),
    [
        pytest.param(1 << 20, 40, 1000, 16, (1000, 16), id="plenty: the configured caps"),
        pytest.param(1024, 40, 1000, 16, (230, 16), id="systemd default soft limit: a quarter of what is left"),
        pytest.param(256, 24, 1000, 16, (42, 5), id="the slowloris test's limit"),
        pytest.param(64, 40, 1000, 16, (1, 1), id="nothing left: still one, never zero"),
    ],
)
def test_listener_caps_leave_the_rest_to_smtp_delivery_and_admin(
    soft: int, open_at_start: int, api_max: int, metrics_max: int, expected: tuple[int, int]
) -> None:
    api, metrics = listener_caps(soft, open_at_start, api_max, metrics_max)
    assert (api, metrics) == expected
    spare = max(0, soft - open_at_start - FD_RESERVE)
    assert api + metrics <= max(2, spare * (1 / 4 + 1 / 32))


def test_door_caps_in_all_and_per_ip_and_counts_refusals() -> None:
    door = Door("api", max_total=3, max_per_ip=2)
    assert door.admit("10.0.0.1") is None and door.admit("10.0.0.1") is None
    assert door.admit("10.0.0.1") == "max_connections_per_ip"
    assert door.admit("10.0.0.2") is None
    assert door.admit("10.0.0.3") == "max_connections"
    door.release("10.0.0.1")
    assert door.admit("10.0.0.3") is None
    assert door.refused == {"max_connections": 1, "max_connections_per_ip": 1, "descriptors": 0}
    for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        door.release(ip)
    assert door.open == 0 and door.per_ip == {}


def test_data_budget_is_shared_room() -> None:
    budget = DataBudget(100)
    assert budget.room_for(100) and not budget.room_for(101)
    budget.hold(60)  # SMTP DATA
    assert not budget.room_for(41) and not budget.over()
    budget.hold(50)  # DATA keeps being read past the limit until the session notices
    assert budget.over()
    budget.release(110)
    assert budget.held_bytes == 0


def test_api_request_limit_follows_the_message_size_unless_set() -> None:
    tls = {"tls_cert": "c", "tls_key": "k"}
    derived = config.from_dict({"smtp": {**tls, "max_message_size": "3MB"}})
    assert derived.api_max_request_bytes() == 3 * 1024**2 * 4 // 3 + config.REQUEST_MARGIN
    assert config.from_dict({"api": {"max_request_size": "5MB"}, "smtp": tls}).api_max_request_bytes() == 5 * 1024**2


def test_api_on_needs_a_budget_that_holds_one_largest_request() -> None:
    data = {"api": {"listen": "127.0.0.1:8443", "max_request_size": "4MB"}, "smtp": {"tls_cert": "c", "tls_key": "k"}}
    data["smtp"]["max_data_in_flight"] = f"{4 * JSON_BODY_WEIGHT}MB"
    config.from_dict(data)
    data["smtp"]["max_data_in_flight"] = "8MB"
    with pytest.raises(Exception, match="smtp.max_data_in_flight"):
        config.from_dict(data)


# -- per client: IPv6 by /64 (issue 21, review item 7) ---------------------------------------------


@pytest.mark.parametrize(
    ("ip", "group"),
    [
        pytest.param("192.0.2.7", "192.0.2.7", id="IPv4: the address"),
        pytest.param("2001:db8:1:2::1", "2001:db8:1:2::/64", id="IPv6: its /64"),
        pytest.param("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64", id="IPv6: the same /64"),
        pytest.param("2001:db8:1:3::1", "2001:db8:1:3::/64", id="IPv6: the next /64 is another client"),
        pytest.param("::ffff:192.0.2.7", "192.0.2.7", id="IPv4-mapped: the IPv4 address, not ::ffff:0:0/64"),
        pytest.param("fe80::1%eth0", "fe80::/64", id="IPv6 with a zone"),
        pytest.param("not:an:address", "not:an:address", id="unparsable: as given"),
    ],
)
def test_client_group(ip: str, group: str) -> None:
    assert policy.client_group(ip) == group
    assert throttle_key(ip) == group  # auth throttling counts the same clients


def test_door_per_ip_cap_counts_an_ipv6_64_as_one_client() -> None:
    door = Door("api", max_total=100, max_per_ip=2)
    assert door.admit("2001:db8::1") is None
    assert door.admit("2001:db8::2") is None
    assert door.admit("2001:db8::ffff:3") == "max_connections_per_ip"
    assert door.admit("2001:db8:0:1::1") is None  # another /64
    door.release("2001:db8::2")
    assert door.admit("2001:db8::9") is None  # released by group, not by exact address
    for ip in ("2001:db8::1", "2001:db8::9", "2001:db8:0:1::1"):
        door.release(ip)
    assert door.open == 0 and door.per_ip == {}


class _Peer:
    def __init__(self, client_ip: str):
        self.client_ip = client_ip


def test_smtp_registry_per_ip_cap_counts_an_ipv6_64_as_one_client() -> None:
    reg = SessionRegistry(max_total=100, max_per_ip=1)
    first, second, other = (_Peer(ip) for ip in ("2001:db8::1", "2001:db8::2", "2001:db8:1::1"))
    assert reg.admit(first) is None
    assert (reg.admit(second) or "").startswith("421 4.7.0")
    assert reg.admit(other) is None
    reg.release(first)
    assert reg.admit(second) is None


# -- a body's total time (review items 2 and 3) ------------------------------------------------------


@pytest.mark.parametrize(
    ("received", "rate", "grace", "after"),
    [
        pytest.param(0, 1024, 10.0, 10.0, id="nothing yet: the grace"),
        pytest.param(5, 1024, 10.0, 10.0, id="a trickle: still the grace, then cut"),
        pytest.param(1024 * 60, 1024, 10.0, 60.0, id="fast so far: until its bytes are used up at the rate"),
        pytest.param(100, 0, 10.0, None, id="rate 0: never"),
    ],
)
def test_slow_after_s(received: int, rate: int, grace: float, after: float | None) -> None:
    assert policy.slow_after_s(received, rate, grace) == after
    if after is not None:  # consistent with too_slow: just before not, just after yes
        assert not policy.too_slow(received, after - 0.01, rate, grace)
        assert policy.too_slow(received, after + 0.01, rate, grace)


# -- JSON that expands (review item 1) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "nodes"),
    [
        pytest.param(b'{"text": "' + b"a" * 10_000 + b'"}', 2, id="a long string: one object, one value"),
        pytest.param(b"[" + b",".join([b"{}"] * 1000) + b"]", 2000, id="empty objects: one per '{' and ','"),
        pytest.param(b"[" + b",".join([b"0"] * 1000) + b"]", 1000, id="numbers: the '[' and each ','"),
        pytest.param(b'{"a": ",,,[{:"}', 2, id="marks inside a string do not count"),
        pytest.param(b'{"a": "\\",,,"}', 2, id="an escaped quote does not end the string"),
        pytest.param(b'["a\\\\", {}, []]', 5, id="an escaped backslash does"),
        pytest.param(b'["open, , ,', 1, id="a string left open runs to the end"),
    ],
)
def test_json_nodes(raw: bytes, nodes: int) -> None:
    assert json_nodes(raw, cap=nodes) == nodes  # exact, whether the quick count was or not
    assert json_nodes(raw, cap=nodes - 1) == nodes  # past the cap: cap + 1
    assert json_nodes(raw, cap=10**9) >= nodes  # well under the cap: the quick upper bound


def test_json_nodes_bounds_what_the_parser_builds() -> None:
    """Whatever the shape, json.loads builds at most JSON_NODE_BYTES per counted node (tracemalloc)."""
    shapes = [
        b"[" + b",".join([b"{}"] * 20_000) + b"]",
        b"[" + b",".join([b"[[0]]"] * 20_000) + b"]",
        b"[" + b",".join([b'{"a":"%06d"}' % i for i in range(20_000)]) + b"]",
        b"{" + b",".join([b'"%d":0' % i for i in range(20_000)]) + b"}",
        b"[" + b",".join([b'"%d"' % i for i in range(20_000)]) + b"]",
    ]
    for raw in shapes:
        tracemalloc.start()
        try:
            parsed = json.loads(raw)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        del parsed
        assert peak <= json_nodes(raw, cap=10**9) * JSON_NODE_BYTES, (raw[:20], peak)


def test_json_node_cap_fits_the_largest_bulk_request() -> None:
    cap = json_node_cap(1000, 100, 50)
    assert cap == 317_024
    entry = b'{"to":[' + b",".join([b'"u%d@example.com"' % i for i in range(100)]) + b'],"merge":{'
    entry += b",".join([b'"k%d":"v"' % i for i in range(50)]) + b"}}"
    bulk = b'{"from":"a@b.test","subject":"s","text":"t","recipients":[' + b",".join([entry] * 1000) + b"]}"
    assert json_nodes(bulk, cap) <= cap
