"""Each worker's share of the limits an operator sets for the whole host, so that N workers together
keep them without a shared counter; never reads a file, a clock or the store, never talks to
another worker.

A worker is to the host what a host is to a cluster: it enforces its share of every host total on
its own. worker_share(config, index, workers) gives worker INDEX of WORKERS a copy of the
configuration with each host total replaced by its share; the supervisor computes it again when
the worker count changes and on every reload. A whole number is split so the shares add up to the
host's (limit // N each, one more for the first limit % N workers), but a worker never gets less
than 1: a limit below the worker count becomes 1 per worker, and raised_limits names every limit
the shares so push above the host's number, for the caller to log. A rate is divided by N (a
fraction of a message a second is fine for a token bucket). 0 means unlimited and stays 0; an
unset per-tenant or per-domain override stays unset (it falls back to the default, itself shared).

The shares hold the host totals only as well as connections are spread: SO_REUSEPORT hashes each
connection to a worker, so one client's or one tenant's share of a worker is what that worker
decides alone (a tenant whose traffic lands on one worker is held to its share there, not to the
host's rate). Delivery does not depend on the kernel: each worker holds to its share of every
destination, so a destination never sees more than the host's limits from the workers together.

What each numeric limit is (S: split, a host total; K: kept, per connection, per message, per
request, per shard, or in force once per host):

| key                                         |   | why                                                 |
|---------------------------------------------|---|-----------------------------------------------------|
| server.shutdown_grace, server.workers       | K | each process's own timer; the count itself          |
| smtp.max_connections                        | S | connections the host holds                          |
| smtp.max_connections_per_ip                 | S | a client's connections to the host                  |
| smtp.max_data_in_flight                     | S | the host's memory for message bytes; at least what  |
|                                             |   | the largest message (API request) needs, else it    |
|                                             |   | could never be read                                 |
| smtp.messages_per_second                    | S | a tenant's rate for the host (the default)          |
| smtp.tenant_limits.*.messages_per_second    | S | a tenant's rate for the host (its override)         |
| smtp.messages_per_day, *.messages_per_day   | K | the daily quota is leased from the store in blocks  |
| smtp.auth_fail_limit(_per_address)          | K | failed logins are counted in the store by every     |
|                                             |   | worker together (submit/auth.py; while the store    |
|                                             |   | cannot be written, each alone against limit // N)   |
| smtp.auth_fail_window, auth_cache_ttl       | K | durations                                           |
| smtp.max_message_size, max_recipients,      | K | per message                                         |
| max_hops                                    |   |                                                     |
| smtp.*_timeout, min_data_rate(_grace)       | K | per connection                                      |
| spool.min_free                              | K | a floor on the one file system every shard is on    |
| delivery.connection_limit                   | S | connections to one destination site from the host   |
| delivery.domains.*.connection_limit         | S | the same, one domain's override                     |
| delivery.domains.*.rate                     | S | messages a second to one domain from the host       |
| delivery.connect_rate_limit                 | S | new connections a second to one site from the host  |
| delivery.initial_concurrency                | S | the host's slow start towards a new site            |
| delivery.max_connections                    | S | outbound connections the host holds                 |
| delivery.max_inflight                       | K | one shard's working set (its own queue)             |
| delivery.messages_per_connection,           | K | per connection, per transaction                     |
| recipients_per_transaction                  |   |                                                     |
| delivery.retry_*, max_lifetime,             | K | per recipient, per site, per connection             |
| dead_site_backoff, *_timeout,               |   |                                                     |
| connection_idle, port                       |   |                                                     |
| dns.timeout, dkim.*                         | K | per query, per key                                  |
| shaping: provider.*.connection_limit        | S | connections to one provider's site from the host    |
| shaping: provider.*.rate                    | S | messages a second to one provider from the host     |
| shaping: provider.*.messages_per_connection,| K | per connection, per transaction                     |
| recipients_per_connection,                  |   |                                                     |
| recipients_per_transaction                  |   |                                                     |
| shaping: automation.*.connection_limit,     | S | what a rule sets is a host total too (share_shaping)|
| automation.*.rate                           |   |                                                     |
| shaping: automation.*.messages_per_connection| K | per connection                                     |
| api.max_connections                         | S | connections the host holds                          |
| api.max_connections_per_ip                  | S | a client's connections to the host                  |
| api.max_request_size, max_bulk_bytes        | K | per request                                         |
| api.*_timeout, *_ttl, min_body_rate(_grace) | K | per connection, per token, per key                  |
| api.webhook_*                               | K | webhooks are shipped once per host (worker 0)       |
| metrics.*                                   | K | /metrics is one listener per host (the supervisor)  |
| retention.*, backup.*                       | K | once per host (worker 0)                            |

The shaping file (cmcd/shaping.toml and the operator's override) is not part of Config: its host
totals are split by share_shaping, with the same arithmetic (a provider's limit below the worker
count becomes 1 per worker).

A tenant's rate held anywhere else (a future per-tenant setting in the store) is shared with
share_rate, the same arithmetic.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass

from cmcd.config import REQUEST_MARGIN, Config, DomainPolicy, Rate, Size, TenantLimits, parse_rate
from cmcd.doors import JSON_BODY_WEIGHT
from cmcd.shaping import Shaping


@dataclass(frozen=True)
class Raised:
    """A limit whose shares add up to more than the host's number: below the worker count (every
    worker gets 1), or below what one worker needs to work at all (the data budget)."""

    path: str  # dotted, as in the configuration file
    host: int  # what the operator set for the host
    total: int  # what the workers together hold with their shares

    def __str__(self) -> str:
        return f"{self.path}={self.host} (the workers together hold {self.total})"


def share_count(limit: int, index: int, workers: int, floor: int = 1) -> int:
    """Worker INDEX's share of a whole-number host LIMIT: limit // workers, one more for the first
    limit % workers workers, so the shares add up to LIMIT; at least FLOOR (but never above LIMIT
    itself); 0 (unlimited) stays 0."""
    _check(index, workers)
    if limit <= 0:
        return limit
    even = limit // workers + (1 if index < limit % workers else 0)
    return max(even, min(floor, limit))


def share_rate(rate: float, workers: int) -> float:
    """A worker's share of a host RATE (per second): RATE / WORKERS; 0 (unlimited) stays 0."""
    _check(0, workers)
    return rate / workers if rate > 0 else rate


def share_rate_text(rate: Rate, workers: int) -> Rate:
    """A worker's share of a rate written like "50/s" or "600/m" (the unit kept); "" stays ""."""
    count, _ = parse_rate(rate)
    if not count or workers == 1:
        return rate
    unit = rate.partition("/")[2]
    return Rate(f"{_number(count / workers)}/{unit}")


def worker_share(config: Config, index: int, workers: int) -> Config:
    """CONFIG as worker INDEX (0 .. WORKERS - 1) enforces it: every host total (see the table in
    this module's docstring) replaced by the worker's share of it. Give it the configuration as
    loaded, never a share: a share of a share divides twice. Everything that reads a tenant's
    rate (SubmitService._limits, through Config.tenant_limits) then reads the worker's share."""
    return _Sharer(config, index, workers).config


def raised_limits(config: Config, workers: int) -> tuple[Raised, ...]:
    """The limits of CONFIG whose shares among WORKERS add up to more than the host's number (a
    limit below the worker count, a data budget too small to split): for a warning at start and
    on reload that names them. Empty when the shares hold the host's numbers exactly."""
    return tuple(_Sharer(config, 0, workers).raised)


def share_shaping(shaping: Shaping, index: int, workers: int) -> Shaping:
    """SHAPING as worker INDEX of WORKERS enforces it: each provider's connection limit and rate, and
    what each automation rule sets them to, replaced by the worker's share (per-connection and
    per-transaction limits kept). Give it the shaping as loaded, never a share."""
    _check(index, workers)
    if workers == 1:
        return shaping

    def rate(r: tuple[float, float]) -> tuple[float, float]:
        return (r[0] / workers, r[1]) if r[0] > 0 else r

    providers = [
        dataclasses.replace(
            p,
            limits=dataclasses.replace(
                p.limits,
                connection_limit=share_count(p.limits.connection_limit, index, workers),
                rate=rate(p.limits.rate),
            ),
        )
        for p in shaping.providers
    ]
    rules = [
        dataclasses.replace(
            r,
            connection_limit=None if r.connection_limit is None else share_count(r.connection_limit, index, workers),
            rate=None if r.rate is None else rate(r.rate),
        )
        for r in shaping.rules
    ]
    return Shaping.of(providers, rules, shaping.files)


# -- how ------------------------------------------------------------------------------------------


def _check(index: int, workers: int) -> None:
    if workers < 1 or not 0 <= index < workers:
        raise ValueError(f"worker {index} of {workers}: expected 1 or more workers and 0 <= index < workers")


def _number(x: float) -> str:
    text = repr(x)
    return text[:-2] if text.endswith(".0") else text


class _Sharer:
    """Builds one worker's configuration, noting every limit its shares raise above the host's."""

    def __init__(self, config: Config, index: int, workers: int):
        _check(index, workers)
        self.index = index
        self.workers = workers
        self.raised: list[Raised] = []
        self.config = self._config(config)

    def count(self, path: str, limit: int, floor: int = 1) -> int:
        total = sum(share_count(limit, i, self.workers, floor) for i in range(self.workers))
        if total > limit:
            self.raised.append(Raised(path, limit, total))
        return share_count(limit, self.index, self.workers, floor)

    def rate(self, rate: float) -> float:
        return share_rate(rate, self.workers)

    def _config(self, c: Config) -> Config:
        n = self.workers
        smtp, api, d = c.smtp, c.api, c.delivery
        tenants = {
            name: dataclasses.replace(
                t, messages_per_second=None if t.messages_per_second is None else self.rate(t.messages_per_second)
            )
            for name, t in smtp.tenant_limits.items()
        }
        domains = {
            name: dataclasses.replace(
                p,
                connection_limit=None
                if p.connection_limit is None
                else self.count(f'delivery.domains."{name}".connection_limit', p.connection_limit),
                rate=None if p.rate is None else share_rate_text(p.rate, n),
            )
            for name, p in d.domains.items()
        }
        return dataclasses.replace(
            c,
            smtp=dataclasses.replace(
                smtp,
                max_connections=self.count("smtp.max_connections", smtp.max_connections),
                max_connections_per_ip=self.count("smtp.max_connections_per_ip", smtp.max_connections_per_ip),
                max_data_in_flight=Size(
                    self.count("smtp.max_data_in_flight", smtp.max_data_in_flight, _largest_holder(c))
                ),
                messages_per_second=self.rate(smtp.messages_per_second),
                tenant_limits=typing.cast("dict[str, TenantLimits]", types.MappingProxyType(tenants)),
            ),
            delivery=dataclasses.replace(
                d,
                connection_limit=self.count("delivery.connection_limit", d.connection_limit),
                initial_concurrency=self.count("delivery.initial_concurrency", d.initial_concurrency),
                max_connections=self.count("delivery.max_connections", d.max_connections),
                connect_rate_limit=self.rate(d.connect_rate_limit),
                domains=typing.cast("dict[str, DomainPolicy]", types.MappingProxyType(domains)),
            ),
            api=dataclasses.replace(
                api,
                max_connections=self.count("api.max_connections", api.max_connections),
                max_connections_per_ip=self.count("api.max_connections_per_ip", api.max_connections_per_ip),
            ),
        )


def _largest_holder(c: Config) -> int:
    """The data budget one worker needs to take the largest thing it may be sent: an API request
    of the largest size (weighed as the budget weighs it), or a message over SMTP with the last
    read that brings its end (REQUEST_MARGIN covers it)."""
    smtp_need = c.smtp.max_message_size + REQUEST_MARGIN
    api_need = c.api_max_request_bytes() * JSON_BODY_WEIGHT if c.api.listen else 0
    return max(smtp_need, api_need)
