"""Config parsing tables: sizes, durations, rates, addresses, and from_dict/load errors with their dotted paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cmcd import config
from cmcd.config import SendingLimits
from cmcd.errors import ConfigError

TLS = {"tls_cert": "cert.pem", "tls_key": "key.pem"}


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        config.from_dict(data)
    return err.value.problems


# -- sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("25MB", 25 * 1024**2),
        ("25mb", 25 * 1024**2),
        ("25M", 25 * 1024**2),
        ("10KB", 10 * 1024),
        ("1.5KB", 1536),
        ("2GB", 2 * 1024**3),
        ("512B", 512),
        ("512", 512),
        (" 7 MB ", 7 * 1024**2),
        (4096, 4096),
        (0, 0),
    ],
    ids=["MB", "mb-lowercase", "M", "KB", "fractional-KB", "GB", "B", "bare-digits", "spaces", "int", "zero"],
)
def test_parse_size_accepts(value: Any, expected: int) -> None:
    assert config.parse_size(value) == expected


@pytest.mark.parametrize(
    "value",
    ["lots", "", "25XB", "-1MB", "MB", "25 M B", -1, 1.5, True, None, [25]],
    ids=[
        "word",
        "empty",
        "unknown-unit",
        "negative-string",
        "unit-only",
        "split-unit",
        "negative-int",
        "float",
        "bool",
        "none",
        "list",
    ],
)
def test_parse_size_refuses(value: Any) -> None:
    with pytest.raises(ValueError):
        config.parse_size(value)


# -- durations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("90s", 90.0),
        ("5d", 432000.0),
        ("1.5h", 5400.0),
        ("10m", 600.0),
        ("250ms", 0.25),
        ("2w", 1209600.0),
        ("30", 30.0),
        (" 5 d ", 432000.0),
        (30, 30.0),
        (0.5, 0.5),
        (0, 0.0),
    ],
    ids=[
        "seconds",
        "days",
        "fractional-hours",
        "minutes",
        "milliseconds",
        "weeks",
        "bare-digits",
        "spaces",
        "int",
        "float",
        "zero",
    ],
)
def test_parse_duration_accepts(value: Any, expected: float) -> None:
    assert config.parse_duration(value) == pytest.approx(expected)
    assert isinstance(config.parse_duration(value), float)


@pytest.mark.parametrize(
    "value",
    ["soon", "", "5y", "5D", "-5s", "s", "1h30m", -1, True, None],
    ids=[
        "word",
        "empty",
        "years",
        "uppercase-unit",
        "negative",
        "unit-only",
        "compound",
        "negative-int",
        "bool",
        "none",
    ],
)
def test_parse_duration_refuses(value: Any) -> None:
    with pytest.raises(ValueError):
        config.parse_duration(value)


# -- rates and addresses -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", (0.0, 0.0)), (None, (0.0, 0.0)), ("50/s", (50.0, 1.0)), ("600/m", (600.0, 60.0)), ("10/5m", (10.0, 300.0))],
    ids=["empty-unlimited", "none-unlimited", "per-second", "per-minute", "per-five-minutes"],
)
def test_parse_rate_accepts(value: Any, expected: tuple[float, float]) -> None:
    assert config.parse_rate(value) == expected


@pytest.mark.parametrize(
    "value", ["50", "0/s", "x/s", "5/soon", 5], ids=["no-slash", "zero-count", "word-count", "bad-unit", "int"]
)
def test_parse_rate_refuses(value: Any) -> None:
    with pytest.raises(ValueError):
        config.parse_rate(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("127.0.0.1:2587", ("127.0.0.1", 2587)), ("[::1]:25", ("::1", 25)), ("mx.test:0", ("mx.test", 0))],
    ids=["ipv4", "ipv6-bracketed", "name-port-zero"],
)
def test_split_hostport_accepts(value: str, expected: tuple[str, int]) -> None:
    assert config.split_hostport(value) == expected


@pytest.mark.parametrize(
    "value",
    ["127.0.0.1", ":25", "host:", "host:http", "host:65536", "[::1]25"],
    ids=["no-port", "no-host", "empty-port", "named-port", "port-too-big", "ipv6-no-colon"],
)
def test_split_hostport_refuses(value: str) -> None:
    with pytest.raises(ValueError):
        config.split_hostport(value)


# -- from_dict ---------------------------------------------------------------------------------


def test_defaults_and_converted_types() -> None:
    cfg = config.from_dict({"smtp": {**TLS, "max_message_size": "10KB", "data_timeout": "2m"}}, base_dir="/srv")
    assert cfg.smtp.max_message_size == 10 * 1024 and isinstance(cfg.smtp.max_message_size, config.Size)
    assert cfg.smtp.data_timeout == 120.0 and isinstance(cfg.smtp.data_timeout, config.Duration)
    assert cfg.smtp.max_recipients == 100
    assert cfg.backup.interval == 3600.0
    assert cfg.base_dir == "/srv"
    assert cfg.path("var/spool") == Path("/srv/var/spool")
    assert cfg.path("/abs/x") == Path("/abs/x")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"smtp": {"max_message_size": "lots"}},
            ["smtp.max_message_size: expected a size like \"25MB\", got 'lots'"],
        ),
        ({"smtp": {"max_recipients": "lots"}}, ["smtp.max_recipients: expected an integer, got 'lots'"]),
        ({"smtp": {"max_recipients": -1}}, ["smtp.max_recipients: expected an integer, got -1"]),
        ({"smtp": {"max_recipients": True}}, ["smtp.max_recipients: expected an integer, got True"]),
        (
            {"backup": {"interval": "soon"}},
            ['backup.interval: expected a duration like "90s" or "5d", got \'soon\''],
        ),
        ({"smtp": {"bare_newlines": "strip"}}, ["smtp.bare_newlines: expected one of normalize, reject, got 'strip'"]),
        (
            {"smtp": 5},
            [
                "smtp: expected a table, got 5",
                "smtp.tls_cert: expected a certificate path (AUTH is only offered over TLS)",
            ],
        ),
        (
            {"smtp": {"listen": "127.0.0.1:25"}},
            ["smtp.listen: expected a list of an address like \"127.0.0.1:2587\", got '127.0.0.1:25'"],
        ),
        (
            {"smtp": {"listen": ["127.0.0.1:25", "nope"]}},
            ["smtp.listen[1]: expected an address like \"127.0.0.1:2587\", got 'nope'"],
        ),
        (
            {"delivery": {"routes": {"example.com": "bad"}}},
            ['delivery.routes."example.com": expected an address like "127.0.0.1:2587", got \'bad\''],
        ),
        (
            {"server": {"timezone": "Mars/Olympus"}},
            ["server.timezone: expected an IANA time zone like \"Asia/Tokyo\", got 'Mars/Olympus'"],
        ),
        (
            {"dns": {"nameservers": ["ns.test:53"]}},
            ["dns.nameservers[0]: expected an IP address with port, got 'ns.test:53'"],
        ),
        (
            {"server": {"operator_address": "ops at example"}},
            ["server.operator_address: expected an address like \"ops@example.com\", got 'ops at example'"],
        ),
    ],
    ids=[
        "size-word",
        "int-word",
        "int-negative",
        "int-bool",
        "duration-word",
        "choice",
        "section-not-table",
        "list-not-list",
        "list-item",
        "routes-value",
        "timezone",
        "nameserver-not-ip",
        "operator-address",
    ],
)
def test_bad_values_name_the_dotted_path_and_what_was_expected(data: dict[str, Any], expected: list[str]) -> None:
    smtp = data.get("smtp", {})
    with_tls = {**data, "smtp": {**TLS, **smtp} if isinstance(smtp, dict) else smtp}  # so only the case's problem shows
    assert problems(with_tls) == expected


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"smtp": {"max_mesage_size": "25MB"}}, "smtp.max_mesage_size"),
        ({"bogus": {}}, "bogus"),
        ({"smtp": {"tenant_limits": {"acme": {"messages_per_dy": 5}}}}, 'smtp.tenant_limits."acme".messages_per_dy'),
        ({"store": {"path": "x", "kee_file": "y"}}, "store.kee_file"),
    ],
    ids=["smtp-typo", "unknown-section", "nested-tenant-limit-typo", "store-typo"],
)
def test_unknown_keys_are_refused_with_the_known_keys(data: dict[str, Any], path: str) -> None:
    (problem,) = problems({**data, "smtp": {**TLS, **data.get("smtp", {})}})
    assert problem.startswith(f"{path}: unknown key (known keys: ")


def test_all_field_problems_are_reported_together() -> None:
    got = problems(
        {
            "smtp": {**TLS, "max_mesage_size": "25MB", "max_recipients": "lots"},
            "backup": {"interval": "soon"},
            "retention": {"mail_log_days": "forever"},
        }
    )
    assert [p.split(":", 1)[0] for p in got] == [
        "smtp.max_mesage_size",
        "smtp.max_recipients",
        "backup.interval",
        "retention.mail_log_days",
    ]


def test_whole_file_checks_are_reported_with_field_problems() -> None:
    """config.py's contract: "all problems in a file are reported together so an operator fixes them in
    one pass". A typo must not hide a bad time zone or a missing certificate until the next run."""
    got = problems({"smtp": {"max_mesage_size": "25MB"}, "server": {"timezone": "Mars/Olympus"}})
    paths = [p.split(":", 1)[0] for p in got]
    assert paths == ["smtp.max_mesage_size", "server.timezone", "smtp.tls_cert"]


def test_listeners_without_a_certificate_are_refused() -> None:
    assert problems({}) == ["smtp.tls_cert: expected a certificate path (AUTH is only offered over TLS)"]
    assert config.from_dict({"smtp": {"listen": [], "listen_tls": []}}).smtp.listen == ()


# -- tenant limits -----------------------------------------------------------------------------


DEFAULTS = {"messages_per_second": 2.0, "messages_per_day": 100}


@pytest.mark.parametrize(
    ("override", "tenant", "expected"),
    [
        ({}, "acme", SendingLimits(2.0, 100)),
        ({"acme": {"messages_per_second": 5, "messages_per_day": 7}}, "acme", SendingLimits(5.0, 7)),
        ({"acme": {"messages_per_second": 5, "messages_per_day": 7}}, "beta", SendingLimits(2.0, 100)),
        ({"acme": {"messages_per_second": 0, "messages_per_day": 0}}, "acme", SendingLimits(0.0, 0)),
    ],
    ids=["no-override-uses-defaults", "full-override", "other-tenant-keeps-defaults", "override-to-unlimited"],
)
def test_tenant_limits_override(override: dict[str, Any], tenant: str, expected: SendingLimits) -> None:
    cfg = config.from_dict({"smtp": {**TLS, **DEFAULTS, "tenant_limits": override}})
    assert cfg.tenant_limits(tenant) == expected


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"messages_per_day": 5}, SendingLimits(2.0, 5)),
        ({"messages_per_second": 9}, SendingLimits(9.0, 100)),
    ],
    ids=["day-only-keeps-default-rate", "rate-only-keeps-default-quota"],
)
def test_partial_tenant_override_keeps_the_other_default(override: dict[str, Any], expected: SendingLimits) -> None:
    """Setting one limit for a tenant must not silently lift the other (a fail-open limit)."""
    cfg = config.from_dict({"smtp": {**TLS, **DEFAULTS, "tenant_limits": {"acme": override}}})
    assert cfg.tenant_limits("acme") == expected


def test_config_is_frozen() -> None:
    cfg = config.from_dict({"smtp": TLS, "delivery": {"routes": {"*": "127.0.0.1:2526"}}})
    with pytest.raises(AttributeError):
        cfg.smtp.max_recipients = 5  # type: ignore[misc]
    assert cfg.delivery.routes == {"*": "127.0.0.1:2526"}
    with pytest.raises(TypeError):
        cfg.delivery.routes["x"] = "127.0.0.1:25"  # type: ignore[index]


# -- load --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"[smtp\nmax_recipients = 3\n", "not valid TOML"),
        (b"[smtp]\nmax_recipients = \n", "not valid TOML"),
        (b"\xff\xfe[smtp]\n", "not valid TOML"),
    ],
    ids=["unclosed-table", "missing-value", "not-utf8"],
)
def test_load_refuses_invalid_toml(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "cmcd.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        config.load(path)
    (problem,) = err.value.problems
    assert problem.startswith(fragment)  # the caller (cmcd) names the file once


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert err.value.problems == ["cannot read config file: No such file or directory"]


def test_load_good_file(tmp_path: Path) -> None:
    path = tmp_path / "cmcd.toml"
    path.write_text('[smtp]\ntls_cert = "c.pem"\ntls_key = "k.pem"\nmax_message_size = "1MB"\n[spool]\ndir = "sp"\n')
    cfg = config.load(path)
    assert cfg.smtp.max_message_size == 1024**2
    assert cfg.spool.dir == "sp"
