"""cmcctl's shaping commands (shaping.status through the admin socket) and how queue summary shows
shaped sites; never reads the shaping files or the engine itself.
"""

from __future__ import annotations

from typing import Any

import click

from cmcd.admin.cli_base import Client, pass_client, table

SITE_COLUMNS = {
    "WORKER": "worker", "SITE": "site", "PROVIDER": "provider", "LIMIT": "connection_limit",
    "CONFIGURED": "configured_connection_limit", "CONNECTIONS": "connections", "MSGS/CONN": "messages_per_connection",
    "RCPTS/TX": "recipients_per_transaction", "RATE": "rate", "QUEUED": "queued",
}  # fmt: skip
CHANGE_COLUMNS = {
    "WORKER": "worker", "SITE": "site", "RULE": "rule", "ACTION": "action", "TENANT": "tenant",
    "LIMIT": "connection_limit", "REPLY": "reply", "UNTIL": "until", "ENDS-IN-S": "ends_in_s",
}  # fmt: skip


@click.group()
def shaping() -> None:
    """Provider shaping: the providers' sites, their limits and the automation changes in force."""


@shaping.command("status")
@click.option("--tenant", "tenant_name", default=None, metavar="T", help="only this tenant's suspensions")
@click.option("--providers", "show_providers", is_flag=True, help="also list every provider and its limits")
@pass_client
def shaping_status(c: Client, tenant_name: str | None, show_providers: bool) -> None:
    """Each worker's shaped sites (a provider's site, or one an automation rule changed) with the
    limits in force now, and the changes in force with when they end. Each worker holds its share
    of a provider's limits and reacts to the replies it gets itself."""

    def human(r: dict[str, Any]) -> None:
        workers = r["workers"]
        if show_providers and workers:
            first = workers[0]
            click.echo(f"files: {', '.join(first['files'])}")
            columns = {"PROVIDER": "name", "SUFFIXES": "suffixes", "LIMIT": "connection_limit"}
            columns |= {"MSGS/CONN": "messages_per_connection", "RCPTS/CONN": "recipients_per_connection"}
            columns |= {"RCPTS/TX": "recipients_per_transaction", "RATE": "rate"}
            rows = [p | {"suffixes": ",".join(p["suffixes"])} for p in first["providers"]]
            table(columns, rows, "no providers")
            click.echo()
        sites = [s | {"worker": w["worker"]} for w in workers for s in w["sites"]]
        table(SITE_COLUMNS, sites, "no shaped sites yet (a provider's site appears with its first message)")
        click.echo()
        changes = [x | {"worker": w["worker"]} for w in workers for x in w["changes"]]
        table(CHANGE_COLUMNS, changes, "no automation change in force")

    c.show(c.call("shaping.status", tenant=tenant_name), human)


def echo_sites(sites: list[dict[str, Any]]) -> None:
    """queue summary's shaped sites, below its table of domains."""
    if not sites:
        return
    click.echo()
    rows = [
        s | {"changes": "; ".join(f"{x['rule']} {x['action']} {x['ends_in_s']}s" for x in s["changes"]) or "-"}
        for s in sites
    ]
    table(SITE_COLUMNS | {"CHANGES": "changes"}, rows, "")
