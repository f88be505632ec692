"""Provider shaping: which mailbox provider a destination's MX hosts belong to (MX rollup), the limits
that provider's site is held to, and the automation that changes them for a while when the provider's
replies say so; pure (every time is passed in as `now`), except load_shaping, which reads the files.

A provider is named by MX host suffixes ("google.com" matches aspmx.l.google.com). Routing asks
provider_for(hosts) once per route lookup (the answer is cached with the route): when every MX host
of the most preferred group ends in one provider's suffix, the domain's mail goes to the site
"provider:NAME", which all that provider's domains share, with the provider's connection limit,
messages and recipients per connection, recipients per transaction and message rate.

An automation rule is a regular expression on a remote reply (optionally its basic and enhanced
codes), a trigger (the first match, or COUNT matches within PERIOD at one site) and an action for
DURATION: "limit" sets a connection limit, messages per connection or rate; "suspend" holds the
whole site; "suspend_tenant" holds one tenant's mail at the site. Automation keeps what is in force
and ends it when its time has passed, after which the site has its configured values again. The
engine (cmcd/deliver/engine.py) does the I/O: it feeds replies in, applies what comes out, logs it.

The files: the shipped cmcd/shaping.toml and an operator's override file ([shaping] override_file),
read first: its providers replace shipped ones of the same name, its rules come before the shipped
ones and replace those of the same name. A bad file raises ShapingError naming the file and entry.
"""

from __future__ import annotations

import re
import tomllib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cmcd.bounces import reply_matches
from cmcd.config_sections import parse_duration, parse_rate
from cmcd.errors import CmcdError

SHIPPED_SHAPING = Path(__file__).with_name("shaping.toml")
ACTIONS = ("limit", "suspend", "suspend_tenant")
SITE_PREFIX = "provider:"
#: hit counters kept for (site, rule, tenant) before stale ones are swept
MAX_COUNTERS = 10_000

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_SUFFIX = re.compile(r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
_ENHANCED_PATTERN = re.compile(r"^[245xX]\.\d{1,3}\.\d{1,3}$")
_PROVIDER_KEYS = (
    "suffixes", "connection_limit", "messages_per_connection", "recipients_per_connection",
    "recipients_per_transaction", "rate", "source",
)  # fmt: skip
_RULE_KEYS = (
    "name", "providers", "text", "codes", "enhanced", "count", "period", "action", "duration",
    "connection_limit", "messages_per_connection", "rate", "source",
)  # fmt: skip


class ShapingError(CmcdError, ValueError):
    """A shaping file cmcd cannot use: the message names the file and the entry."""


@dataclass(frozen=True)
class Limits:
    """What a site is held to. 0 (or a rate of (0, 0)) means no limit of the provider's own."""

    connection_limit: int = 0
    messages_per_connection: int = 0
    recipients_per_connection: int = 0
    recipients_per_transaction: int = 0
    rate: tuple[float, float] = (0.0, 0.0)  # (messages, per seconds)


@dataclass(frozen=True)
class Provider:
    name: str
    suffixes: tuple[str, ...]
    limits: Limits
    rate_text: str = ""  # the rate as written ("10/s"), for status
    source: str = ""


@dataclass(frozen=True)
class Rule:
    name: str
    text: re.Pattern[str]  # searched in the whole reply ("421 4.7.0 ..."), case-insensitive
    action: str  # one of ACTIONS
    duration_s: float
    providers: tuple[str, ...] = ()  # empty: every site, a provider's or not
    codes: frozenset[int] = frozenset()  # empty: any basic code (4xx or 5xx)
    enhanced: tuple[str, ...] = ()  # "4.7.0", "X.7.0" for 4 or 5; empty: any
    count: int = 1  # matches within period_s that fire it; 1: the first match
    period_s: float = 0.0
    connection_limit: int | None = None  # for action "limit": what it sets
    messages_per_connection: int | None = None
    rate: tuple[float, float] | None = None
    rate_text: str = ""
    source: str = ""

    def applies(self, provider: str) -> bool:
        return not self.providers or provider in self.providers

    def matches(self, code: int, enhanced: str, text: str) -> bool:
        return reply_matches(self.codes, self.enhanced, self.text, code, enhanced, text)


@dataclass(frozen=True)
class Shaping:
    providers: tuple[Provider, ...] = ()
    rules: tuple[Rule, ...] = ()
    files: tuple[str, ...] = ()  # where they came from, override first
    _by_suffix: MappingProxyType[str, Provider] = field(
        default_factory=lambda: MappingProxyType({}), repr=False, compare=False
    )

    @classmethod
    def of(cls, providers: Iterable[Provider], rules: Iterable[Rule], files: Iterable[str] = ()) -> Shaping:
        """A Shaping with its suffix index; ShapingError when two providers claim one suffix."""
        providers = tuple(providers)
        index: dict[str, Provider] = {}
        for p in providers:
            for s in p.suffixes:
                other = index.get(s)
                if other is not None:
                    raise ShapingError(f"suffix {s!r} is claimed by both provider {other.name} and {p.name}")
                index[s] = p
        return cls(providers, tuple(rules), tuple(files), MappingProxyType(index))

    def provider(self, name: str) -> Provider | None:
        for p in self.providers:
            if p.name == name:
                return p
        return None

    def provider_of(self, host: str) -> Provider | None:
        """The provider whose suffix HOST ends in (the longest one), or None. O(labels of HOST)."""
        name = host.lower().rstrip(".")
        while name:
            found = self._by_suffix.get(name)
            if found is not None:
                return found
            name = name.partition(".")[2]
        return None

    def provider_for(self, hosts: Iterable[str]) -> Provider | None:
        """The provider every one of HOSTS (a route's most preferred MX hosts) belongs to; None when
        one host is no provider's, or they are two providers'."""
        found: Provider | None = None
        for host in hosts:
            p = self.provider_of(host)
            if p is None or (found is not None and p is not found):
                return None
            found = p
        return found

    def __len__(self) -> int:
        return len(self.providers) + len(self.rules)


def site_name(provider: str) -> str:
    return SITE_PREFIX + provider


# -- automation ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One automation change in force at a site: what rule, what it does, since and until when
    (monotonic seconds, as `now` is given)."""

    site: str
    provider: str
    rule: str
    action: str
    since: float
    until: float
    tenant_id: int | None = None  # action suspend_tenant: whose mail is held
    reply: str = ""  # the code of the reply that fired it ("421 4.7.0")
    connection_limit: int | None = None
    messages_per_connection: int | None = None
    rate: tuple[float, float] | None = None
    rate_text: str = ""

    @property
    def key(self) -> tuple[str, str, int | None]:
        return (self.site, self.rule, self.tenant_id)


class Automation:
    """The automation state of one process: hit counters and the changes in force. Feed it every
    remote reply that is no delivery (observe), end what is due (expire); ask it what a site's
    limits are now (limits) and whether a job is held (suspension)."""

    def __init__(self, rules: Iterable[Rule] = ()):
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.active: dict[tuple[str, str, int | None], Change] = {}
        self._hits: dict[tuple[str, str, int | None], deque[float]] = {}
        self._by_site: dict[str, list[Change]] = {}

    def set_rules(self, rules: Iterable[Rule]) -> None:
        """New rules (a reload): the changes in force run their course; counts of rules gone are dropped."""
        self.rules = tuple(rules)
        names = {r.name for r in self.rules}
        self._hits = {k: v for k, v in self._hits.items() if k[1] in names}

    def observe(
        self, site: str, provider: str, tenant_id: int | None, code: int, enhanced: str, text: str, now: float
    ) -> list[Change]:
        """One reply from SITE (of PROVIDER, "" for none) to TENANT_ID's mail (None when it was no
        transaction's): the changes that start now. A rule whose change is in force counts nothing
        until it ends; a suspend_tenant rule counts only replies to a tenant's mail, per tenant."""
        started: list[Change] = []
        for rule in self.rules:
            if not rule.applies(provider) or not rule.matches(code, enhanced, text):
                continue
            if rule.action == "suspend_tenant" and tenant_id is None:
                continue
            key = (site, rule.name, tenant_id if rule.action == "suspend_tenant" else None)
            if key in self.active:
                continue
            if rule.count > 1:
                hits = self._hits.get(key)
                if hits is None:
                    if len(self._hits) >= MAX_COUNTERS:
                        self._sweep(now)
                    hits = self._hits[key] = deque()
                hits.append(now)
                while hits and hits[0] <= now - rule.period_s:
                    hits.popleft()
                if len(hits) < rule.count:
                    continue
                del self._hits[key]
            change = Change(
                site, provider, rule.name, rule.action, now, now + rule.duration_s, key[2], _reply(code, enhanced),
                rule.connection_limit, rule.messages_per_connection, rule.rate, rule.rate_text,
            )  # fmt: skip
            self.active[key] = change
            self._by_site.setdefault(site, []).append(change)
            started.append(change)
        return started

    def expire(self, now: float) -> list[Change]:
        """The changes whose time is up at NOW, taken out of force (their sites are as configured again)."""
        ended = [c for c in self.active.values() if c.until <= now]
        for c in ended:
            del self.active[c.key]
            left = [x for x in self._by_site.get(c.site, ()) if x is not c]
            if left:
                self._by_site[c.site] = left
            else:
                self._by_site.pop(c.site, None)
        return sorted(ended, key=lambda c: (c.until, c.site, c.rule))

    def next_end(self) -> float | None:
        """When the first change in force ends (None: nothing is in force)."""
        return min((c.until for c in self.active.values()), default=None)

    def changes(self, site: str) -> list[Change]:
        return list(self._by_site.get(site, ()))

    def suspension(self, site: str, tenant_id: int, now: float) -> Change | None:
        """The suspension holding TENANT_ID's mail at SITE at NOW (the site's own first), or None."""
        for c in self._by_site.get(site, ()):
            if c.until > now and (c.action == "suspend" or (c.action == "suspend_tenant" and c.tenant_id == tenant_id)):
                return c
        return None

    def limits(self, site: str, configured: Limits) -> Limits:
        """SITE's limits now: each value a "limit" change in force sets (the lowest, when several
        do), the CONFIGURED one for the rest."""
        sets = [c for c in self._by_site.get(site, ()) if c.action == "limit"]
        if not sets:
            return configured
        conns = [c.connection_limit for c in sets if c.connection_limit is not None]
        per_conn = [c.messages_per_connection for c in sets if c.messages_per_connection is not None]
        rates = [c.rate for c in sets if c.rate is not None]
        if configured.rate[0] > 0:  # (0, 0) is no rate at all: a rule's rate only ever tightens it
            rates.append(configured.rate)
        return replace(  # a "limit" rule lowers a value, never raises it above the configured one
            configured,
            connection_limit=min([*conns, configured.connection_limit]),
            messages_per_connection=min([*per_conn, configured.messages_per_connection]),
            rate=min(rates, key=lambda r: r[0] / r[1]) if rates else configured.rate,
        )

    def _sweep(self, now: float) -> None:
        """Drop counters with no hit left in their rule's period."""
        periods = {r.name: r.period_s for r in self.rules}
        self._hits = {k: v for k, v in self._hits.items() if v and v[-1] > now - periods.get(k[1], 0.0)}


def _reply(code: int, enhanced: str) -> str:
    return f"{code} {enhanced}".strip()


# -- the files -------------------------------------------------------------------------------------


def parse_shaping(text: str, origin: str) -> tuple[list[Provider], list[Rule]]:
    """The [provider.NAME] tables and [[automation]] rules of a shaping file; ShapingError names ORIGIN."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ShapingError(f"{origin}: not valid TOML: {exc}") from None
    unknown = set(data) - {"provider", "automation"}
    if unknown:
        raise ShapingError(
            f"{origin}: unknown key {sorted(unknown)[0]!r} (expected [provider.NAME] and [[automation]])"
        )
    providers = data.get("provider", {})
    if not isinstance(providers, dict):
        raise ShapingError(f"{origin}: provider: expected [provider.NAME] tables")
    rules = data.get("automation", [])
    if not isinstance(rules, list):
        raise ShapingError(f"{origin}: automation: expected [[automation]] tables")
    parsed = [_provider(name, item, f"{origin}: provider {name}") for name, item in providers.items()]
    names = [_rule_name(item, f"{origin}: automation rule {n}") for n, item in enumerate(rules, 1)]
    out = [_rule(item, f"{origin}: automation rule {name!r}") for name, item in zip(names, rules, strict=True)]
    seen: set[str] = set()
    for r in out:
        if r.name in seen:
            raise ShapingError(f"{origin}: automation rule {r.name!r}: a second rule of that name")
        seen.add(r.name)
    return parsed, out


def _keys(item: Any, known: tuple[str, ...], where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise ShapingError(f"{where}: expected a table")
    unknown = sorted(set(item) - set(known))
    if unknown:
        raise ShapingError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(known)})")
    return item


def _count(item: dict[str, Any], key: str, where: str, low: int, high: int) -> int | None:
    value = item.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ShapingError(f"{where}: {key}: expected a whole number from {low} to {high}, got {value!r}")
    return value


def _rate(item: dict[str, Any], where: str) -> tuple[tuple[float, float] | None, str]:
    value = item.get("rate")
    if value is None:
        return None, ""
    try:
        if not isinstance(value, str):
            raise ValueError
        rate = parse_rate(value)
    except ValueError:
        raise ShapingError(
            f'{where}: rate: expected a rate like "10/s" or "600/m" ("" for none), got {value!r}'
        ) from None
    return rate, value


def _duration(item: dict[str, Any], key: str, where: str, default: float | None = None) -> float:
    value = item.get(key)
    if value is None:
        if default is None:
            raise ShapingError(f'{where}: {key}: required (a duration like "90s" or "30m")')
        return default
    try:
        return parse_duration(value)
    except ValueError:
        raise ShapingError(f'{where}: {key}: expected a duration like "90s" or "30m", got {value!r}') from None


def _source(item: dict[str, Any], where: str) -> str:
    source = item.get("source", "")
    if not isinstance(source, str):
        raise ShapingError(f"{where}: source: expected a string (where the number is published)")
    return source


def _provider(name: str, item: Any, where: str) -> Provider:
    if not _NAME.match(name):
        raise ShapingError(f"{where}: expected a name of lower-case letters, digits, '-', '_' or '.'")
    item = _keys(item, _PROVIDER_KEYS, where)
    suffixes = item.get("suffixes")
    if not isinstance(suffixes, list) or not suffixes or not all(isinstance(s, str) for s in suffixes):
        raise ShapingError(f'{where}: suffixes: expected a list of MX host suffixes like ["google.com"]')
    clean = []
    for s in suffixes:
        s = s.strip().lower().strip(".")
        if not _SUFFIX.match(s) or "." not in s:
            raise ShapingError(f"{where}: suffixes: {s!r} is not a host name suffix with a dot, like google.com")
        clean.append(s)
    rate, rate_text = _rate(item, where)
    limits = Limits(
        connection_limit=_count(item, "connection_limit", where, 1, 10_000) or 0,
        messages_per_connection=_count(item, "messages_per_connection", where, 1, 100_000) or 0,
        recipients_per_connection=_count(item, "recipients_per_connection", where, 1, 1_000_000) or 0,
        recipients_per_transaction=_count(item, "recipients_per_transaction", where, 1, 1000) or 0,
        rate=rate or (0.0, 0.0),
    )
    return Provider(name, tuple(clean), limits, rate_text, _source(item, where))


def _rule_name(item: Any, where: str) -> str:
    name = item.get("name") if isinstance(item, dict) else None
    if not isinstance(name, str) or not _NAME.match(name):
        raise ShapingError(f"{where}: name: expected a name of lower-case letters, digits, '-', '_' or '.'")
    return name


def _rule(item: Any, where: str) -> Rule:
    item = _keys(item, _RULE_KEYS, where)
    pattern = item.get("text")
    if not isinstance(pattern, str) or not pattern:
        raise ShapingError(f"{where}: text: expected a regular expression")
    try:
        regex = re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise ShapingError(f"{where}: text: bad regular expression {pattern!r}: {exc}") from None
    providers = item.get("providers", [])
    if not isinstance(providers, list) or not all(isinstance(p, str) and _NAME.match(p) for p in providers):
        raise ShapingError(f'{where}: providers: expected a list of provider names like ["gmail"]')
    codes = item.get("codes", [])
    if not isinstance(codes, list) or not all(
        isinstance(c, int) and not isinstance(c, bool) and 400 <= c <= 599 for c in codes
    ):
        raise ShapingError(f"{where}: codes: expected a list of 4xx or 5xx reply codes like [421, 451], got {codes!r}")
    enhanced = item.get("enhanced", [])
    if not isinstance(enhanced, list) or not all(isinstance(e, str) and _ENHANCED_PATTERN.match(e) for e in enhanced):
        raise ShapingError(f'{where}: enhanced: expected a list like ["4.7.0", "X.7.28"], got {enhanced!r}')
    action = item.get("action")
    if action not in ACTIONS:
        raise ShapingError(f"{where}: action: expected one of {', '.join(ACTIONS)}, got {action!r}")
    count = _count(item, "count", where, 1, 1_000_000) or 1
    period = _duration(item, "period", where, 0.0 if count == 1 else None)
    if count > 1 and period <= 0:
        raise ShapingError(f"{where}: period: a count above 1 needs a period above 0")
    duration = _duration(item, "duration", where)
    # at most a day: held mail counts no attempt and never expires while held, but its lifetime runs on,
    # and a hold of days would leave a message no time for the real attempts after it
    if not 1.0 <= duration <= 86400.0:
        raise ShapingError(f"{where}: duration: expected from 1s to 1d, got {duration:g}s")
    rate, rate_text = _rate(item, where)
    if rate == (0.0, 0.0):
        raise ShapingError(f'{where}: rate: an automation rule sets a rate like "1/s", never "" (no limit)')
    sets = {
        "connection_limit": _count(item, "connection_limit", where, 1, 10_000),
        "messages_per_connection": _count(item, "messages_per_connection", where, 1, 100_000),
    }
    if action == "limit" and rate is None and all(v is None for v in sets.values()):
        raise ShapingError(f"{where}: action limit: set connection_limit, messages_per_connection or rate")
    if action != "limit" and (rate is not None or any(v is not None for v in sets.values())):
        raise ShapingError(f"{where}: action {action}: sets no limit (connection_limit, ... are for action limit)")
    return Rule(
        str(item["name"]), regex, action, duration, tuple(providers), frozenset(codes), tuple(enhanced), count, period,
        sets["connection_limit"], sets["messages_per_connection"], rate, rate_text, _source(item, where),
    )  # fmt: skip


def load_shaping(override: Path | None = None, shipped: Path = SHIPPED_SHAPING) -> Shaping:
    """The OVERRIDE file (when given) over the SHIPPED one. Blocking (reads files): call it off the
    event loop. ShapingError when a file cannot be read, holds a bad entry, or a rule names a
    provider neither file has."""
    texts: list[tuple[Path, str]] = []
    for path in (override, shipped):
        if path is None:
            continue
        try:
            texts.append((path, path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            raise ShapingError(f"{path}: cannot read the shaping file: {exc}") from None
    providers: dict[str, Provider] = {}
    rules: dict[str, Rule] = {}
    origins: dict[str, str] = {}
    for path, text in texts:  # the override first: what it names, the shipped file does not change
        got_providers, got_rules = parse_shaping(text, str(path))
        for p in got_providers:
            providers.setdefault(p.name, p)
            origins.setdefault(f"provider {p.name}", str(path))
        for r in got_rules:
            rules.setdefault(r.name, r)
            origins.setdefault(f"rule {r.name}", str(path))
    for r in rules.values():
        for name in r.providers:
            if name not in providers:
                raise ShapingError(f"{origins[f'rule {r.name}']}: automation rule {r.name!r}: no provider {name!r}")
    try:
        return Shaping.of(providers.values(), rules.values(), (str(p) for p, _ in texts))
    except ShapingError as exc:
        raise ShapingError(f"{', '.join(str(p) for p, _ in texts)}: {exc}") from None
