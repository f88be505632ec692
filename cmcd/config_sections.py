"""What cmcd's configuration holds: one frozen dataclass per TOML section, each field with its default
and meaning, the Config that holds them, and the value types (Size, Duration, Rate, HostPort) with their
parsers; never reads a file or checks a configuration as a whole (cmcd.config does).

Every default here is the one documented in etc/cmcd.toml.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmcd.bounces import BlockPolicy, block_policy

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


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = "localhost"
    timezone: str = "UTC"
    #: where the console's "contact the operator" form is mailed ("" keeps inquiries in the operation log only)
    operator_address: str = ""
    #: seconds SIGTERM waits for open transactions before exiting
    shutdown_grace: Duration = Duration(30)
    #: worker processes, each with its own spool shard (1: a single process, no supervisor)
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)


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
    #: a console sign-in lasts at most this, and ends after console_idle_timeout without a request
    console_session_ttl: Duration = Duration(8 * 3600)
    console_idle_timeout: Duration = Duration(1800)
    #: tenant admins may add and remove their users' IP credentials in the console (else: view only)
    console_ip_credentials: bool = False
    #: the base of the one-click unsubscribe URL in broadcast mail ("https://mail.example.com"): the
    #: address the Internet reaches this listener at; "" takes https://server.hostname with the port of api.listen
    public_url: str = ""
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
class BouncesConfig:
    """Bounce classes and the blocks they make (cmcd/bounces.py)."""

    #: rules read before the shipped cmcd/bounce_rules.toml, again on SIGHUP ("" none)
    override_file: str = ""
    #: a class whose action is count suppresses its recipient at this many bounces ...
    count_threshold: int = 3
    #: ... of different messages within this long
    count_window: Duration = Duration(7 * 86400)
    #: a block a bounce made expires this long after its last bounce (0: never)
    watch_period: Duration = Duration(30 * 86400)
    #: class -> suppress, count, alert or none; a class not named keeps its default
    actions: dict[str, str] = field(default_factory=dict)

    def policy(self) -> BlockPolicy:
        return block_policy(self.actions, self.count_threshold, self.count_window, self.watch_period)


@dataclass(frozen=True)
class ShapingConfig:
    """Provider shaping and its automation (cmcd/shaping.py)."""

    #: providers and automation rules read before the shipped cmcd/shaping.toml, again on SIGHUP ("" none)
    override_file: str = ""


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
    bounces: BouncesConfig = field(default_factory=BouncesConfig)
    shaping: ShapingConfig = field(default_factory=ShapingConfig)
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

    def unsubscribe_base(self) -> str:
        """The base of the one-click unsubscribe URL (cmcd/unsubscribe.py): api.public_url, or
        https://server.hostname with api.listen's port (none for 443); "" when there is no API
        listener to take the POST, and broadcast mail then goes without one-click unsubscribe."""
        if self.api.public_url:
            return self.api.public_url.rstrip("/")
        if not self.api.listen:
            return ""
        port = self.api.listen.rpartition(":")[2]
        return f"https://{self.server.hostname}" + ("" if port == "443" else f":{port}")

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
