"""The limits every door shares (cmcd/doors.py): the descriptor rule, connection caps, the data budget."""

from __future__ import annotations

import pytest

from cmcd import config
from cmcd.doors import FD_RESERVE, JSON_BODY_WEIGHT, DataBudget, Door, listener_caps


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
