"""cmcctl: the operator's command line, a client of cmcd's admin socket; never opens the store or the spool itself."""

from __future__ import annotations

import datetime
import io
import itertools
import json
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import click

from cmcd.admin.evidence_render import FORMATS
from cmcd.admin.evidence_render import render as render_evidence
from cmcd.textout import CsvWriter, escape_controls

DEFAULT_SOCKET = "/run/cmcd/admin.sock"
#: seconds to wait for a reply (password hashing and large queue listings take a moment)
REPLY_TIMEOUT_S = 120.0


class CtlError(click.ClickException):
    """An error shown as "cmcctl: MESSAGE" on stderr, exit status 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"cmcctl: {escape_controls(self.format_message())}", err=True)


@dataclass(frozen=True)
class Client:
    socket_path: str
    as_json: bool

    def _send(self, verb: str, args: dict[str, Any]) -> socket.socket:
        """A connected socket that has sent one request (arguments left out when None)."""
        request = {"verb": verb, "args": {k: v for k, v in args.items() if v is not None}}
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(REPLY_TIMEOUT_S)
        try:
            sock.connect(self.socket_path)
            sock.sendall(json.dumps(request).encode("utf-8") + b"\n")
        except OSError as exc:
            sock.close()
            raise CtlError(
                f"cannot reach cmcd at {self.socket_path}: {exc.strerror or exc} (is the daemon running?)"
            ) from None
        return sock

    def call(self, verb: str, **args: Any) -> Any:
        """Send one request and return its result; raise CtlError with the daemon's message on refusal."""
        with self._send(verb, args) as sock:
            try:
                with sock.makefile("rb") as replies:
                    line = replies.readline()
            except TimeoutError:
                raise CtlError(f"no reply from cmcd at {self.socket_path} within {REPLY_TIMEOUT_S:.0f}s") from None
            except OSError as exc:
                raise CtlError(f"lost the connection to cmcd at {self.socket_path}: {exc}") from None
        if not line:
            raise CtlError("cmcd closed the connection without replying; see the daemon log")
        try:
            reply = json.loads(line)
        except ValueError:
            raise CtlError("cmcd sent a reply that is not JSON; is the socket path right?") from None
        if not reply.get("ok"):
            raise CtlError(str(reply.get("error") or "request refused (no reason given)"))
        return reply.get("result")

    def stream(self, verb: str, **args: Any) -> Iterator[dict[str, Any]]:
        """Rows of a streamed result as they arrive; raise CtlError on refusal or a broken stream."""
        with self._send(verb, args) as sock, sock.makefile("rb") as lines:
            head = json.loads(lines.readline() or b"{}")
            if not head.get("ok"):
                raise CtlError(str(head.get("error") or "cmcd closed the connection without replying"))
            for line in lines:
                row = json.loads(line)
                if row.get("end") is True and set(row) <= {"end", "rows", "error"}:
                    if row.get("error"):
                        raise CtlError(row["error"])
                    return
                yield row
        raise CtlError("the listing was cut off before its end; see the daemon log")

    def show(self, result: Any, human: Callable[[Any], None]) -> None:
        """Print RESULT as JSON with --json, else the way HUMAN formats it."""
        if self.as_json:
            click.echo(json.dumps(result, indent=2))
        else:
            human(result)


# -- output helpers -----------------------------------------------------------------------

#: result keys holding a Unix time, shown as UTC in tables
TIME_KEYS = frozenset({"created", "received", "next_attempt", "revoked", "expires", "last_used"})


def cell(key: str, value: Any) -> str:
    """VALUE as one table cell: times readable, control characters escaped (no value can start a line)."""
    if key in TIME_KEYS and isinstance(value, (int, float)) and value:
        return datetime.datetime.fromtimestamp(value, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return escape_controls(",".join(str(v) for v in value)) or "-"
    if isinstance(value, dict):
        return json.dumps(value)
    return escape_controls(str(value))


def table(columns: dict[str, str], rows: list[dict[str, Any]], empty: str) -> None:
    """Print ROWS aligned in COLUMNS (header -> result key), or EMPTY when there are none."""
    if not rows:
        click.echo(empty)
        return
    cells = [list(columns)] + [[cell(k, row.get(k)) for k in columns.values()] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for r in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def fields(result: dict[str, Any]) -> None:
    """Print KEY: VALUE lines with the values aligned."""
    width = max((len(k) for k in result), default=0)
    for key, value in result.items():
        click.echo(f"{key + ':':<{width + 1}} {cell(key, value)}")


def tabled(columns: dict[str, str], empty: str) -> Callable[[Any], None]:
    return lambda rows: table(columns, rows, empty)


def read_password() -> str:
    data = sys.stdin.read()
    password = data[:-1] if data.endswith("\n") else data
    password = password[:-1] if password.endswith("\r") else password
    if not password:
        raise CtlError("no password on stdin (--password-stdin); pipe one in, or leave the option out to generate one")
    return password


def said(message: str) -> Callable[[Any], None]:
    """A human formatter that prints MESSAGE and, if the daemon generated a password, that password once."""

    def human(result: Any) -> None:
        click.echo(message)
        if isinstance(result, dict) and "password" in result:
            click.echo(f"generated password: {result['password']}")
            click.echo("Store it now: cmcd keeps only a hash and cannot show this password again.")

    return human


# -- commands -----------------------------------------------------------------------------


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


pass_client = click.make_pass_decorator(Client)
tenant_arg = click.argument("tenant_name", metavar="TENANT")
password_opt = click.option("--password-stdin", is_flag=True, help="read the password from stdin, else generate one")


@cli.command()
@pass_client
def status(c: Client) -> None:
    """Show the daemon's state."""
    c.show(c.call("status"), fields)


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
    """List tenants."""
    c.show(c.call("tenant.list"), tabled({"TENANT": "name", "ID": "id"}, "no tenants"))


@tenant.command("show")
@click.argument("name")
@pass_client
def tenant_show(c: Client, name: str) -> None:
    """Show tenant NAME: users, domains, IP credentials."""
    c.show(c.call("tenant.show", name=name), fields)


@cli.group()
def user() -> None:
    """Users of a tenant: add, list, passwd, disable, enable, delete."""


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
    columns = {"LOGIN": "login", "ROLE": "role", "ENABLED": "enabled", "CREATED": "created"}
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
def webhook() -> None:
    """Webhook endpoints of a tenant: mail events posted as signed JSON (add, list, delete, status)."""


WEBHOOK_EVENTS = "delivered,deferred,bounced,expired,suppressed"


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


@cli.group()
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
@pass_client
def tenant_set(c: Client, name: str, dsn: str | None, suppressed: str | None) -> None:
    """Change a tenant's delivery settings."""
    result = c.call("tenant.set", name=name, dsn=None if dsn is None else dsn == "on", suppressed_rcpt=suppressed)
    c.show(result, fields)


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


@cli.group()
def queue() -> None:
    """Messages in the spool: list, show, summary, retry, hold, release, delete."""


@queue.command("list")
@click.option("--tenant", "tenant_name", default=None, metavar="T", help="only this tenant's messages")
@click.option("--state", type=click.Choice(["queued", "deferred", "inflight", "held"]), default=None)
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


@cli.group()
def suppression() -> None:
    """A tenant's suppression list: addresses that hard-bounced (or an operator added) are not sent to."""


@suppression.command("list")
@tenant_arg
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@pass_client
def suppression_list(c: Client, tenant_name: str, limit: int) -> None:
    """List a tenant's suppressed addresses."""
    columns = {"ADDRESS": "address", "REASON": "reason", "CREATED": "created"}
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
@pass_client
def suppression_delete(c: Client, tenant_name: str, address: str) -> None:
    """Remove ADDRESS from a tenant's suppression list."""
    c.show(c.call("suppression.delete", tenant=tenant_name, address=address), said(f"removed {address}"))


LOG_COLUMNS = {
    "mail": ("time", "tenant", "queue_id", "event", "sender", "rcpt", "status", "attempt", "mx", "ip", "tls",
             "delay", "size", "message_id", "response"),
    "login": ("time", "tenant", "login", "client_ip", "mechanism", "result", "detail"),
    "ops": ("time", "tenant", "actor", "actor_uid", "action", "target", "result", "detail"),
}  # fmt: skip


def _emit(rows: Iterator[dict[str, Any]], columns: tuple[str, ...], fmt: str) -> int:
    """Write ROWS to stdout as they come: csv (UTF-8, header row), json (one array) or an aligned table."""
    out = sys.stdout
    n = 0
    if fmt == "csv":  # the one CSV writer: no cell a spreadsheet would run as a formula
        writer = CsvWriter(out)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row.get(c) for c in columns])
            n += 1
    elif fmt == "json":
        out.write("[")
        for row in rows:
            out.write(("\n" if n == 0 else ",\n") + json.dumps({c: row.get(c) for c in columns}, ensure_ascii=False))
            n += 1
        out.write("\n]\n" if n else "]\n")
    else:  # widths from the first page; later rows just run longer
        first: list[dict[str, Any]] = []
        for row in rows:
            first.append(row)
            if len(first) == 500:
                break
        widths = [max([len(c)] + [len(cell(c, r.get(c))) for r in first]) for c in columns]
        out.write("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip() + "\n")
        for row in itertools.chain(first, rows):
            out.write("  ".join(cell(c, row.get(c)).ljust(w) for c, w in zip(columns, widths)).rstrip() + "\n")
            n += 1
    out.flush()
    return n


@cli.group("log")
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
    @click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
    @click.option("--limit", type=click.IntRange(0, None), default=0, help="at most this many rows (0: all)")
    @pass_client
    def command(c: Client, tenant_name: str | None, since: str | None, until: str | None, status: str | None,
                rcpt: str | None, sender: str | None, queue_id: str | None, fmt: str, limit: int) -> None:  # fmt: skip
        if not mail and (rcpt or sender or queue_id):
            raise CtlError(f"log {kind}: --rcpt, --sender and --queue-id are for the mail log")
        args: dict[str, Any] = {"tenant": tenant_name, "since": since, "until": until, "status": status}
        if mail:
            args |= {"rcpt": rcpt, "sender": sender, "queue_id": queue_id}
        rows = c.stream(f"log.{kind}", limit=limit or None, **args)
        if c.as_json:
            fmt = "json"
        _emit(rows, LOG_COLUMNS[kind], fmt)


_log_command("mail", "Mail log: one row per recipient and attempt (addresses decrypted).", True)
_log_command("login", "Login log: every AUTH and IP-credential login, good and bad.", False)
_log_command("ops", "Operation log: every administrative change and refusal, with the caller.", False)


@cli.group()
def retention() -> None:
    """Log retention (mail log retention.mail_log_days, login and ops logs retention.audit_log_days)."""


@retention.command("run")
@pass_client
def retention_run(c: Client) -> None:
    """Delete log rows past their retention now (the daemon also does it daily)."""
    c.show(c.call("retention.run"), lambda r: click.echo(" ".join(f"{k}={v}" for k, v in r.items()) + " rows deleted"))


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
        from cmcd.admin.backup_cli import purge_from_backups

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


from cmcd.admin.backup_cli import backup  # noqa: E402  (here, not at the top: backup_cli is built on this module)

cli.add_command(backup)


def main() -> None:
    cli(prog_name="cmcctl")


if __name__ == "__main__":
    main()
