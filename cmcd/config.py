"""Loads one TOML file into one frozen, validated Config; never reads the environment.

Every key has a default documented in etc/cmcd.toml. An unknown key or a bad value
raises ConfigError naming the dotted path and what was expected; all problems in a
file are reported together so an operator fixes them in one pass. What the sections
and their fields are is cmcd.config_sections; its names are importable from here too,
so callers import the whole configuration from one place.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import time
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from cmcd import bounces
from cmcd.config_sections import (
    REQUEST_MARGIN,
    AdminConfig,
    ApiConfig,
    BackupConfig,
    BouncesConfig,
    Config,
    DeliveryConfig,
    DkimConfig,
    DnsConfig,
    DomainPolicy,
    Duration,
    HostPort,
    MetricsConfig,
    Rate,
    RetentionConfig,
    SendingLimits,
    ServerConfig,
    ShapingConfig,
    Size,
    SmtpConfig,
    SpoolConfig,
    StoreConfig,
    TenantLimits,
    parse_duration,
    parse_rate,
    parse_size,
    split_hostport,
)
from cmcd.doors import JSON_BODY_WEIGHT
from cmcd.errors import ConfigError

__all__ = [
    "AdminConfig",
    "ApiConfig",
    "BackupConfig",
    "BouncesConfig",
    "Config",
    "DeliveryConfig",
    "DkimConfig",
    "DnsConfig",
    "DomainPolicy",
    "Duration",
    "HostPort",
    "MetricsConfig",
    "REQUEST_MARGIN",
    "Rate",
    "RetentionConfig",
    "SendingLimits",
    "ServerConfig",
    "ShapingConfig",
    "Size",
    "SmtpConfig",
    "SpoolConfig",
    "StoreConfig",
    "TenantLimits",
    "parse_duration",
    "parse_rate",
    "parse_size",
    "split_hostport",
    "from_dict",
    "load",
]

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
    ("server.workers", 1, 256),
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
    operator = cfg.server.operator_address
    if operator and not re.fullmatch(r"[^@\s<>\x00-\x1f\x7f]{1,64}@[A-Za-z0-9.-]{1,253}", operator):
        errors.append(f'server.operator_address: expected an address like "ops@example.com", got {operator!r}')


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
    public = cfg.api.public_url
    if public and not re.fullmatch(r"https://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?", public):
        errors.append(f'api.public_url: expected an https URL like "https://mail.example.com", got {public!r}')
    elif public and not cfg.api.listen:
        errors.append("api.public_url: one-click unsubscribe needs the API listener; set api.listen too")
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


def _check_bounces(cfg: Config, errors: list[str]) -> None:
    """bounces.actions names known classes and actions; count_threshold is at least 1."""
    b = cfg.bounces
    for cls, action in b.actions.items():
        if cls not in bounces.CLASSES:
            errors.append(f'bounces.actions."{cls}": unknown bounce class (known: {", ".join(bounces.CLASSES)})')
        elif action is not None and action not in bounces.ACTIONS:
            errors.append(f'bounces.actions."{cls}": expected one of {", ".join(bounces.ACTIONS)}, got {action!r}')
    if not 1 <= b.count_threshold <= 1000:
        errors.append(f"bounces.count_threshold: expected a value from 1 to 1000, got {b.count_threshold!r}")


def from_dict(data: dict[str, Any], base_dir: str = ".") -> Config:
    errors: list[str] = []
    cfg = _build(Config, data, "", errors)
    _check_timezone(cfg, errors)
    _check_bounces(cfg, errors)
    _check_tls(cfg, errors)
    _check_ranges(cfg, errors)
    if errors:
        raise ConfigError(errors)
    return dataclasses.replace(cfg, base_dir=base_dir)


def read_data(path: str | Path) -> dict[str, Any]:
    """PATH's TOML as a dict, not yet checked (ConfigError when it cannot be read or parsed)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError([f"cannot read config file: {exc.strerror}"]) from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"not valid TOML: {exc}"]) from None


def load(path: str | Path) -> Config:
    """Read and validate PATH; relative paths inside resolve against the current directory."""
    return from_dict(read_data(path), base_dir=".")
