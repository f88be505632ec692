"""Admin verbs for a tenant's sending domains and their DKIM keys: each change is one tenancy
command (cmcd.tenancy.domains); the DNS lookup of `domain check` is made here (cmcd/dns_check.py)
and handed to the command. Never makes a key or reads a private key.
"""

from __future__ import annotations

from typing import Any

from cmcd import dns_check
from cmcd.admin.verb import Args, Context, Verb, command, read
from cmcd.deliver.routing import make_resolver
from cmcd.tenancy.domains import Record, domain_name, zone_lines


async def _domain_add(ctx: Context, a: Args) -> Any:
    d, selectors = await ctx.tenancy.domains.add(a.op, a.text("tenant"), a.text("domain"), ctx.config.dkim)
    return {"tenant": d.tenant, "domain": d.name, "selectors": selectors}


async def _domain_list(ctx: Context, a: Args) -> Any:
    domains = await ctx.astore.call(ctx.store.domains, a.optional_text("tenant"))
    return [{"tenant": d.tenant, "domain": d.name} for d in domains]


async def _domain_keys(ctx: Context, a: Args) -> Any:
    return await ctx.tenancy.domains.keys(a.text("tenant"), a.text("domain"))


async def _domain_dns(ctx: Context, a: Args) -> Any:
    recs = await ctx.tenancy.domains.records(a.text("tenant"), a.text("domain"), ctx.config.server.hostname)
    return {"records": recs, "zone": zone_lines(recs)}


async def _domain_check(ctx: Context, a: Args) -> Any:
    resolver = make_resolver(ctx.config)

    async def lookup(recs: list[Record]) -> list[Record]:
        return await dns_check.check(resolver, recs)

    hostname = ctx.config.server.hostname
    return await ctx.tenancy.domains.check(a.op, a.text("tenant"), a.text("domain"), hostname, lookup)


async def _dkim_rotate(ctx: Context, a: Args) -> Any:
    tenant, domain = a.text("tenant"), a.text("domain")
    pending = await ctx.tenancy.domains.rotate(a.op, tenant, domain, ctx.config.dkim)
    return {"domain": domain_name(domain), "pending": pending}


async def _dkim_activate(ctx: Context, a: Args) -> Any:
    tenant, domain = a.text("tenant"), a.text("domain")
    active, standby = await ctx.tenancy.domains.activate(a.op, tenant, domain, force=a.flag("force"))
    return {"domain": domain_name(domain), "active": active, "standby": standby}


async def _dkim_retire(ctx: Context, a: Args) -> Any:
    tenant, domain = a.text("tenant"), a.text("domain")
    retired = await ctx.tenancy.domains.retire(a.op, tenant, domain)
    return {"domain": domain_name(domain), "retired": retired}


async def _domain_import_key(ctx: Context, a: Args) -> Any:
    tenant, domain, selector = a.text("tenant"), a.text("domain"), a.text("selector")
    algorithm, standby = await ctx.tenancy.domains.import_key(a.op, tenant, domain, selector, a.text("pem").encode())
    name = domain_name(domain)
    return {"domain": name, "selector": selector.lower(), "algorithm": algorithm, "standby": standby}


DOMAIN_VERBS: dict[str, Verb] = {
    "domain.add": command(_domain_add, ("tenant", "domain"), "{tenant}/{domain}"),
    "domain.list": read(_domain_list, "tenant"),
    "domain.keys": read(_domain_keys, "tenant", "domain"),
    "domain.dns": read(_domain_dns, "tenant", "domain"),
    "domain.check": command(_domain_check, ("tenant", "domain"), "{tenant}/{domain}"),
    "domain.dkim-rotate": command(_dkim_rotate, ("tenant", "domain"), "{tenant}/{domain}"),
    "domain.dkim-activate": command(_dkim_activate, ("tenant", "domain", "force"), "{tenant}/{domain}"),
    "domain.dkim-retire": command(_dkim_retire, ("tenant", "domain"), "{tenant}/{domain}"),
    "domain.import-key": command(
        _domain_import_key, ("tenant", "domain", "selector", "pem"), "{tenant}/{domain} {selector}"
    ),
}
