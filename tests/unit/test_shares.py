"""Each worker's share of the host's limits, as tables: shares add up to the host's number, at least
1 each, rates divided, 0 (unlimited) and unset overrides kept, per-message limits untouched."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from cmcd import shares
from cmcd.config import (
    REQUEST_MARGIN,
    ApiConfig,
    Config,
    DeliveryConfig,
    DomainPolicy,
    Rate,
    Size,
    SmtpConfig,
    TenantLimits,
    parse_rate,
)
from cmcd.doors import JSON_BODY_WEIGHT

#: every whole-number host total worker_share splits
SPLIT_COUNTS = (
    "smtp.max_connections",
    "smtp.max_connections_per_ip",
    "delivery.connection_limit",
    "delivery.initial_concurrency",
    "delivery.max_connections",
    "api.max_connections",
    "api.max_connections_per_ip",
)
#: limits per connection, message, request or shard: every worker keeps the host's value
KEPT = (
    "smtp.auth_fail_limit",  # counted in the store by every worker together (cmcd/submit/auth.py)
    "smtp.auth_fail_limit_per_address",
    "smtp.max_message_size",
    "smtp.max_recipients",
    "smtp.messages_per_day",
    "smtp.max_hops",
    "smtp.min_data_rate",
    "smtp.command_timeout",
    "spool.min_free",
    "delivery.messages_per_connection",
    "delivery.recipients_per_transaction",
    "delivery.max_inflight",
    "delivery.retry_schedule",
    "delivery.max_lifetime",
    "api.max_request_size",
    "api.max_bulk_bytes",
    "metrics.max_connections",
    "backup.keep",
    "retention.mail_log_days",
)


def get(config: Config, path: str) -> Any:
    section, name = path.split(".")
    return getattr(getattr(config, section), name)


def with_value(config: Config, path: str, value: object) -> Config:
    section, name = path.split(".")
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **{name: value})})


def every_worker(config: Config, workers: int) -> list[Config]:
    return [shares.worker_share(config, i, workers) for i in range(workers)]


def full_config() -> Config:
    """A configuration with a value of its own for every limit worker_share looks at."""
    return Config(
        smtp=SmtpConfig(
            listen=(),
            max_connections=37,
            max_connections_per_ip=11,
            messages_per_second=10.0,
            messages_per_day=5000,
            tenant_limits={
                "acme": TenantLimits(messages_per_second=50.0, messages_per_day=100_000),
                "daily-only": TenantLimits(messages_per_day=7),
                "unlimited": TenantLimits(messages_per_second=0.0),
            },
        ),
        delivery=DeliveryConfig(
            connection_limit=20,
            max_connections=500,
            connect_rate_limit=20.0,
            domains={
                "gmail.com": DomainPolicy(connection_limit=7, rate=Rate("50/s")),
                "slow.example": DomainPolicy(connection_limit=2, rate=Rate("600/m"), tls="required"),
                "tls-only.example": DomainPolicy(tls="disabled"),
                "open.example": DomainPolicy(rate=Rate("")),
            },
        ),
        api=ApiConfig(max_connections=1000, max_connections_per_ip=100),
    )


# -- whole numbers -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SPLIT_COUNTS)
@pytest.mark.parametrize("workers", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("host", [5, 7, 100, 1001], ids=lambda h: f"host{h}")
def test_count_shares_add_up_to_the_host_value(path: str, workers: int, host: int) -> None:
    config = with_value(Config(), path, host)
    got = [get(w, path) for w in every_worker(config, workers)]
    assert sum(got) == host
    assert max(got) - min(got) <= 1
    assert min(got) >= 1
    assert path not in {r.path for r in shares.raised_limits(config, workers)}


@pytest.mark.parametrize(
    ("limit", "workers", "expected"),
    [
        (10, 1, [10]),
        (10, 2, [5, 5]),
        (10, 3, [4, 3, 3]),
        (10, 4, [3, 3, 2, 2]),
        (3, 3, [1, 1, 1]),
        (2, 3, [1, 1, 1]),
        (1, 5, [1, 1, 1, 1, 1]),
        (0, 4, [0, 0, 0, 0]),
    ],
    ids=["one-worker", "even", "remainder-to-first", "two-remainders", "one-each", "below-n", "one", "unlimited"],
)
def test_share_count(limit: int, workers: int, expected: list[int]) -> None:
    assert [shares.share_count(limit, i, workers) for i in range(workers)] == expected


@pytest.mark.parametrize("path", SPLIT_COUNTS)
@pytest.mark.parametrize(("host", "workers"), [(1, 2), (2, 3), (3, 5), (4, 5)], ids=lambda v: str(v))
def test_a_limit_below_the_worker_count_is_1_each_and_named(path: str, host: int, workers: int) -> None:
    config = with_value(Config(), path, host)
    assert [get(w, path) for w in every_worker(config, workers)] == [1] * workers
    assert shares.Raised(path, host, workers) in shares.raised_limits(config, workers)
    assert any(str(r).startswith(f"{path}={host} ") for r in shares.raised_limits(config, workers))


@pytest.mark.parametrize("path", SPLIT_COUNTS)
@pytest.mark.parametrize("workers", [1, 2, 5])
def test_zero_is_unlimited_and_stays_zero(path: str, workers: int) -> None:
    config = with_value(Config(), path, 0)
    assert [get(w, path) for w in every_worker(config, workers)] == [0] * workers
    assert path not in {r.path for r in shares.raised_limits(config, workers)}


# -- rates ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 5])
def test_rates_are_divided(workers: int) -> None:
    config = full_config()
    for w in every_worker(config, workers):
        assert w.smtp.messages_per_second == pytest.approx(10.0 / workers)
        assert w.delivery.connect_rate_limit == pytest.approx(20.0 / workers)
        assert w.smtp.tenant_limits["acme"].messages_per_second == pytest.approx(50.0 / workers)
        assert w.tenant_limits("acme").messages_per_second == pytest.approx(50.0 / workers)
        assert w.tenant_limits("nobody").messages_per_second == pytest.approx(10.0 / workers)
        # a tenant with no rate of its own falls back to the (shared) default
        assert w.smtp.tenant_limits["daily-only"].messages_per_second is None
        assert w.tenant_limits("daily-only").messages_per_second == pytest.approx(10.0 / workers)
        # 0 in an override is "no limit for this tenant" and stays so
        assert w.tenant_limits("unlimited").messages_per_second == 0.0


@pytest.mark.parametrize(
    ("rate", "workers", "expected"),
    [
        ("50/s", 1, "50/s"),
        ("50/s", 2, "25/s"),
        ("50/s", 4, "12.5/s"),
        ("600/m", 3, "200/m"),
        ("1/s", 3, "0.3333333333333333/s"),
        ("10/5s", 2, "5/5s"),
        ("", 3, ""),
    ],
    ids=["one-worker", "halved", "fraction", "per-minute", "thirds", "per-5s", "unlimited"],
)
def test_share_rate_text(rate: str, workers: int, expected: str) -> None:
    got = shares.share_rate_text(Rate(rate), workers)
    assert got == expected
    if rate:
        count, per = parse_rate(got)
        host_count, host_per = parse_rate(rate)
        assert per == host_per
        assert count * workers == pytest.approx(host_count)


@pytest.mark.parametrize(
    ("rate", "workers", "expected"),
    [(10.0, 1, 10.0), (10.0, 4, 2.5), (1.0, 3, 1 / 3), (0.0, 3, 0.0)],
    ids=["one-worker", "quarter", "below-one-a-second", "unlimited"],
)
def test_share_rate(rate: float, workers: int, expected: float) -> None:
    assert shares.share_rate(rate, workers) == pytest.approx(expected)


# -- per-destination overrides -------------------------------------------------------------------


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_per_domain_policies_are_shared(workers: int) -> None:
    config = full_config()
    ws = every_worker(config, workers)
    assert sum(w.delivery.policy("gmail.com").connection_limit or 0 for w in ws) == 7
    assert sum(parse_rate(w.delivery.policy("gmail.com").rate)[0] for w in ws) == pytest.approx(50.0)
    assert sum(parse_rate(w.delivery.policy("slow.example").rate)[0] for w in ws) == pytest.approx(600.0)
    for w in ws:
        assert parse_rate(w.delivery.policy("slow.example").rate)[1] == 60.0
        assert w.delivery.policy("slow.example").tls == "required"
        # what a policy leaves unset stays unset: the (shared) default applies
        assert w.delivery.policy("tls-only.example") == DomainPolicy(tls="disabled")
        assert w.delivery.policy("open.example").rate == ""
        assert w.delivery.policy("nowhere.example") == DomainPolicy()
    slow = [w.delivery.policy("slow.example").connection_limit for w in ws]
    assert slow == [1] * workers  # 2 connections over 3+ workers: 1 each, and named
    names = {r.path for r in shares.raised_limits(config, workers)}
    assert ('delivery.domains."slow.example".connection_limit' in names) == (workers > 2)
    assert ('delivery.domains."gmail.com".connection_limit' in names) == (workers > 7)


# -- what is kept --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", KEPT)
@pytest.mark.parametrize("workers", [2, 5])
def test_per_message_and_per_connection_limits_are_kept(path: str, workers: int) -> None:
    config = full_config()
    for w in every_worker(config, workers):
        assert get(w, path) == get(config, path)


@pytest.mark.parametrize("workers", [2, 5])
def test_the_daily_quota_is_not_split(workers: int) -> None:
    """The daily quota is leased from the store in blocks, not shared out."""
    config = full_config()
    for w in every_worker(config, workers):
        assert w.tenant_limits("acme").messages_per_day == 100_000
        assert w.tenant_limits("daily-only").messages_per_day == 7
        assert w.tenant_limits("nobody").messages_per_day == 5000


@pytest.mark.parametrize("config", [Config(), full_config()], ids=["defaults", "every-limit-set"])
def test_one_worker_gets_the_host_config(config: Config) -> None:
    assert shares.worker_share(config, 0, 1) == config
    assert shares.raised_limits(config, 1) == ()


# -- the data budget -----------------------------------------------------------------------------


def test_the_data_budget_is_split() -> None:
    config = with_value(Config(), "smtp.max_data_in_flight", Size(1024**3))
    got = [w.smtp.max_data_in_flight for w in every_worker(config, 4)]
    assert got == [1024**3 // 4] * 4
    assert all(isinstance(v, Size) for v in got)


@pytest.mark.parametrize(
    ("api", "budget"), [(False, 40 * 1024**2), (True, 100 * 1024**2)], ids=["smtp-only", "with-api"]
)
def test_a_data_budget_share_still_takes_the_largest_message(api: bool, budget: int) -> None:
    """A share too small for one message (or API request) of the largest size could never read it:
    each worker gets at least that, and the limit is named."""
    config = dataclasses.replace(
        Config(),
        smtp=SmtpConfig(listen=(), max_message_size=Size(10 * 1024**2), max_data_in_flight=Size(budget)),
        api=ApiConfig(listen="127.0.0.1:8443" if api else ""),
    )
    need = config.api_max_request_bytes() * JSON_BODY_WEIGHT if api else config.smtp.max_message_size + REQUEST_MARGIN
    workers = 5
    assert budget // workers < need <= budget
    got = [w.smtp.max_data_in_flight for w in every_worker(config, workers)]
    assert got == [need] * workers
    assert shares.Raised("smtp.max_data_in_flight", budget, need * workers) in shares.raised_limits(config, workers)


# -- arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("index", "workers"), [(0, 0), (-1, 2), (2, 2)], ids=["no-workers", "negative", "past-end"])
def test_a_worker_outside_the_count_is_refused(index: int, workers: int) -> None:
    with pytest.raises(ValueError, match="index"):
        shares.worker_share(Config(), index, workers)
