"""cmcctl's queue, log and retention commands (queue.*, log.*, retention.run through the admin
socket); never reads the spool or the store itself.
"""

from __future__ import annotations

from typing import Any

import click

from cmcd.admin.cli_base import Client, CtlError, emit, fields, pass_client, table
from cmcd.admin.cli_shaping import echo_sites
from cmcd.records import PENDING_STATES, STREAMS


def _parse_age(value: str | None) -> int | None:
    """Seconds in "90s", "30m", "2h" or "3d"."""
    if value is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = value[:-1], value[-1:]
    if unit.isdigit():
        number, unit = value, "s"
    if not number.isdigit() or unit not in units:
        raise CtlError(f"--older-than {value!r}: expected a number with s, m, h or d, like 2h")
    return int(number) * units[unit]


@click.group()
def queue() -> None:
    """Messages in the spool: list, show, summary, retry, hold, release, delete."""


@queue.command("list")
@click.option("--tenant", "tenant_name", default=None, metavar="T", help="only this tenant's messages")
@click.option("--state", type=click.Choice([s.value for s in PENDING_STATES]), default=None)
@click.option("--domain", default=None, metavar="D", help="only messages with a recipient at this domain")
@click.option("--older-than", "older_than", default=None, metavar="AGE", help="received more than AGE ago (2h, 3d)")
@click.option("--after", default=None, metavar="QUEUE-ID", help="start after this queue id (the previous page's last)")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@pass_client
def queue_list(
    c: Client,
    tenant_name: str | None,
    state: str | None,
    domain: str | None,
    older_than: str | None,
    after: str | None,
    limit: int,
) -> None:
    """List queued messages, oldest first, one page at a time."""
    page = c.call(
        "queue.list", tenant=tenant_name, state=state, domain=domain, older_than=_parse_age(older_than), after=after,
        limit=limit,
    )  # fmt: skip
    columns = {"QUEUE-ID": "queue_id", "TENANT": "tenant", "SENDER": "sender", "SIZE": "size_bytes"}
    columns |= {"RECEIVED": "received", "RCPTS": "recipients", "STATES": "states"}

    def human(result: dict[str, Any]) -> None:
        table(columns, result["items"], "the queue is empty" if after is None else "no more messages")
        if result["next"]:
            click.echo(f"more: cmcctl queue list --after {result['next']}")

    c.show(page, human)


def _show_message(m: dict[str, Any]) -> None:
    fields({k: v for k, v in m.items() if k not in ("recipients", "tenant_id", "user_id")})
    click.echo()
    columns = {"RECIPIENT": "address", "STATE": "state", "ATTEMPTS": "attempts", "NEXT-ATTEMPT": "next_attempt"}
    table(columns | {"LAST-RESPONSE": "last_response"}, m["recipients"], "no recipients")


@queue.command("show")
@click.argument("queue_id", metavar="QUEUE-ID")
@click.option("--tenant", "tenant_name", default=None, metavar="T", help="refuse unless the message is this tenant's")
@pass_client
def queue_show(c: Client, queue_id: str, tenant_name: str | None) -> None:
    """Show one message's envelope and the state of each recipient (never the body)."""
    c.show(c.call("queue.show", queue_id=queue_id, tenant=tenant_name), _show_message)


@queue.command("summary")
@click.option("--tenant", "tenant_name", default=None, metavar="T")
@pass_client
def queue_summary(c: Client, tenant_name: str | None) -> None:
    """Recipients by state, and by destination domain and age in minutes (like Postfix's qshape)."""

    def human(r: dict[str, Any]) -> None:
        click.echo("  ".join(f"{k}={v}" for k, v in r["states"].items()))
        click.echo()
        heads = ["DOMAIN", "T"] + [str(b) for b in r["buckets_min"]] + [f"{r['buckets_min'][-1]}+"]
        rows = [["TOTAL"] + [str(n) for n in r["total"]]]
        rows += [[d["domain"]] + [str(n) for n in d["counts"]] for d in r["domains"]]
        widths = [max(len(x[i]) for x in [heads] + rows) for i in range(len(heads))]
        for row in [heads] + rows:
            click.echo("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        if r["more_domains"]:
            click.echo(f"... and {r['more_domains']} more domains")
        echo_sites(r.get("sites", []))

    c.show(c.call("queue.summary", tenant=tenant_name), human)


@queue.command("retry")
@click.argument("queue_id", metavar="[QUEUE-ID]", required=False)
@click.option("--domain", default=None, metavar="D", help="every waiting recipient at this domain")
@click.option("--all", "everything", is_flag=True, help="every waiting recipient")
@click.option("--tenant", "tenant_name", default=None, metavar="T", help="only this tenant's messages")
@pass_client
def queue_retry(c: Client, queue_id: str | None, domain: str | None, everything: bool, tenant_name: str | None) -> None:
    """Make deferred recipients due now."""
    if sum((queue_id is not None, domain is not None, everything)) != 1:
        raise CtlError("queue retry: give exactly one of QUEUE-ID, --domain D or --all")
    result = c.call(
        "queue.retry", queue_id=queue_id, domain=domain, all=True if everything else None, tenant=tenant_name
    )
    c.show(result, lambda r: click.echo(f"{r['recipients']} recipients due now"))


def _hold_command(verb: str, doc: str, done: str) -> None:
    @queue.command(verb, help=doc)
    @click.argument("queue_id", metavar="[QUEUE-ID]", required=False)
    @click.option("--tenant", "tenant_name", default=None, metavar="T", help="every message of this tenant")
    @pass_client
    def command(c: Client, queue_id: str | None, tenant_name: str | None) -> None:
        if queue_id is None and tenant_name is None:
            raise CtlError(f"queue {verb}: give a QUEUE-ID or --tenant T")
        result = c.call(f"queue.{verb}", queue_id=queue_id, tenant=tenant_name)
        c.show(result, lambda r: click.echo(f"{r['recipients']} recipients {done}"))


_hold_command("hold", "Hold messages: they are not delivered until released.", "held")
_hold_command("release", "Release held messages: they are due at once.", "released")


@queue.command("delete")
@click.argument("queue_id", metavar="QUEUE-ID")
@click.option("--tenant", "tenant_name", default=None, metavar="T", help="refuse unless the message is this tenant's")
@pass_client
def queue_delete(c: Client, queue_id: str, tenant_name: str | None) -> None:
    """Delete a message: its body is erased and its recipients logged as deleted-by-operator."""
    result = c.call("queue.delete", queue_id=queue_id, tenant=tenant_name)
    c.show(result, lambda r: click.echo(f"deleted {r['queue_id']} ({r['recipients']} recipients ended)"))


LOG_COLUMNS = {
    "mail": ("time", "tenant", "queue_id", "event", "stream", "sender", "rcpt", "status", "bounce_class", "attempt",
             "mx", "ip", "tls", "delay", "size", "message_id", "response"),
    "login": ("time", "tenant", "login", "client_ip", "mechanism", "result", "detail"),
    "ops": ("time", "tenant", "actor", "actor_uid", "action", "target", "result", "detail"),
}  # fmt: skip


@click.group("log")
def log_group() -> None:
    """Query the mail, login and operation logs (times in server.timezone)."""


def _log_command(kind: str, doc: str, mail: bool) -> None:
    @log_group.command(kind, help=doc)
    @click.option("--tenant", "tenant_name", default=None, metavar="T")
    @click.option("--since", default=None, metavar="WHEN", help="ISO 8601, or relative: -2h, -7d")
    @click.option("--until", default=None, metavar="WHEN", help="ISO 8601, or relative: -2h, -7d")
    @click.option("--status", default=None, help="mail: event or state (delivered, bounced...); login/ops: result")
    @click.option("--rcpt", default=None, metavar="ADDRESS", hidden=not mail)
    @click.option("--sender", default=None, metavar="ADDRESS", hidden=not mail)
    @click.option("--queue-id", "queue_id", default=None, metavar="QUEUE-ID", hidden=not mail)
    @click.option("--stream", default=None, type=click.Choice(STREAMS), hidden=not mail, help="mail: one stream only")
    @click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
    @click.option("--limit", type=click.IntRange(0, None), default=0, help="at most this many rows (0: all)")
    @pass_client
    def command(c: Client, tenant_name: str | None, since: str | None, until: str | None, status: str | None,
                rcpt: str | None, sender: str | None, queue_id: str | None, stream: str | None, fmt: str,
                limit: int) -> None:  # fmt: skip
        if not mail and (rcpt or sender or queue_id or stream):
            raise CtlError(f"log {kind}: --rcpt, --sender, --queue-id and --stream are for the mail log")
        args: dict[str, Any] = {"tenant": tenant_name, "since": since, "until": until, "status": status}
        if mail:
            args |= {"rcpt": rcpt, "sender": sender, "queue_id": queue_id, "stream": stream}
        rows = c.stream(f"log.{kind}", limit=limit or None, **args)
        if c.as_json:
            fmt = "json"
        emit(rows, LOG_COLUMNS[kind], fmt)


_log_command("mail", "Mail log: one row per recipient and attempt (addresses decrypted).", True)
_log_command("login", "Login log: every AUTH and IP-credential login, good and bad.", False)
_log_command("ops", "Operation log: every administrative change and refusal, with the caller.", False)


@click.group()
def retention() -> None:
    """Log retention (mail log retention.mail_log_days, login and ops logs retention.audit_log_days)."""


@retention.command("run")
@pass_client
def retention_run(c: Client) -> None:
    """Delete log rows past their retention now (the daemon also does it daily)."""
    c.show(c.call("retention.run"), lambda r: click.echo(" ".join(f"{k}={v}" for k, v in r.items()) + " rows deleted"))
