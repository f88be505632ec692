"""Where a domain's mail goes: static routes, MX records, implicit MX, null MX; cached by TTL.

A route is a list of preference groups of hosts, each host with every address it has. The
site name (the sorted set of MX host names, as KumoMTA names its sites) is what ready
queues and connection limits are kept per: two domains hosted on the same MX share one.

A domain whose most preferred MX hosts (the first preference group that has addresses) all end in
one provider's suffix (cmcd/shaping.py) goes to the site "provider:NAME" instead (MX rollup): every
domain that provider hosts shares one ready queue and its limits, while each keeps its own hosts
(Route.hop) to connect to. Static routes, implicit MX and domains with a [delivery.domains] entry
of their own are never rolled up. The match is made once per lookup and cached with the route.

An address that is one of cmcd's own SMTP listeners is never a next hop: it is left out of
the route, and a route with nothing else bounces with 5.4.6 "loops back to myself" (as
Postfix does), whether it came from [delivery.routes] or from DNS.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import random
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from cmcd.config import Config, split_hostport
from cmcd.intl import to_alabel
from cmcd.policy import Outcome, network_fault, permanent_failure
from cmcd.shaping import Shaping, site_name

log = logging.getLogger("cmcd.routing")

NEGATIVE_TTL = 300.0  # how long an NXDOMAIN or null MX answer is kept
MAX_TTL = 3600.0
MIN_TTL = 5.0


@dataclass(frozen=True)
class Host:
    name: str
    addresses: tuple[str, ...]
    port: int


@dataclass(frozen=True)
class Route:
    site: str  # the ready queue and limits it shares
    groups: tuple[tuple[Host, ...], ...]  # by preference; hosts within a group are equal
    hop: str = ""  # the sorted MX host names (a connection carries jobs of one hop only); "": the site's
    provider: str = ""  # the provider of a rolled-up site ("" for none)

    @property
    def next_hop(self) -> str:
        return self.hop or self.site

    def attempt_order(self, rand: random.Random | None = None) -> Iterator[tuple[Host, str]]:
        """Every (host, address) to try, best preference first, equal preferences shuffled, each
        host's addresses together (all of them before the next host)."""
        r = rand or random
        for group in self.groups:
            hosts = list(group)
            r.shuffle(hosts)
            for host in hosts:
                for address in host.addresses:
                    yield host, address


def _ip(value: str) -> str | None:
    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        return None


def is_local_address(ip: str) -> bool:
    """Whether IP is an address of this host (loopback, or one bound to an interface): binding a
    socket to it works only then (no connection is made, nothing is sent)."""
    addr = ipaddress.ip_address(ip)
    if addr.is_loopback:
        return True
    if addr.is_unspecified or addr.is_multicast:
        return False
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
        return True
    except OSError as exc:
        if exc.errno != errno.EADDRNOTAVAIL:
            log.warning("event=local_address_check_failed ip=%s error=%r", ip, str(exc))
        return False


class OwnListeners:
    """The daemon's own SMTP listening addresses ("ip:port", as bound): which next hops are itself."""

    def __init__(self, bound: list[str] | tuple[str, ...] = ()):
        self.exact: set[tuple[str, int]] = set()
        self.any_ports: set[int] = set()  # ports listened on at 0.0.0.0 or [::]: every local address
        self._local: dict[str, bool] = {}
        for hp in bound:
            host, port = split_hostport(hp)
            ip = _ip(host)
            if ip is None:
                continue
            if ipaddress.ip_address(ip).is_unspecified:
                self.any_ports.add(port)
            else:
                self.exact.add((ip, port))

    def __contains__(self, target: tuple[str, int]) -> bool:
        ip, port = target
        if (ip, port) in self.exact:
            return True
        if port not in self.any_ports:
            return False
        if ip not in self._local:
            self._local[ip] = is_local_address(ip)
        return self._local[ip]


def make_resolver(config: Config) -> dns.asyncresolver.Resolver:
    """dnspython's async resolver on dns.nameservers (ip:port each), or the system's when none is set."""
    if config.dns.nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        servers: list[str | dns.nameserver.Nameserver] = []
        for hp in config.dns.nameservers:
            host, port = split_hostport(hp)
            servers.append(dns.nameserver.Do53Nameserver(host, port))
        resolver.nameservers = servers
    else:
        resolver = dns.asyncresolver.Resolver()
    resolver.lifetime = config.dns.timeout
    resolver.timeout = max(0.5, config.dns.timeout / 2)
    return resolver


class Router:
    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic, shaping: Shaping | None = None):
        self.config = config
        self.shaping = shaping or Shaping()  # providers for the MX rollup (none: no rollup)
        self.clock = clock
        self.port = config.delivery.port
        self.routes = dict(config.delivery.routes)
        self.resolver = make_resolver(config)
        self._cache: dict[str, tuple[float, Route | Outcome]] = {}
        self._pending: dict[str, asyncio.Future[Route | Outcome]] = {}
        self.lookups = 0
        self.own = OwnListeners()

    def set_own_listeners(self, bound: list[str]) -> None:
        """The SMTP addresses the daemon listens on, once bound: next hops that would loop."""
        self.own = OwnListeners(bound)
        self._cache.clear()

    async def resolve(self, domain: str) -> Route | Outcome:
        """The route for DOMAIN, or the Outcome (bounced or deferred) for all its recipients."""
        cached = self._cache.get(domain)
        if cached is not None and cached[0] > self.clock():
            return cached[1]
        pending = self._pending.get(domain)
        if pending is not None:  # one lookup per domain at a time, however many messages wait
            return await asyncio.shield(pending)
        fut: asyncio.Future[Route | Outcome] = asyncio.get_running_loop().create_future()
        self._pending[domain] = fut
        try:
            result, ttl = await self._lookup(domain)
            if isinstance(result, Route):
                result = self._without_self(domain, result)
        except Exception as exc:  # a bug in a lookup must not take delivery down
            log.exception("event=route_lookup_error domain=%s", domain)
            result, ttl = network_fault(f"route lookup failed: {exc!r}", "4.4.3"), 0.0
        finally:
            del self._pending[domain]
        if ttl > 0:
            self._cache[domain] = (self.clock() + min(MAX_TTL, max(MIN_TTL, ttl)), result)
        fut.set_result(result)
        return result

    def _without_self(self, domain: str, route: Route) -> Route | Outcome:
        """ROUTE without the addresses that are cmcd's own listeners; a bounce when none is left."""
        groups: list[tuple[Host, ...]] = []
        dropped: list[str] = []
        for group in route.groups:
            hosts = []
            for host in group:
                keep = tuple(a for a in host.addresses if (a, host.port) not in self.own)
                dropped += [f"{host.name}[{a}]:{host.port}" for a in host.addresses if a not in keep]
                if keep:
                    hosts.append(Host(host.name, keep, host.port))
            if hosts:
                groups.append(tuple(hosts))
        if not dropped:
            return route
        if not groups:
            log.warning("event=mail_loop check=own_address domain=%s next_hop=%s", domain, ",".join(dropped))
            return permanent_failure(
                "5.4.6", f"mail for {domain} loops back to myself ({', '.join(dropped)} is this server)"
            )
        log.warning("event=next_hop_skipped domain=%s next_hop=%s reason=own_address", domain, ",".join(dropped))
        return Route(route.site, tuple(groups), route.hop, route.provider)

    def set_shaping(self, shaping: Shaping) -> None:
        """New providers (a reload): every cached route is dropped, so each is matched again."""
        self.shaping = shaping
        self._cache.clear()

    def reconfigure(self, config: Config) -> None:
        """New routes and port; every cached answer is dropped (the resolver itself needs a restart)."""
        self.config = config
        self.port = config.delivery.port
        self.routes = dict(config.delivery.routes)
        self._cache.clear()

    def cached(self, domain: str) -> Route | Outcome | None:
        entry = self._cache.get(domain)
        return entry[1] if entry is not None and entry[0] > self.clock() else None

    def forget(self, domain: str | None = None) -> None:
        if domain is None:
            self._cache.clear()
        else:
            self._cache.pop(domain, None)

    async def _lookup(self, domain: str) -> tuple[Route | Outcome, float]:
        own_policy = domain in self.config.delivery.domains
        try:  # DNS and the routes table know a domain by its A-labels (RFC 5890); intake keys recipients so
            domain = to_alabel(domain)
        except ValueError as exc:
            return permanent_failure("5.1.2", str(exc)), NEGATIVE_TTL
        own_policy = own_policy or domain in self.config.delivery.domains
        static = self.routes.get(domain) or self.routes.get("*")
        if static is not None:
            host, port = split_hostport(static)
            ip = _ip(host)
            if ip is not None:
                return Route(f"route:{static}", ((Host(host, (ip,), port),),)), MAX_TTL
            addresses, ttl, problem = await self._addresses(host)
            if not addresses:
                return problem or network_fault(f"route host {host} has no address", "4.4.3"), 0.0
            return Route(f"route:{static}", ((Host(host, addresses, port),),)), ttl
        self.lookups += 1
        try:
            answer = await self.resolver.resolve(domain, "MX", raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return permanent_failure("5.1.2", f"domain {domain} does not exist (NXDOMAIN)"), NEGATIVE_TTL
        except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout) as exc:
            return network_fault(f"DNS lookup of {domain} MX failed: {type(exc).__name__}", "4.4.3"), 0.0
        mx_ttl = float(answer.rrset.ttl) if answer.rrset is not None else NEGATIVE_TTL
        records = sorted(
            ((r.preference, r.exchange.to_text(omit_final_dot=True).lower()) for r in answer.rrset or ()),
        )
        if not records:  # no MX: the domain itself is the implicit MX (RFC 5321 5.1)
            addresses, ttl, problem = await self._addresses(domain)
            if not addresses:
                return problem or permanent_failure("5.1.2", f"domain {domain} has no MX and no address"), ttl
            return Route(f"implicit:{domain}", ((Host(domain, addresses, self.port),),)), ttl
        if len(records) == 1 and records[0][1] in ("", "."):
            return permanent_failure("5.1.10", f"domain {domain} accepts no mail (null MX, RFC 7505)"), mx_ttl
        names = [name for _, name in records if name not in ("", ".")]
        looked = await asyncio.gather(*(self._addresses(n) for n in names))
        found = dict(zip(names, looked))
        groups: list[tuple[Host, ...]] = []
        ttl = mx_ttl
        for pref in sorted({p for p, _ in records}):
            hosts = []
            for p, name in records:
                if p != pref or name not in found:
                    continue
                addresses, host_ttl, _ = found[name]
                if addresses:
                    hosts.append(Host(name, addresses, self.port))
                    ttl = min(ttl, host_ttl)
            if hosts:
                groups.append(tuple(hosts))
        if not groups:
            problems = [found[n][2] for n in names]
            if problems and all(p is not None and p.verdict == "bounced" for p in problems):
                # every MX host name does not exist (NXDOMAIN): as Postfix, a bounce, not 5 days of retries
                missing = ", ".join(names)
                return permanent_failure("5.4.4", f"MX host {missing} of {domain} does not exist (NXDOMAIN)"), 0.0
            return network_fault(f"no MX host of {domain} has an address", "4.4.3"), 0.0
        hop = ",".join(sorted(names))
        provider = None if own_policy else self.shaping.provider_for(h.name for h in groups[0])
        if provider is not None:
            return Route(site_name(provider.name), tuple(groups), hop, provider.name), ttl
        return Route(hop, tuple(groups)), ttl

    async def _addresses(self, name: str) -> tuple[tuple[str, ...], float, Outcome | None]:
        """A and AAAA of NAME (IPv4 first), the smaller TTL, and a failure when there is none."""
        ip = _ip(name)
        if ip is not None:
            return (ip,), MAX_TTL, None
        out: list[str] = []
        ttl = MAX_TTL
        temporary = False
        nxdomain = 0
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self.resolver.resolve(name, rdtype, raise_on_no_answer=False)
            except dns.resolver.NXDOMAIN:
                nxdomain += 1
                continue
            except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout):
                temporary = True
                continue
            if answer.rrset is not None:
                out += [r.to_text() for r in answer.rrset]
                ttl = min(ttl, float(answer.rrset.ttl))
        if out:
            return tuple(out), ttl, None
        if temporary:
            return (), 0.0, network_fault(f"DNS lookup of {name} failed", "4.4.3")
        if nxdomain:
            return (), NEGATIVE_TTL, permanent_failure("5.1.2", f"host {name} does not exist (NXDOMAIN)")
        return (), NEGATIVE_TTL, None
