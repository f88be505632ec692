"""cmcctl's domain and webhook commands: a tenant's sending domains with their DKIM keys and DNS
records, and its webhook endpoints (domain.*, webhook.* through the admin socket).
"""

from __future__ import annotations

from typing import Any

import click

from cmcd.admin.cli_base import Client, pass_client, said, table, tabled, tenant_arg


@click.group()
def domain() -> None:
    """Sender domains of a tenant: add, list."""


@domain.command("add")
@tenant_arg
@click.argument("name", metavar="DOMAIN")
@pass_client
def domain_add(c: Client, tenant_name: str, name: str) -> None:
    """Let TENANT send as DOMAIN, with new DKIM keys (print the records to publish with `domain dns`)."""
    r = c.call("domain.add", tenant=tenant_name, domain=name)
    selectors = ", ".join(r.get("selectors", []))
    c.show(r, said(f"added domain {r['domain']} to tenant {r['tenant']} (DKIM selectors: {selectors})"))


@domain.command("list")
@click.argument("tenant_name", metavar="[TENANT]", required=False)
@pass_client
def domain_list(c: Client, tenant_name: str | None) -> None:
    """List domains, of every tenant or of TENANT."""
    c.show(c.call("domain.list", tenant=tenant_name), tabled({"DOMAIN": "domain", "TENANT": "tenant"}, "no domains"))


@domain.command("keys")
@tenant_arg
@click.argument("name", metavar="DOMAIN")
@pass_client
def domain_keys(c: Client, tenant_name: str, name: str) -> None:
    """List a domain's DKIM keys and their states (never the private keys)."""
    columns = {"SELECTOR": "selector", "ALGORITHM": "algorithm", "STATE": "state", "DNS": "dns_state"}
    c.show(c.call("domain.keys", tenant=tenant_name, domain=name), tabled(columns | {"CREATED": "created"}, "no keys"))


@domain.command("dns")
@tenant_arg
@click.argument("name", metavar="DOMAIN")
@pass_client
def domain_dns(c: Client, tenant_name: str, name: str) -> None:
    """Print the DNS records to publish: DKIM keys, and SPF and DMARC suggestions (zone-file syntax)."""
    c.show(c.call("domain.dns", tenant=tenant_name, domain=name), lambda r: click.echo("\n".join(r["zone"])))


@domain.command("check")
@tenant_arg
@click.argument("name", metavar="DOMAIN")
@pass_client
def domain_check(c: Client, tenant_name: str, name: str) -> None:
    """Look the records up in DNS and say, record by record, what is published, missing or different."""

    def human(results: list[dict[str, Any]]) -> None:
        for r in results:
            line = f"{r['status'].upper():<9} {r['name']}  ({r['purpose']})"
            click.echo(line + (f": {r['detail']}" if r["detail"] else ""))

    c.show(c.call("domain.check", tenant=tenant_name, domain=name), human)


@domain.command("dkim-rotate")
@tenant_arg
@click.argument("name", metavar="DOMAIN")
@pass_client
def domain_dkim_rotate(c: Client, tenant_name: str, name: str) -> None:
    """Make new keys (pending): publish them (domain dns), check them (domain check), then dkim-activate."""
    c.show(
        c.call("domain.dkim-rotate", tenant=tenant_name, domain=name),
        lambda r: click.echo(
            f"pending: {', '.join(r['pending'])}; publish them with: cmcctl domain dns {tenant_name} {name}"
        ),
    )


@domain.command("dkim-activate")
@tenant_arg
@click.argument("name", metavar="DOMAIN")
@click.option("--force", is_flag=True, help="activate even though domain check has not seen the records")
@pass_client
def domain_dkim_activate(c: Client, tenant_name: str, name: str, force: bool) -> None:
    """Sign with the pending keys from now on; the keys they replace stay published (standby)."""
    result = c.call("domain.dkim-activate", tenant=tenant_name, domain=name, force=True if force else None)
    c.show(result, lambda r: click.echo(f"active: {', '.join(r['active'])}; standby: {', '.join(r['standby']) or '-'}"))


@domain.command("dkim-retire")
@tenant_arg
@click.argument("name", metavar="DOMAIN")
@pass_client
def domain_dkim_retire(c: Client, tenant_name: str, name: str) -> None:
    """Retire standby keys: their private parts are deleted and they leave `domain dns`."""
    c.show(
        c.call("domain.dkim-retire", tenant=tenant_name, domain=name),
        lambda r: click.echo(f"retired {r['retired']} keys"),
    )


@domain.command("import-key")
@tenant_arg
@click.argument("name", metavar="DOMAIN")
@click.argument("selector")
@click.argument("pem_file", metavar="PEM-FILE", type=click.File("r"))
@pass_client
def domain_import_key(c: Client, tenant_name: str, name: str, selector: str, pem_file: Any) -> None:
    """Import an existing private key (PEM, RSA or Ed25519; "-" reads stdin) as the active key for SELECTOR."""
    pem = pem_file.read()
    result = c.call("domain.import-key", tenant=tenant_name, domain=name, selector=selector, pem=pem)
    c.show(result, lambda r: click.echo(f"imported {r['algorithm']} key {r['selector']} for {r['domain']}"))


@click.group()
def webhook() -> None:
    """Webhook endpoints of a tenant: mail events posted as signed JSON (add, list, delete, status)."""


WEBHOOK_EVENTS = "delivered,deferred,bounced,expired,suppressed,unsubscribed"


def _webhook_times(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with their times shown as UTC (the *_iso values the daemon sends along)."""
    keys = ("created", "last_success", "failing_since", "next_attempt")
    return [{**r, **{k: (r.get(f"{k}_iso") or "").replace("T", " ") for k in keys}} for r in rows]


@webhook.command("add")
@tenant_arg
@click.argument("url")
@click.option("--events", default=WEBHOOK_EVENTS, show_default=True, help="comma-separated mail events to post")
@pass_client
def webhook_add(c: Client, tenant_name: str, url: str, events: str) -> None:
    """Post TENANT's mail events to URL; the signing secret is printed once."""
    r = c.call("webhook.add", tenant=tenant_name, url=url, events=events)

    def human(r: dict[str, Any]) -> None:
        click.echo(f"added webhook {r['id']} for tenant {tenant_name}: {r['url']} ({','.join(r['events'])})")
        click.echo(f"signing secret: {r['secret']}")
        click.echo("Store it now: cmcd cannot show this secret again. Requests carry")
        click.echo('X-Cmcd-Signature: t=<unix time>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>.')

    c.show(r, human)


@webhook.command("list")
@tenant_arg
@pass_client
def webhook_list(c: Client, tenant_name: str) -> None:
    """List TENANT's webhook endpoints; never the secrets."""
    columns = {"ID": "id", "URL": "url", "EVENTS": "events", "CREATED": "created"}
    rows = c.call("webhook.list", tenant=tenant_name)
    c.show(rows, lambda rows: table(columns, _webhook_times(rows), f"no webhooks in tenant {tenant_name}"))


@webhook.command("delete")
@tenant_arg
@click.argument("webhook_id", metavar="ID")
@pass_client
def webhook_delete(c: Client, tenant_name: str, webhook_id: str) -> None:
    """Delete webhook ID of TENANT; nothing more is posted to it."""
    c.show(c.call("webhook.delete", tenant=tenant_name, id=webhook_id), said(f"deleted webhook {webhook_id}"))


@webhook.command("status")
@click.argument("tenant_name", metavar="[TENANT]", required=False)
@pass_client
def webhook_status(c: Client, tenant_name: str | None) -> None:
    """Delivery state of every webhook (of TENANT): successes, failures, retries, drops."""
    columns = {
        "ID": "id", "TENANT": "tenant", "URL": "url", "EVENTS": "events", "LAST SUCCESS": "last_success",
        "SENT": "sent", "DROPPED": "dropped", "ATTEMPTS": "attempts", "FAILING SINCE": "failing_since",
        "NEXT ATTEMPT": "next_attempt", "LAST ERROR": "last_error",
    }  # fmt: skip
    rows = c.call("webhook.status", tenant=tenant_name)
    c.show(rows, lambda rows: table(columns, _webhook_times(rows), "no webhooks"))
