"""Looks a domain's records up in DNS, through the daemon's resolver (dns.nameservers), and says
record by record what is published, missing or different; never changes a key (the tenancy
command `Domains.check` records what this found). Used by both doors that run a check: cmcctl's
`domain check` (cmcd/admin/domain_verbs.py) and the console's Domains page.
"""

from __future__ import annotations

from typing import Any

import dns.asyncresolver
import dns.exception
import dns.resolver


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
