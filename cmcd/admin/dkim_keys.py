"""DKIM key administration: new keys and selectors, the DNS records to publish, and checking them.

Key generation (RSA takes tens of milliseconds) runs in a worker thread; nothing here logs or
returns a private key.
"""

from __future__ import annotations

import time
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.resolver

from cmcd.config import DkimConfig
from cmcd.dkim import DkimKey
from cmcd.store.store import NewKey

PUBLISHED_STATES = ("pending", "active", "standby")


def _selector(fmt: str, now: float, taken: set[str]) -> str:
    base = time.strftime(fmt, time.gmtime(now)).lower()
    selector, n = base, 2
    while selector in taken:
        selector, n = f"{base}{n}", n + 1
    taken.add(selector)
    return selector


def new_keys(cfg: DkimConfig, domain: str, taken: set[str], now: float) -> list[NewKey]:
    """An RSA key (and an Ed25519 key unless turned off) with selectors not yet used for DOMAIN."""
    made = [DkimKey.generate_rsa(domain, _selector(cfg.rsa_selector, now, taken), cfg.rsa_bits)]
    if cfg.ed25519:
        made.append(DkimKey.generate_ed25519(domain, _selector(cfg.ed25519_selector, now, taken)))
    return [NewKey(k.selector, k.algorithm, k.private_pem(), k.dns_txt()) for k in made]


def imported_key(domain: str, selector: str, pem: bytes) -> NewKey:
    k = DkimKey.from_pem(domain, selector, pem)  # ValueError names what is wrong with the PEM
    return NewKey(k.selector, k.algorithm, k.private_pem(), k.dns_txt())


def _strings(value: str) -> list[str]:
    return [value[i : i + 255] for i in range(0, len(value), 255)]


def records(domain: str, keys: list[dict[str, Any]], hostname: str) -> list[dict[str, Any]]:
    """What to publish: one TXT per DKIM key that is pending, active or standby, and suggestions
    for SPF (this host may send for the domain) and DMARC (report-only to start with)."""
    out = []
    for k in keys:
        if k["state"] not in PUBLISHED_STATES:
            continue
        out.append(
            {
                "name": f"{k['selector']}._domainkey.{domain}",
                "type": "TXT",
                "value": k["public_txt"],
                "strings": _strings(k["public_txt"]),
                "purpose": f"DKIM {k['algorithm']} key, {k['state']}",
                "selector": k["selector"],
            }
        )
    spf = f"v=spf1 a:{hostname} ~all"
    dmarc = f"v=DMARC1; p=none; rua=mailto:dmarc-reports@{domain}; adkim=r; aspf=r"
    out.append({"name": domain, "type": "TXT", "value": spf, "strings": [spf], "purpose": "SPF (suggested)"})
    out.append(
        {"name": f"_dmarc.{domain}", "type": "TXT", "value": dmarc, "strings": [dmarc], "purpose": "DMARC (suggested)"}
    )
    return out


def zone_lines(recs: list[dict[str, Any]]) -> list[str]:
    """The records in zone-file syntax, long values split into 255-byte strings."""
    lines = []
    for r in recs:
        quoted = " ".join(f'"{s}"' for s in r["strings"])
        value = f"( {quoted} )" if len(r["strings"]) > 1 else quoted
        lines.append(f"; {r['purpose']}")
        lines.append(f"{r['name']}. 3600 IN TXT {value}")
    return lines


def _tags(value: str) -> dict[str, str]:
    tags = {}
    for part in value.split(";"):
        name, eq, v = part.strip().partition("=")
        if eq:
            tags[name.strip().lower()] = "".join(v.split())
    return tags


async def _txt(resolver: dns.asyncresolver.Resolver, name: str) -> list[str] | str:
    """Every TXT value at NAME (strings joined), or the reason there is none."""
    try:
        answer = await resolver.resolve(name, "TXT", raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return "no such name"
    except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
        return f"lookup failed ({type(exc).__name__})"
    if answer.rrset is None:
        return "no TXT record"
    return [b"".join(r.strings).decode("utf-8", "replace") for r in answer.rrset]


async def check(resolver: dns.asyncresolver.Resolver, recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Record by record: published (matches), missing, or mismatch (something else is there)."""
    out = []
    for r in recs:
        found = await _txt(resolver, r["name"])
        result = {"name": r["name"], "purpose": r["purpose"], "expected": r["value"]}
        if isinstance(found, str):
            out.append(result | {"status": "missing", "found": [], "detail": found})
            continue
        if "selector" in r:  # DKIM: the published p= must be this key's
            want = _tags(r["value"])
            same = [f for f in found if _tags(f).get("p") == want["p"] and _tags(f).get("k", "rsa") == want["k"]]
            status = "published" if same else ("mismatch" if found else "missing")
            detail = "" if same else "the published key is not this key" if found else "no TXT record"
        elif r["purpose"].startswith("SPF"):
            spf = [f for f in found if f.lower().startswith("v=spf1")]
            status = "published" if r["value"] in spf else ("differs" if spf else "missing")
            detail = "" if status == "published" else "an SPF record exists but differs" if spf else "no SPF record"
        else:
            dm = [f for f in found if f.lower().startswith("v=dmarc1")]
            status = "published" if dm else "missing"
            detail = "" if dm else "no DMARC record"
        out.append(result | {"status": status, "found": found, "detail": detail})
    return out
