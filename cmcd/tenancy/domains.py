"""Tenancy commands for a tenant's sending domains and their DKIM key lifecycle: add (with the
first keys), import a key, rotate (new keys, pending), activate (pending to active, the keys they
replace to standby), retire (standby keys lose their private part), and the DNS state a check
found; plus the records to publish for them. Never looks anything up in DNS: the door does the
lookup and hands the command a function that does it (`check`).

Key making (RSA takes tens of milliseconds) runs in a worker thread; nothing here logs or returns
a private key. Each change is one transaction with its operation-log row and the directory
version, so the DKIM signer of every process holds the keys as they are when a command returns.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import cmcd.tenancy.rules as rules
from cmcd.config import DkimConfig
from cmcd.dkim import DkimKey
from cmcd.records import Domain
from cmcd.store.domain_store import NewKey
from cmcd.store.store import Store
from cmcd.tenancy.core import Core, Op
from cmcd.tenancy.refusals import invalid

T = TypeVar("T")

#: key states whose TXT record is to be published
PUBLISHED_STATES = ("pending", "active", "standby")
#: what a DNS check may find for a key; other results (a lookup that failed) change no key's state
DNS_STATES = ("published", "missing", "mismatch")

Record = dict[str, Any]
#: the door's DNS lookup: the records to publish -> one result each, with a "status" (DNS_STATES or other)
Lookup = Callable[[list[Record]], Awaitable[list[Record]]]


def domain_name(name: str) -> str:
    """NAME as the store keeps domains: lower case, no trailing dot (no other check: a name that
    is no domain is simply not found)."""
    return name.strip().lower().rstrip(".")


# -- keys and records (pure, or CPU only) ------------------------------------------------------


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


def records(domain: str, keys: list[dict[str, Any]], hostname: str) -> list[Record]:
    """What to publish: one TXT per DKIM key that is pending, active or standby, and suggestions
    for SPF (HOSTNAME may send for the domain) and DMARC (report-only to start with)."""
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


def zone_lines(recs: list[Record]) -> list[str]:
    """The records in zone-file syntax, long values split into 255-byte strings."""
    lines = []
    for r in recs:
        quoted = " ".join(f'"{s}"' for s in r["strings"])
        value = f"( {quoted} )" if len(r["strings"]) > 1 else quoted
        lines.append(f"; {r['purpose']}")
        lines.append(f"{r['name']}. 3600 IN TXT {value}")
    return lines


def dns_states(recs: list[Record], results: list[Record]) -> dict[str, str]:
    """selector -> what the check found, for the DKIM records whose lookup gave an answer."""
    return {
        r["selector"]: res["status"]
        for r, res in zip(recs, results, strict=True)
        if "selector" in r and res["status"] in DNS_STATES
    }


# -- the commands ------------------------------------------------------------------------------


class Domains:
    def __init__(self, core: Core):
        self.core = core

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # -- reads ---------------------------------------------------------------------------------

    async def keys(self, tenant: str, domain: str) -> list[dict[str, Any]]:
        """TENANT's DOMAIN's keys, newest first, without their private parts."""
        return await self.core.read(self.core.store.dkim_keys, tenant, domain_name(domain))

    async def records(self, tenant: str, domain: str, hostname: str) -> list[Record]:
        """The DNS records to publish for TENANT's DOMAIN (see records())."""
        name = domain_name(domain)
        return records(name, await self.core.read(self.core.store.dkim_keys, tenant, name), hostname)

    # -- changes -------------------------------------------------------------------------------

    async def add(self, op: Op, tenant: str, domain: str, dkim: DkimConfig) -> tuple[Domain, list[str]]:
        """TENANT may send as DOMAIN, signed with new keys (active at once): (the domain, its selectors)."""
        name = await self.core.checked(op, tenant, lambda: rules.sender_domain(domain))
        await self.core.need(op, tenant, self.core.store.tenant, tenant)  # before making keys
        try:
            keys = await self._thread(new_keys, dkim, name, set(), time.time())
        except ValueError:
            await self.core.refuse(op, tenant, invalid(f"{name!r} is not a domain name (like example.com)", "domain"))
        d = await self.core.change(op, tenant, lambda s: s.domain_add(tenant, name, keys))
        return d, [k.selector for k in keys]

    async def import_key(self, op: Op, tenant: str, domain: str, selector: str, pem: bytes) -> tuple[str, list[str]]:
        """An existing private key (PEM, RSA or Ed25519) becomes DOMAIN's active key for SELECTOR;
        the active key of its algorithm goes to standby: (its algorithm, the standby selectors)."""
        name, selector = domain_name(domain), selector.lower()
        try:
            key = await self._thread(imported_key, name, selector, pem)
        except ValueError as exc:
            await self.core.refuse(op, tenant, invalid(f"{op.action}: {exc}", "pem"))

        def change(s: Store) -> list[str]:
            s.domain(tenant, name)
            old = {
                k["selector"]
                for k in s.dkim_keys(tenant, name)
                if k["state"] == "active" and k["algorithm"] == key.algorithm
            }
            s.dkim_add(tenant, name, [key], "active")
            s.dkim_transition(tenant, name, {"active": "standby"}, old)
            return sorted(old)

        return key.algorithm, await self.core.change(op, tenant, change)

    async def rotate(self, op: Op, tenant: str, domain: str, dkim: DkimConfig) -> list[str]:
        """New keys for DOMAIN, pending (published, not yet signing): their selectors. Refused
        while pending keys wait (activate or retire them first)."""
        name = domain_name(domain)

        def no_pending(keys: list[dict[str, Any]]) -> None:
            if any(k["state"] == "pending" for k in keys):
                raise invalid(f"{name} already has pending keys: activate or retire them first")

        current = await self.core.need(op, tenant, self.core.store.dkim_keys, tenant, name)
        await self.core.checked(op, tenant, lambda: no_pending(current))
        keys = await self._thread(new_keys, dkim, name, {k["selector"] for k in current}, time.time())

        def change(s: Store) -> None:
            no_pending(s.dkim_keys(tenant, name))  # none came in while the keys were made
            s.dkim_add(tenant, name, keys, "pending")

        await self.core.change(op, tenant, change)
        return [k.selector for k in keys]

    async def activate(self, op: Op, tenant: str, domain: str, *, force: bool) -> tuple[list[str], list[str]]:
        """Sign with DOMAIN's pending keys from now on; the active keys of their algorithms stay
        published but unused (standby) until retire: (the keys now active, those now standby).
        Refused unless a DNS check saw the pending keys published, or FORCE."""
        name = domain_name(domain)

        def change(s: Store) -> tuple[list[str], list[str]]:
            keys = s.dkim_keys(tenant, name)
            pending = [k for k in keys if k["state"] == "pending"]
            if not pending:
                raise invalid(f"{name} has no pending keys (dkim-rotate makes them)")
            unready = [k["selector"] for k in pending if k["dns_state"] != "published"]
            if unready and not force:
                raise invalid(
                    f"{name}: DNS does not show {', '.join(unready)} yet; run domain check after publishing (or force)"
                )
            algorithms = {k["algorithm"] for k in pending}
            old = {k["selector"] for k in keys if k["state"] == "active" and k["algorithm"] in algorithms}
            s.dkim_transition(tenant, name, {"active": "standby"}, old)
            s.dkim_transition(tenant, name, {"pending": "active"})
            return [k["selector"] for k in pending], sorted(old)

        return await self.core.change(op, tenant, change)

    async def retire(self, op: Op, tenant: str, domain: str) -> int:
        """DOMAIN's standby keys are retired: their private parts deleted, their records no longer
        to be published. How many; refused when there are none."""
        name = domain_name(domain)

        def change(s: Store) -> int:
            n = s.dkim_transition(tenant, name, {"standby": "retired"})
            if not n:
                raise invalid(f"{name} has no standby keys to retire")
            return n

        return await self.core.change(op, tenant, change)

    async def check(self, op: Op, tenant: str, domain: str, hostname: str, lookup: Lookup) -> list[Record]:
        """Look DOMAIN's records up with LOOKUP and record, key by key, whether DNS shows it
        (a key known to be missing or wrong does not sign): the lookup's results."""
        name = domain_name(domain)
        recs = records(name, await self.core.need(op, tenant, self.core.store.dkim_keys, tenant, name), hostname)
        results = await lookup(recs)
        states = dns_states(recs, results)
        now = time.time()
        kept = [{"name": r["name"], "expected": r["value"], "status": res["status"]} for r, res in zip(recs, results)]

        def change(s: Store) -> None:
            s.dkim_set_dns(tenant, name, states)
            s.domain_set_check(tenant, name, kept, now)

        await self.core.change(op, tenant, change)
        return results
