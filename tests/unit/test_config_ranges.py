"""Values that parse but make no sense are refused with their dotted path."""

from __future__ import annotations

from typing import Any

import pytest

from cmcd import config
from cmcd.errors import ConfigError

TLS = {"tls_cert": "c.pem", "tls_key": "k.pem"}


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"smtp": {"command_timeout": float("inf")}}, "smtp.command_timeout"),
        ({"smtp": {"data_timeout": float("nan")}}, "smtp.data_timeout"),
        ({"smtp": {"command_timeout": 0}}, "smtp.command_timeout"),
        ({"smtp": {"max_recipients": 0}}, "smtp.max_recipients"),
        ({"smtp": {"max_message_size": 0}}, "smtp.max_message_size"),
        ({"smtp": {"max_message_size": "3GB"}}, "smtp.max_message_size"),
        ({"smtp": {"messages_per_second": float("inf")}}, "smtp.messages_per_second"),
        ({"server": {"hostname": "mail\r\nX-Injected: yes"}}, "server.hostname"),
        ({"server": {"hostname": "mäil.example"}}, "server.hostname"),
        ({"delivery": {"port": 0}}, "delivery.port"),
    ],
    ids=[
        "inf-timeout",
        "nan-timeout",
        "zero-timeout",
        "zero-recipients",
        "zero-size",
        "size-over-sqlite-blob",
        "inf-rate",
        "crlf-hostname",
        "non-ascii-hostname",
        "port-zero",
    ],  # fmt: skip
)
def test_out_of_range_values_are_refused(data: dict[str, Any], path: str) -> None:
    merged = {**data, "smtp": {**TLS, **data.get("smtp", {})}}
    with pytest.raises(ConfigError) as err:
        config.from_dict(merged)
    assert [p for p in err.value.problems if p.startswith(path + ": expected")], err.value.problems


def test_a_bad_nameserver_is_reported_not_a_crash() -> None:
    with pytest.raises(ConfigError) as err:
        config.from_dict({"smtp": TLS, "dns": {"nameservers": ["bad"]}})
    assert err.value.problems == ["dns.nameservers[0]: expected an address like \"127.0.0.1:2587\", got 'bad'"]
