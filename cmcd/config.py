"""Loads one TOML file into one frozen, validated Config; never reads the environment.

Every key has a default documented in etc/cmcd.toml. An unknown key or a bad value
raises ConfigError naming the dotted path and what was expected; all problems in a
file are reported together so an operator fixes them in one pass.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import time
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmcd.doors import JSON_BODY_WEIGHT
from cmcd.errors import ConfigError

_SIZE_UNITS = {"": 1, "B": 1, "KB": 1024, "K": 1024, "MB": 1024**2, "M": 1024**2, "GB": 1024**3, "G": 1024**3}
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")


class Size(int):
    """A byte count; in TOML an integer or a string like "25MB"."""


class Duration(float):
    """Seconds; in TOML a number of seconds or a string like "90s", "5d"."""


class Rate(str):
    """A rate like "10/s", "600/m"; empty means unlimited."""


class HostPort(str):
    """An address like "127.0.0.1:2587" or "[::1]:2587"."""


def parse_size(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).upper() in _SIZE_UNITS:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    raise ValueError


def parse_duration(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, (int, float)) and value >= 0:
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]
    raise ValueError


def parse_rate(value: Any) -> tuple[float, float]:
    """Return (count, per_seconds) for "50/s"; (0, 0) for "" (unlimited)."""
    if value in ("", None):
        return (0.0, 0.0)
    if isinstance(value, str) and "/" in value:
        count, _, unit = value.partition("/")
        per = parse_duration(unit if unit[:1].isdigit() else "1" + unit)
        n = float(count)
        if n > 0 and per > 0:
            return (n, per)
    raise ValueError


def split_hostport(value: str) -> tuple[str, int]:
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    else:
        host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError
    return host, int(port)


_EXPECT = {
    Size: 'a size like "25MB"',
    Duration: 'a duration like "90s" or "5d"',
    Rate: 'a rate like "50/s" or "" for none',
    HostPort: 'an address like "127.0.0.1:2587"',
    str: "a string",
    int: "an integer",
    bool: "true or false",
    float: "a number",
}


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = "localhost"
    timezone: str = "UTC"
    #: seconds SIGTERM waits for open transactions before exiting
    shutdown_grace: Duration = Duration(30)


@dataclass(frozen=True)
class SendingLimits:
    """The limits in force for one tenant (0 = none)."""

    messages_per_second: float
    messages_per_day: int


@dataclass(frozen=True)
class TenantLimits:
    """One tenant's sending limits; None (unset in an override) means the [smtp] default."""

    messages_per_second: float | None = None
    messages_per_day: int | None = None


@dataclass(frozen=True)
class SmtpConfig:
    listen: tuple[HostPort, ...] = (HostPort("127.0.0.1:587"),)
    listen_tls: tuple[HostPort, ...] = ()
    tls_cert: str = ""
    tls_key: str = ""
    max_message_size: Size = Size(25 * 1024**2)
    max_recipients: int = 100
    command_timeout: Duration = Duration(300)
    data_timeout: Duration = Duration(180)
    #: a reply the client does not read: its bytes must leave our buffer within this, or the connection is reset
    write_timeout: Duration = Duration(30)
    #: bytes/s a client must keep up during DATA once min_data_rate_grace has passed
    min_data_rate: Size = Size(1024)
    min_data_rate_grace: Duration = Duration(10)
    bare_newlines: str = "normalize"
    #: failed logins of one login from one address (an IPv6 /64) in auth_fail_window; past it that
    #: login is refused from there (421 4.7.0) while other logins from the same address still work;
    #: 0 turns throttling off altogether
    auth_fail_limit: int = 10
    #: failed logins from one address over all logins in auth_fail_window; past it every login
    #: from there is refused (the much higher ceiling for a shared NAT)
    auth_fail_limit_per_address: int = 100
    auth_fail_window: Duration = Duration(600)
    auth_cache_ttl: Duration = Duration(300)
    #: per-tenant defaults; [smtp.tenant_limits.NAME] overrides one tenant
    messages_per_second: float = 0.0
    messages_per_day: int = 0
    tenant_limits: dict[str, TenantLimits] = field(default_factory=dict)
    max_connections: int = 1000
    max_connections_per_ip: int = 100
    #: DATA bytes all sessions together may hold in memory; past it DATA gets 452 4.3.1
    max_data_in_flight: Size = Size(1024**3)
    #: Received: fields a message may already carry; one more is a loop: 554 5.4.6 at intake, and
    #: a queued message over the limit is bounced before delivery (Postfix's hopcount_limit)
    max_hops: int = 50


@dataclass(frozen=True)
class SpoolConfig:
    dir: str = "/var/spool/cmcd"
    #: free space the spool's file system must keep: below it (plus a MAIL's SIZE=), MAIL gets
    #: 452 4.3.1, like Postfix's queue_minfree; "0" turns the check off
    min_free: Size = Size(64 * 1024**2)


@dataclass(frozen=True)
class StoreConfig:
    path: str = "/var/lib/cmcd/cmcd.db"
    key_file: str = "/var/lib/cmcd/data.key"


@dataclass(frozen=True)
class DomainPolicy:
    """[delivery.domains."example.com"]: one destination domain's overrides."""

    #: connections at once to the site this domain's mail goes to
    connection_limit: int | None = None
    #: messages a second (or minute) to this domain, e.g. "50/s"; "" for no limit
    rate: Rate | None = None
    #: "opportunistic" (STARTTLS when offered; a failed handshake defers), "opportunistic+plain"
    #: (a failed handshake is retried in plain text), "required" (no TLS, no delivery) or "disabled"
    tls: str | None = None


@dataclass(frozen=True)
class DeliveryConfig:
    #: false: accept and queue, deliver nothing (like Postfix's defer_transports)
    enabled: bool = True
    port: int = 25
    routes: dict[str, HostPort] = field(default_factory=dict)
    #: waits after the 1st, 2nd, ... failed attempt; the last one repeats
    retry_schedule: tuple[Duration, ...] = tuple(Duration(s) for s in (300, 600, 1200, 2400, 4800, 7200))
    #: each wait is spread by +-this fraction, so retries to one destination do not all land together
    retry_jitter: float = 0.1
    max_lifetime: Duration = Duration(5 * 86400)
    #: connections at once per destination site (override per domain in [delivery.domains])
    connection_limit: int = 20
    #: a site starts with this many connections and gains one per success (Postfix's slow start)
    initial_concurrency: int = 5
    max_connections: int = 500
    messages_per_connection: int = 100
    #: recipients in one transaction; a message's recipients at domains that share a next hop go together
    recipients_per_transaction: int = 50
    #: how long a connection with nothing to send stays open for the next message
    connection_idle: Duration = Duration(2)
    connect_timeout: Duration = Duration(30)
    command_timeout: Duration = Duration(300)
    data_timeout: Duration = Duration(600)
    #: sending the body: each period the server must take 64 KiB more (or the rest), else the
    #: attempt is deferred (Postfix's smtp_data_xfer_timeout); data_timeout is the wait after the dot
    data_xfer_timeout: Duration = Duration(180)
    #: new connections a second to one destination site, at most: a last guard against any
    #: reconnect loop (hitting it is logged and counted in cmcd_delivery_connect_throttled_total)
    connect_rate_limit: float = 20.0
    #: a site whose connections all failed gets no new attempt for this long
    dead_site_backoff: Duration = Duration(300)
    tls: str = "opportunistic"
    #: recipients handed to the engine at once; more wait in the queue
    max_inflight: int = 20000
    domains: dict[str, DomainPolicy] = field(default_factory=dict)

    def policy(self, domain: str) -> DomainPolicy:
        return self.domains.get(domain) or _NO_POLICY

    def domain_tls(self, domain: str) -> str:
        return self.policy(domain).tls or self.tls


_NO_POLICY = DomainPolicy()


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[HostPort, ...] = ()
    timeout: Duration = Duration(5)


@dataclass(frozen=True)
class DkimConfig:
    #: selectors of new keys, as strftime formats (cmc202611r, cmc202611e)
    rsa_selector: str = "cmc%Y%mr"
    ed25519_selector: str = "cmc%Y%me"
    rsa_bits: int = 2048
    #: also make and sign with an Ed25519 key (RFC 8463), beside RSA
    ed25519: bool = True
    #: x= (signature expiry) this long after t=; 0 = no x= tag
    expire_after: Duration = Duration(0)


@dataclass(frozen=True)
class AdminConfig:
    socket: str = "/run/cmcd/admin.sock"


@dataclass(frozen=True)
class MetricsConfig:
    #: Prometheus /metrics listener, "host:port"; "" turns it off
    listen: str = "127.0.0.1:9465"
    #: scrapes at once, cut at start to the listener's share of descriptors (cmcd/doors.py)
    max_connections: int = 16
    #: the request line and headers must be complete within this, however slowly they trickle
    header_timeout: Duration = Duration(10)
    #: serve /metrics over HTTPS with this certificate chain and key (both or neither; "" = plain HTTP)
    tls_cert: str = ""
    tls_key: str = ""
    #: login -> scrypt hash ("cmcd hash-password"); when set, every request needs HTTP basic auth
    basic_auth_users: dict[str, str] = field(default_factory=dict)


#: an API request body beyond the base64 of the largest message: JSON names and escapes,
#: recipients, headers, tags (see Config.api_max_request_bytes)
REQUEST_MARGIN = 1024**2


@dataclass(frozen=True)
class ApiConfig:
    #: HTTPS listener "host:port" for the tenant API (smtp.tls_cert and tls_key); "" turns it off
    listen: str = ""
    #: lifetime of a session token from a tenant admin's password + TOTP login
    session_ttl: Duration = Duration(3600)
    #: how long an Idempotency-Key and its response are kept
    idempotency_ttl: Duration = Duration(86400)
    #: largest request body; a bigger one gets 413. 0: follow smtp.max_message_size (x 4/3 for
    #: base64, plus REQUEST_MARGIN for JSON and headers): see Config.api_max_request_bytes
    max_request_size: Size = Size(0)
    #: connections in all (cut at start to the API's share of descriptors) and per client IP;
    #: past them a connection is closed before its TLS handshake
    max_connections: int = 1000
    max_connections_per_ip: int = 100
    #: the TLS handshake must end within this
    handshake_timeout: Duration = Duration(10)
    #: the request line and headers must be complete within this from their first byte (from
    #: the connection's start for its first request), however slowly they trickle
    header_timeout: Duration = Duration(30)
    #: reading a request body: each read must bring bytes within this (measured as progress)
    body_timeout: Duration = Duration(60)
    #: bytes/s a request body must keep up in all once min_body_rate_grace has passed (0: off),
    #: else the connection is reset: a body trickled in cannot hold its connection for ever
    min_body_rate: Size = Size(1024)
    min_body_rate_grace: Duration = Duration(10)
    #: a connection with no request under way is closed after this
    keepalive_timeout: Duration = Duration(75)
    #: a response the client does not read: its bytes must leave our buffer within this, or the connection is reset
    write_timeout: Duration = Duration(30)
    #: the messages one bulk request builds, all together (recipients x message size)
    max_bulk_bytes: Size = Size(100 * 1024**2)
    #: webhook URLs may resolve to loopback, link-local or private addresses (off: SSRF guard)
    webhook_allow_private: bool = False
    #: seconds one webhook request may take
    webhook_timeout: Duration = Duration(10)
    #: how long a failing webhook batch is retried (with backoff) before it is dropped
    webhook_retry_for: Duration = Duration(86400)


@dataclass(frozen=True)
class RetentionConfig:
    mail_log_days: int = 40
    audit_log_days: int = 1825


@dataclass(frozen=True)
class BackupConfig:
    dir: str = "/var/backups/cmcd"
    key_file: str = "/var/lib/cmcd/backup.key"
    keep: int = 480
    interval: Duration = Duration(3600)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    dkim: DkimConfig = field(default_factory=DkimConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    backup: BackupConfig = field(default_factory=BackupConfig)
    #: directory relative paths are resolved against (the config file's project root)
    base_dir: str = "."

    def path(self, value: str) -> Path:
        """Resolve a configured path against base_dir."""
        p = Path(value)
        return p if p.is_absolute() else Path(self.base_dir) / p

    def api_max_request_bytes(self) -> int:
        """The largest API request body: api.max_request_size, or when it is 0 what the largest
        message smtp.max_message_size allows needs as JSON: its bytes as base64 (4/3) plus
        REQUEST_MARGIN. A bigger body could only be refused after it was read."""
        if self.api.max_request_size:
            return int(self.api.max_request_size)
        return -(-self.smtp.max_message_size * 4 // 3) + REQUEST_MARGIN

    def tenant_limits(self, tenant: str) -> SendingLimits:
        """TENANT's limits: its [smtp.tenant_limits.TENANT] values, the [smtp] ones for what it leaves unset."""
        override = self.smtp.tenant_limits.get(tenant)
        return SendingLimits(
            self.smtp.messages_per_second
            if override is None or override.messages_per_second is None
            else override.messages_per_second,
            self.smtp.messages_per_day
            if override is None or override.messages_per_day is None
            else override.messages_per_day,
        )


_TLS_MODES = ("opportunistic", "opportunistic+plain", "required", "disabled")
_CHOICES = {"smtp.bare_newlines": ("normalize", "reject"), "delivery.tls": _TLS_MODES}


def _convert(value: Any, tp: Any, path: str, errors: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # "X | None": a value given is an X
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
        origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a table, got {value!r}")
            return tp()  # type: ignore[operator]
        return _build(tp, value, path, errors)
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list of {_EXPECT.get(item_tp, item_tp)}, got {value!r}")
            return ()
        return tuple(_convert(v, item_tp, f"{path}[{i}]", errors) for i, v in enumerate(value))
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a table, got {value!r}")
            return {}
        return types.MappingProxyType({k: _convert(v, val_tp, f'{path}."{k}"', errors) for k, v in value.items()})
    try:
        if tp is Size:
            return Size(parse_size(value))
        if tp is Duration:
            return Duration(parse_duration(value))
        if tp is Rate:
            parse_rate(value)
            return Rate(value)
        if tp is HostPort:
            if not isinstance(value, str):
                raise ValueError
            split_hostport(value)
            return HostPort(value)
        if tp is bool:
            if not isinstance(value, bool):
                raise ValueError
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError
            return value
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                raise ValueError
            choices = _CHOICES.get(path) or (
                _TLS_MODES if path.startswith("delivery.domains.") and path.endswith(".tls") else None
            )
            if choices and value not in choices:
                errors.append(f"{path}: expected one of {', '.join(choices)}, got {value!r}")
            return value
    except (ValueError, TypeError):
        errors.append(f"{path}: expected {_EXPECT.get(tp, tp)}, got {value!r}")
        return None
    raise TypeError(f"unsupported config type {tp!r}")  # pragma: no cover


def _build(cls: Any, data: dict[str, Any], prefix: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.name != "base_dir"}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in known:
            errors.append(f"{path}: unknown key (known keys: {', '.join(sorted(known))})")
            continue
        converted = _convert(value, hints[key], path, errors)
        if converted is not None:
            kwargs[key] = converted
    return cls(**kwargs)


def _check_timezone(cfg: Config, errors: list[str]) -> None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(cfg.server.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        errors.append(f'server.timezone: expected an IANA time zone like "Asia/Tokyo", got {cfg.server.timezone!r}')


_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
#: (dotted path, lowest allowed, highest allowed): values that parse but make no sense.
_RANGES = (
    ("smtp.max_message_size", 1024, 2 * 1024**3 - 1),  # SQLite's largest blob is 2 GiB
    ("spool.min_free", 0, 2**50),
    ("api.session_ttl", 60.0, 86400.0),
    ("api.idempotency_ttl", 60.0, 30 * 86400.0),
    ("api.max_request_size", 0, 1024**3),
    ("api.max_connections", 1, 1_000_000),
    ("api.max_connections_per_ip", 0, 1_000_000),
    ("api.handshake_timeout", 1.0, 300.0),
    ("api.header_timeout", 1.0, 3600.0),
    ("api.body_timeout", 1.0, 3600.0),
    ("api.min_body_rate", 0, 1024**3),
    ("api.min_body_rate_grace", 1.0, 3600.0),
    ("api.keepalive_timeout", 1.0, 3600.0),
    ("metrics.max_connections", 1, 10_000),
    ("metrics.header_timeout", 1.0, 300.0),
    ("api.max_bulk_bytes", 1024, 4 * 1024**3),
    ("api.webhook_timeout", 1.0, 300.0),
    ("api.webhook_retry_for", 60.0, 7 * 86400.0),
    ("smtp.max_recipients", 1, 100_000),
    ("smtp.max_hops", 1, 1000),
    ("smtp.auth_fail_limit", 0, 1_000_000),
    ("smtp.auth_fail_limit_per_address", 0, 1_000_000),
    ("delivery.data_xfer_timeout", 0.1, 3600.0),
    ("delivery.connect_rate_limit", 0.1, 100_000.0),
    ("smtp.command_timeout", 1.0, 86400.0),
    ("smtp.data_timeout", 1.0, 86400.0),
    ("smtp.write_timeout", 1.0, 3600.0),
    ("api.write_timeout", 1.0, 3600.0),
    ("smtp.min_data_rate_grace", 0.0, 86400.0),
    ("smtp.auth_cache_ttl", 0.0, 86400.0),
    ("smtp.auth_fail_window", 1.0, 30 * 86400.0),
    ("server.shutdown_grace", 0.0, 3600.0),
    ("dns.timeout", 0.1, 300.0),
    ("backup.interval", 60.0, 30 * 86400.0),
    ("backup.keep", 1, 100_000),
    ("delivery.port", 1, 65535),
    ("smtp.messages_per_second", 0.0, 1e6),
    ("delivery.retry_jitter", 0.0, 0.5),
    ("delivery.max_lifetime", 1.0, 30 * 86400.0),
    ("delivery.connection_limit", 1, 10_000),
    ("delivery.initial_concurrency", 1, 10_000),
    ("delivery.max_connections", 1, 100_000),
    ("delivery.messages_per_connection", 1, 100_000),
    ("delivery.recipients_per_transaction", 1, 1000),
    ("delivery.connect_timeout", 0.1, 3600.0),
    ("delivery.command_timeout", 0.1, 3600.0),
    ("delivery.data_timeout", 0.1, 3600.0),
    ("delivery.connection_idle", 0.0, 3600.0),
    ("delivery.dead_site_backoff", 0.0, 86400.0),
    ("delivery.max_inflight", 100, 10_000_000),
    ("dkim.rsa_bits", 1024, 4096),
    ("dkim.expire_after", 0.0, 365 * 86400.0),
)


def _check_ranges(cfg: Config, errors: list[str]) -> None:
    for path, low, high in _RANGES:
        section, name = path.split(".")
        value = getattr(getattr(cfg, section), name)
        if not low <= value <= high:  # also refuses nan and inf
            errors.append(f"{path}: expected a value from {low:g} to {high:g}, got {value!r}")
    for name in ("rsa_selector", "ed25519_selector"):
        made = time.strftime(getattr(cfg.dkim, name), time.gmtime(0))
        if not _HOSTNAME_RE.match(made) or "." in made:
            errors.append(f'dkim.{name}: expected a selector format like "cmc%Y%mr" (letters, digits, -), got {made!r}')
    if not cfg.delivery.retry_schedule:
        errors.append("delivery.retry_schedule: expected at least one duration")
    for i, step in enumerate(cfg.delivery.retry_schedule):
        if step is not None and not 1.0 <= step <= 30 * 86400.0:
            errors.append(f"delivery.retry_schedule[{i}]: expected a value from 1s to 30d, got {step!r}")
    for name, pol in cfg.delivery.domains.items():
        if pol.connection_limit is not None and not 1 <= pol.connection_limit <= 10_000:
            errors.append(
                f'delivery.domains."{name}".connection_limit: expected 1 to 10000, got {pol.connection_limit}'
            )
    if not _HOSTNAME_RE.match(cfg.server.hostname):
        errors.append(f'server.hostname: expected a host name like "mail.example.com", got {cfg.server.hostname!r}')


def _check_tls(cfg: Config, errors: list[str]) -> None:
    if (cfg.smtp.listen or cfg.smtp.listen_tls) and not (cfg.smtp.tls_cert and cfg.smtp.tls_key):
        errors.append("smtp.tls_cert: expected a certificate path (AUTH is only offered over TLS)")
    if cfg.api.listen:
        need = cfg.api_max_request_bytes() * JSON_BODY_WEIGHT
        if need > cfg.smtp.max_data_in_flight:  # such a body could never be read: 503 for ever
            errors.append(
                f"smtp.max_data_in_flight: expected at least {need} bytes: one API request of the largest size "
                f"({cfg.api_max_request_bytes()} bytes, api.max_request_size) weighs {JSON_BODY_WEIGHT} times "
                "its size in this budget; raise it or lower api.max_request_size"
            )
        if not (cfg.smtp.tls_cert and cfg.smtp.tls_key):
            errors.append("api.listen: the API is HTTPS only; set smtp.tls_cert and smtp.tls_key")
        try:
            split_hostport(cfg.api.listen)
        except ValueError:
            errors.append(f'api.listen: expected "host:port", got {cfg.api.listen!r}')
    for i, hp in enumerate(cfg.dns.nameservers):
        if hp is None:
            continue  # already reported
        host, _ = split_hostport(hp)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            errors.append(f"dns.nameservers[{i}]: expected an IP address with port, got {hp!r}")
    _check_metrics_access(cfg, errors)


_SCRYPT_HASH = re.compile(r"^scrypt\$\d+\$\d+\$\d+\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+$")


def _check_metrics_access(cfg: Config, errors: list[str]) -> None:
    """metrics.tls_cert with tls_key, and basic_auth_users as login -> scrypt hash."""
    m = cfg.metrics
    if bool(m.tls_cert) != bool(m.tls_key):
        errors.append("metrics.tls_cert: expected metrics.tls_cert and metrics.tls_key together (or neither)")
    for login, hashed in m.basic_auth_users.items():
        if not login or ":" in login or not login.isprintable():
            errors.append(f'metrics.basic_auth_users."{login}": expected a login without ":" or control characters')
        if hashed is not None and not _SCRYPT_HASH.match(hashed):
            errors.append(
                f'metrics.basic_auth_users."{login}": expected a scrypt hash from "cmcd hash-password" '
                "(scrypt$N$r$p$salt$hash); the value is not shown, it may be a password"
            )


def from_dict(data: dict[str, Any], base_dir: str = ".") -> Config:
    errors: list[str] = []
    cfg = _build(Config, data, "", errors)
    _check_timezone(cfg, errors)
    _check_tls(cfg, errors)
    _check_ranges(cfg, errors)
    if errors:
        raise ConfigError(errors)
    return dataclasses.replace(cfg, base_dir=base_dir)


def load(path: str | Path) -> Config:
    """Read and validate PATH; relative paths inside resolve against the current directory."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError([f"cannot read config file: {exc.strerror}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"not valid TOML: {exc}"]) from None
    return from_dict(data, base_dir=".")
