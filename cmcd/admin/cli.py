"""cmcctl: the operator's command line, a client of cmcd's admin socket; never opens the store or the spool itself.

This module holds the root command and the tenant, user, session, API key, IP credential and
suppression commands; the others are in cli_queue.py (queue, log, retention), cli_domains.py
(domain, webhook) and backup_cli.py (backup), added to the root below. What they share (the
client, output) is cli_base.py.
"""

from __future__ import annotations

import io
from typing import Any

import click

from cmcd.admin.backup_cli import backup, purge_from_backups
from cmcd.admin.cli_base import Client, CtlError, fields, pass_client, read_password, said, table, tabled, tenant_arg
from cmcd.admin.cli_domains import domain, webhook
from cmcd.admin.cli_queue import log_group, queue, retention
from cmcd.admin.cli_shaping import shaping
from cmcd.admin.evidence_render import FORMATS
from cmcd.admin.evidence_render import render as render_evidence
from cmcd.records import STREAMS

DEFAULT_SOCKET = "/run/cmcd/admin.sock"

password_opt = click.option("--password-stdin", is_flag=True, help="read the password from stdin, else generate one")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket", "socket_path", default=None, metavar="PATH", help=f"admin socket [default: {DEFAULT_SOCKET}]")
@click.option("--config", "config_path", default=None, metavar="PATH", help="take admin.socket from this config file")
@click.option("--json", "as_json", is_flag=True, help="print the raw result as JSON")
@click.pass_context
def cli(ctx: click.Context, socket_path: str | None, config_path: str | None, as_json: bool) -> None:
    """Administer a running cmcd through its admin socket."""
    if config_path is not None:
        from cmcd.config import load
        from cmcd.errors import ConfigError

        try:
            cfg = load(config_path)
        except ConfigError as exc:
            raise CtlError("; ".join(exc.problems)) from None
        socket_path = str(cfg.path(cfg.admin.socket))
    ctx.obj = Client(socket_path or DEFAULT_SOCKET, as_json)


@cli.command()
@pass_client
def status(c: Client) -> None:
    """Show the daemon's state (with workers: the host's figures added up, then one line per worker)."""
    c.show(c.call("status"), _status)


def _status(result: dict[str, Any]) -> None:
    workers = result.pop("workers", None)
    fields(result)
    if workers:
        click.echo()
        table(
            {"WORKER": "worker", "PID": "pid", "UP": "up", "RESTARTS": "restarts", "SESSIONS": "sessions",
             "ACCEPTED": "accepted", "INFLIGHT": "inflight"},
            workers, "",
        )  # fmt: skip


@cli.group()
def tenant() -> None:
    """Tenants: add, list, show."""


@tenant.command("add")
@click.argument("name")
@pass_client
def tenant_add(c: Client, name: str) -> None:
    """Add tenant NAME."""
    r = c.call("tenant.add", name=name)
    c.show(r, said(f"added tenant {r['name']} (id {r['id']})"))


@tenant.command("list")
@pass_client
def tenant_list(c: Client) -> None:
    """List tenants; BLOCKS is a tenant's own action per bounce class (the host's [bounces] for the rest)."""
    columns = {"TENANT": "name", "ID": "id", "BLOCKS": "blocks"}

    def human(rows: list[dict[str, Any]]) -> None:
        blocks = [r | {"blocks": ",".join(f"{k}={v}" for k, v in r.get("block_actions", {}).items())} for r in rows]
        table(columns, blocks, "no tenants")

    c.show(c.call("tenant.list"), human)


@tenant.command("show")
@click.argument("name")
@pass_client
def tenant_show(c: Client, name: str) -> None:
    """Show tenant NAME: users, domains, IP credentials, settings and the block policy in force for it."""
    c.show(c.call("tenant.show", name=name), fields)


@cli.group()
def user() -> None:
    """Users of a tenant: add, list, passwd, disable, enable, delete, set-role, set-stream."""


@user.command("add")
@tenant_arg
@click.argument("login")
@click.option("--role", type=click.Choice(["sender", "admin", "viewer"]), default="sender", show_default=True)
@password_opt
@pass_client
def user_add(c: Client, tenant_name: str, login: str, role: str, password_stdin: bool) -> None:
    """Add user LOGIN to TENANT (a password is generated unless --password-stdin)."""
    password = read_password() if password_stdin else None
    r = c.call("user.add", tenant=tenant_name, login=login, role=role, password=password)
    c.show(r, said(f"added user {r['login']} ({r['role']}) to tenant {r['tenant']}"))


@user.command("list")
@tenant_arg
@pass_client
def user_list(c: Client, tenant_name: str) -> None:
    """List the users of TENANT."""
    columns = {"LOGIN": "login", "ROLE": "role", "ENABLED": "enabled", "STREAM": "stream", "CREATED": "created"}
    c.show(c.call("user.list", tenant=tenant_name), tabled(columns, f"no users in tenant {tenant_name}"))


@user.command("passwd")
@tenant_arg
@click.argument("login")
@password_opt
@pass_client
def user_passwd(c: Client, tenant_name: str, login: str, password_stdin: bool) -> None:
    """Set a new password for LOGIN (generated unless --password-stdin)."""
    password = read_password() if password_stdin else None
    r = c.call("user.passwd", tenant=tenant_name, login=login, password=password)
    c.show(r, said(f"changed the password of {r['login']} in tenant {r['tenant']}"))


def _user_change(verb: str, done: str, doc: str) -> None:
    @user.command(verb, help=doc)
    @tenant_arg
    @click.argument("login")
    @pass_client
    def command(c: Client, tenant_name: str, login: str) -> None:
        r = c.call(f"user.{verb}", tenant=tenant_name, login=login)
        c.show(r, said(f"{done} user {login} in tenant {tenant_name}"))


_user_change("disable", "disabled", "Disable LOGIN of TENANT: it can no longer authenticate.")
_user_change("enable", "enabled", "Enable LOGIN of TENANT again.")
_user_change("delete", "deleted", "Delete LOGIN of TENANT and its IP credentials.")


def _show_qr(text: str) -> None:
    """TEXT as a QR code drawn with block characters (scannable from most terminals)."""
    try:
        import qrcode
    except ImportError:  # pragma: no cover - a dependency; the URI is printed anyway
        return
    qr = qrcode.QRCode(border=2)
    qr.add_data(text)
    qr.make(fit=True)
    out = io.StringIO()
    qr.print_ascii(out=out, invert=True)
    click.echo(out.getvalue().rstrip("\n"))


@user.command("otp-enroll")
@tenant_arg
@click.argument("login")
@pass_client
def user_otp_enroll(c: Client, tenant_name: str, login: str) -> None:
    """Start TOTP enrolment of tenant admin LOGIN: prints the provisioning URI and its QR code.

    Scan it with an authenticator app, then confirm with `cmcctl user otp-confirm TENANT LOGIN CODE`."""
    r = c.call("user.otp-enroll", tenant=tenant_name, login=login)

    def human(r: dict[str, Any]) -> None:
        _show_qr(r["uri"])
        click.echo(f"provisioning URI: {r['uri']}")
        click.echo(f"secret (to type in by hand): {r['secret']}")
        click.echo(f"Confirm with the first code: cmcctl user otp-confirm {tenant_name} {login} CODE")

    c.show(r, human)


@user.command("otp-confirm")
@tenant_arg
@click.argument("login")
@click.argument("code")
@pass_client
def user_otp_confirm(c: Client, tenant_name: str, login: str, code: str) -> None:
    """Confirm LOGIN's TOTP enrolment with the app's current CODE; prints the recovery codes once."""
    r = c.call("user.otp-confirm", tenant=tenant_name, login=login, code=code)

    def human(r: dict[str, Any]) -> None:
        click.echo(f"TOTP enrolment of {login} in tenant {tenant_name} confirmed. Recovery codes (each works once):")
        for code in r["recovery_codes"]:
            click.echo(f"  {code}")
        click.echo("Store them now: cmcd keeps only their hashes and cannot show them again.")

    c.show(r, human)


_user_change("otp-disable", "removed the TOTP enrolment of", "Remove LOGIN's TOTP enrolment (and its sessions).")


@user.command("otp-require")
@tenant_arg
@click.argument("login")
@click.option(
    "--on/--off", "required", required=True, help="require one-time passwords of LOGIN, or stop requiring them"
)
@pass_client
def user_otp_require(c: Client, tenant_name: str, login: str, required: bool) -> None:
    """Require (--on) or stop requiring (--off) that LOGIN signs in to the console with a one-time
    password: without an enrolment, the user sets one up at the next sign-in. --off keeps an
    enrolment the user has (`user otp-disable` removes it)."""
    r = c.call("user.otp-require", tenant=tenant_name, login=login, required=required)
    state = "now required" if required else "no longer required"
    c.show(r, said(f"one-time passwords are {state} of {login} in tenant {tenant_name}"))


@user.command("set-role")
@tenant_arg
@click.argument("login")
@click.argument("role", type=click.Choice(["sender", "admin", "viewer"]))
@pass_client
def user_set_role(c: Client, tenant_name: str, login: str, role: str) -> None:
    """Give LOGIN of TENANT another ROLE; the user's API sessions end (keys of a role the user may
    no longer hold stop working)."""
    r = c.call("user.set-role", tenant=tenant_name, login=login, role=role)
    c.show(r, said(f"{login} in tenant {tenant_name} now has role {r['role']}"))


@user.command("set-stream")
@tenant_arg
@click.argument("login")
@click.argument("stream", type=click.Choice(STREAMS))
@pass_client
def user_set_stream(c: Client, tenant_name: str, login: str, stream: str) -> None:
    """Make STREAM the stream of LOGIN's mail when the message (X-Cmcd-Stream:) or the API request
    names none: broadcast mail gets one-click unsubscribe and is not sent to who unsubscribed."""
    r = c.call("user.set-stream", tenant=tenant_name, login=login, stream=stream)
    c.show(r, said(f"mail of {login} in tenant {tenant_name} is now {r['stream']} unless it says otherwise"))


@cli.group()
def session() -> None:
    """Console and API sessions of tenant admins (password + TOTP logins): list and revoke them.

    A password change, disable, role change, TOTP reset or delete of the user ends them too."""


@session.command("list")
@tenant_arg
@click.argument("login")
@pass_client
def session_list(c: Client, tenant_name: str, login: str) -> None:
    """List LOGIN's live sessions: id, created, expires, last used (never the token)."""
    columns = {"ID": "id", "CREATED": "created", "EXPIRES": "expires", "LAST-USED": "last_used"}
    rows = c.call("session.list", tenant=tenant_name, login=login)
    c.show(rows, tabled(columns, f"no sessions of {login} in tenant {tenant_name}"))


@session.command("revoke")
@tenant_arg
@click.argument("login")
@click.argument("session_id", metavar="ID", required=False)
@click.option("--all", "every", is_flag=True, help="revoke every session of LOGIN")
@pass_client
def session_revoke(c: Client, tenant_name: str, login: str, session_id: str | None, every: bool) -> None:
    """End session ID of LOGIN of TENANT (from `cmcctl session list`), or --all of them."""
    if every == (session_id is not None):
        raise click.UsageError("give a session ID or --all (one of them)")
    r = c.call("session.revoke", tenant=tenant_name, login=login, id=session_id, all=True if every else None)
    c.show(r, said(f"revoked {r['revoked']} session(s) of {login} in tenant {tenant_name}"))


@cli.group()
def apikey() -> None:
    """API keys of tenant users for the HTTP API (shown once, stored as a hash)."""


@apikey.command("add")
@tenant_arg
@click.argument("login")
@click.option("--role", type=click.Choice(["sender", "admin", "viewer"]), default=None,
              help="what the key may do [default: the user's role]")  # fmt: skip
@pass_client
def apikey_add(c: Client, tenant_name: str, login: str, role: str | None) -> None:
    """Make an API key for LOGIN of TENANT; the token is printed once."""
    r = c.call("apikey.add", tenant=tenant_name, login=login, role=role)

    def human(r: dict[str, Any]) -> None:
        click.echo(f"added API key {r['key_id']} ({r['role']}) for {login} in tenant {tenant_name}")
        click.echo(f"token: {r['token']}")
        click.echo("Store it now: cmcd keeps only a hash and cannot show this token again.")

    c.show(r, human)


@apikey.command("list")
@tenant_arg
@click.argument("login", required=False)
@pass_client
def apikey_list(c: Client, tenant_name: str, login: str | None) -> None:
    """List the API keys of TENANT (or of one LOGIN); never the tokens."""
    columns = {"KEY": "key_id", "LOGIN": "login", "ROLE": "role", "CREATED": "created", "REVOKED": "revoked"}
    c.show(c.call("apikey.list", tenant=tenant_name, login=login), tabled(columns, f"no API keys in {tenant_name}"))


@apikey.command("revoke")
@tenant_arg
@click.argument("key_id", metavar="KEY")
@pass_client
def apikey_revoke(c: Client, tenant_name: str, key_id: str) -> None:
    """Revoke API key KEY of TENANT; requests with it are refused from now on."""
    c.show(c.call("apikey.revoke", tenant=tenant_name, key_id=key_id), said(f"revoked API key {key_id}"))


@cli.group()
def ipcred() -> None:
    """IP credentials (a user authenticated by client address): add, list, delete."""


def _ipcred_change(verb: str, done: str, doc: str) -> None:
    @ipcred.command(verb, help=doc)
    @tenant_arg
    @click.argument("login")
    @click.argument("cidr")
    @pass_client
    def command(c: Client, tenant_name: str, login: str, cidr: str) -> None:
        r = c.call(f"ipcred.{verb}", tenant=tenant_name, login=login, cidr=cidr)
        c.show(r, said(f"{done} IP credential {r['cidr']} of {login} in tenant {tenant_name}"))


_ipcred_change("add", "added", "Let clients from CIDR send as LOGIN of TENANT without AUTH.")
_ipcred_change("delete", "deleted", "Remove IP credential CIDR from LOGIN of TENANT.")


@ipcred.command("list")
@tenant_arg
@pass_client
def ipcred_list(c: Client, tenant_name: str) -> None:
    """List the IP credentials of TENANT."""
    columns = {"LOGIN": "login", "CIDR": "cidr"}
    c.show(c.call("ipcred.list", tenant=tenant_name), tabled(columns, f"no IP credentials in tenant {tenant_name}"))


@tenant.command("set")
@click.argument("name")
@click.option(
    "--dsn", type=click.Choice(["on", "off"]), default=None, help="send bounces (delivery status notifications)"
)
@click.option(
    "--suppressed",
    type=click.Choice(["accept", "refuse"]),
    default=None,
    help="a suppressed recipient: accept it and log it as suppressed, or refuse it at RCPT (550)",
)
@click.option(
    "--console-otp",
    type=click.Choice(["on", "off"]),
    default=None,
    help="every console user signs in with a one-time password (enrolling at the next sign-in)",
)
@click.option("--timezone", default=None, help="the time zone of the tenant's console pages (IANA name; '' = server's)")
@click.option(
    "--block",
    "blocks",
    multiple=True,
    metavar="CLASS=ACTION",
    help="the tenant's own action for a bounce class: suppress, count, alert or none; 'default' for the "
    "host's [bounces] action (repeatable)",
)
@pass_client
def tenant_set(
    c: Client,
    name: str,
    dsn: str | None,
    suppressed: str | None,
    console_otp: str | None,
    timezone: str | None,
    blocks: tuple[str, ...],
) -> None:
    """Change a tenant's delivery, block policy and console settings."""
    block_actions: dict[str, str] = {}
    for item in blocks:
        cls, eq, action = item.partition("=")
        if not eq or not cls.strip() or not action.strip():
            raise click.BadParameter(
                f"expected CLASS=ACTION (like mailbox_full=suppress), got {item!r}", param_hint="--block"
            )
        block_actions[cls.strip()] = action.strip()
    result = c.call(
        "tenant.set",
        name=name,
        dsn=None if dsn is None else dsn == "on",
        suppressed_rcpt=suppressed,
        console_otp=None if console_otp is None else console_otp == "on",
        timezone=timezone,
        block_actions=block_actions or None,
    )
    c.show(result, fields)


@cli.group()
def suppression() -> None:
    """A tenant's suppression list: addresses that hard-bounced (or an operator added) are not sent to."""


@suppression.command("list")
@tenant_arg
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@pass_client
def suppression_list(c: Client, tenant_name: str, limit: int) -> None:
    """List a tenant's suppressed addresses; STREAM is "all" (never sent to) or "broadcast" (the
    recipient unsubscribed: transactional mail still goes); a bounce's block has its CLASS and
    when it EXPIRES ("-": never)."""
    columns = {"ADDRESS": "address", "STREAM": "stream", "CLASS": "bounce_class", "REASON": "reason",
               "CREATED": "created", "EXPIRES": "expires"}  # fmt: skip
    c.show(c.call("suppression.list", tenant=tenant_name, limit=limit), tabled(columns, "no suppressed addresses"))


@suppression.command("add")
@tenant_arg
@click.argument("address")
@pass_client
def suppression_add(c: Client, tenant_name: str, address: str) -> None:
    """Suppress ADDRESS for a tenant."""
    c.show(c.call("suppression.add", tenant=tenant_name, address=address), said(f"suppressed {address}"))


@suppression.command("delete")
@tenant_arg
@click.argument("address")
@click.option(
    "--unsubscribe", is_flag=True,
    help="lift the recipient's own one-click unsubscribe from broadcast mail instead (the recipient asked again)",
)  # fmt: skip
@pass_client
def suppression_delete(c: Client, tenant_name: str, address: str, unsubscribe: bool) -> None:
    """Remove ADDRESS from a tenant's suppression list (a recipient's unsubscribe stays unless --unsubscribe)."""
    c.show(
        c.call("suppression.delete", tenant=tenant_name, address=address, unsubscribe=unsubscribe),
        said(f"removed {address}" + (" from the unsubscribe list" if unsubscribe else "")),
    )


@tenant.command("delete")
@click.argument("name")
@click.option("--purge", is_flag=True, help="required: erase the tenant and everything it owns")
@click.option("--yes", is_flag=True, help="do not ask for the tenant name again")
@click.option("--from-backups", is_flag=True, help="then remove it from every kept backup too (backup purge-tenant)")
@pass_client
def tenant_delete(c: Client, name: str, purge: bool, yes: bool, from_backups: bool) -> None:
    """Erase a tenant: sessions closed, queued mail, users, credentials, domains and keys,
    suppression list and logs deleted, the store and spool vacuumed. The backups taken before
    keep it until pruned (backup.keep); --from-backups removes it from them as well."""
    if not purge:
        raise CtlError("tenant delete erases everything the tenant owns; say so with --purge")
    if not yes:
        again = click.prompt(f"This erases tenant {name!r} and all its data. Type the tenant name to confirm")
        if again != name:
            raise CtlError("the names differ; nothing was deleted")
    c.show(
        c.call("tenant.delete", name=name, purge=True),
        lambda r: click.echo(f"purged tenant {name}: " + ", ".join(f"{k}={v}" for k, v in r.items() if k != "tenant")),
    )
    if from_backups:
        purge_from_backups(c, name)


@cli.command("evidence")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="md", show_default=True)
@click.option("--tenant", "tenant_name", default=None, metavar="T", help="tenant-specific lines for T only")
@pass_client
def evidence(c: Client, fmt: str, tenant_name: str | None) -> None:
    """Audit evidence, control by control (ISO/IEC 27017): each setting, what was measured, ok/attention/fail.

    The daemon measures (it probes its listeners' TLS, decrypts the newest backup, samples the store);
    each run is written to the operation log. Exit status 0 whatever the lines say; see "summary".
    """
    report = c.call("evidence", tenant=tenant_name)
    click.echo(render_evidence(report, "json" if c.as_json else fmt))


for group in (queue, log_group, retention, shaping, domain, webhook, backup):
    cli.add_command(group)


def main() -> None:
    cli(prog_name="cmcctl")


if __name__ == "__main__":
    main()
