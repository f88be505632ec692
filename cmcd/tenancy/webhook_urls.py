"""Which webhook URLs cmcd may post to (the SSRF guard), and webhook signing secrets; never
connects anywhere but the DNS resolver it is given.

check_url runs when an endpoint is added (cmcd.tenancy.webhooks, for the admin socket and the API
alike) and before every request the dispatcher (cmcd.api.webhooks) makes: http or https, no
userinfo, and every address of the host (looked up through the resolver handed in, the daemon's
on dns.nameservers, never the system's) public unless api.webhook_allow_private. The Target it
returns holds the addresses checked, so a request connects only to them and a DNS answer that
changes in between cannot send it elsewhere.
"""

from __future__ import annotations

import ipaddress
import secrets
import urllib.parse
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.resolver

from cmcd.errors import CmcdError

AnyAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
#: what a tenant is told about a URL refused for its host's addresses: nothing the daemon's
#: resolver learned (so it cannot be used to map internal names)
HOST_NOT_PUBLIC = (
    "the URL's host does not resolve to public addresses only (loopback, private and link-local "
    "addresses are refused, api.webhook_allow_private allows them)"
)
SECRET_PREFIX = "whsec_"


class WebhookUrlError(CmcdError):
    """A webhook URL that may not be used: malformed, or its host is refused by the SSRF guard.

    str() is the whole reason (for the operator and the operation log); `public` is what the
    tenant who gave the URL may be told: a problem with the URL's form as it is, a problem with
    its host's addresses (what it resolves to, or that it does not) only as HOST_NOT_PUBLIC."""

    def __init__(self, reason: str, *, about_host: bool = False):
        super().__init__(reason)
        self.about_host = about_host

    @property
    def public(self) -> str:
        return HOST_NOT_PUBLIC if self.about_host else str(self)


def _plain_reason(ip: AnyAddress) -> str | None:
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "non-public"
    return None


def refused_reason(address: str | AnyAddress) -> str | None:
    """Why a webhook may not connect to ADDRESS ("loopback", "private", ...), or None when it is
    public. IPv6 forms that carry an IPv4 address (mapped, NAT64, 6to4, Teredo) are judged by it."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return _plain_reason(ip.ipv4_mapped)
        if ip in _NAT64:
            return _plain_reason(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        embedded = ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            inner = _plain_reason(embedded)
            if inner is not None:
                return inner
    return _plain_reason(ip)


@dataclass(frozen=True)
class Target:
    """A URL that passed the guard: the host to send as (Host, SNI) and the addresses to connect to."""

    url: str
    host: str
    port: int
    addresses: tuple[str, ...]


def split_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a webhook URL, or WebhookUrlError saying what is wrong."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookUrlError(f"{url!r} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise WebhookUrlError(f"{url!r}: a webhook URL must start with https:// or http://")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise WebhookUrlError(f"{url!r}: a webhook URL must not carry a user name or password")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise WebhookUrlError(f"{url!r}: a webhook URL needs a host name or IP address")
    if any(c.isspace() for c in url):
        raise WebhookUrlError(f"{url!r}: a webhook URL must not contain white space")
    if not host.isascii():  # one spelling for the check and the request: the name as DNS carries it
        raise WebhookUrlError(f"{url!r}: write an internationalised host name in its ASCII form (xn--...)")
    return parts.scheme, host.lower(), port or (443 if parts.scheme == "https" else 80)


async def _addresses(host: str, resolver: dns.asyncresolver.Resolver) -> list[str]:
    out: list[str] = []
    failed = ""
    for rdtype in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(host, rdtype, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            raise WebhookUrlError(f"host {host} does not exist (NXDOMAIN)", about_host=True) from None
        except dns.exception.DNSException as exc:
            failed = type(exc).__name__
            continue
        out += [r.to_text() for r in answer.rrset or ()]
    if not out:
        why = f"the DNS lookup failed ({failed})" if failed else "it has no A or AAAA record"
        raise WebhookUrlError(f"host {host} has no address: {why}", about_host=True)
    return out


async def check_url(url: str, resolver: dns.asyncresolver.Resolver, allow_private: bool) -> Target:
    """URL's target if it may be used, else WebhookUrlError naming the reason. An IP literal is
    taken as it is; a name is resolved (A and AAAA) and refused if ANY address is not public."""
    _, host, port = split_url(url)
    try:
        literal: AnyAddress | None = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        literal = None
    addresses = [str(literal)] if literal is not None else await _addresses(host.lower(), resolver)
    if not allow_private:
        for address in addresses:
            reason = refused_reason(address)
            if reason is not None:
                said = f"{address} is" if literal is not None else f"{host} resolves to {address},"
                raise WebhookUrlError(
                    f"{url}: {said} a {reason} address; set api.webhook_allow_private to allow", about_host=True
                )  # fmt: skip
    return Target(url, host.strip("[]"), port, tuple(addresses))


def new_secret() -> str:
    """A webhook signing secret (256 bits), shown to its owner once."""
    return SECRET_PREFIX + secrets.token_hex(32)
