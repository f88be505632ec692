"""What every cmcctl command module shares: the admin-socket client in the click context, the
error cmcctl prints, and how results are printed (tables, fields, rows streamed as CSV, JSON or a
table). Never talks to the store or the spool; the socket is spoken by cmcd/admin/client.py.
"""

from __future__ import annotations

import datetime
import itertools
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import click

from cmcd.admin.client import AdminClient, AdminClientError
from cmcd.textout import CsvWriter, escape_controls


class CtlError(click.ClickException):
    """An error shown as "cmcctl: MESSAGE" on stderr, exit status 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"cmcctl: {escape_controls(self.format_message())}", err=True)


@dataclass(frozen=True)
class Client:
    """cmcctl's side of the admin socket: requests through AdminClient, its errors as CtlError."""

    socket_path: str
    as_json: bool

    def call(self, verb: str, **args: Any) -> Any:
        """Send one request (arguments left out when None) and return its result; raise CtlError
        with the daemon's message on refusal."""
        try:
            return AdminClient(self.socket_path).call(verb, **_given(args))
        except AdminClientError as exc:
            raise CtlError(str(exc)) from None

    def stream(self, verb: str, **args: Any) -> Iterator[dict[str, Any]]:
        """Rows of a streamed result as they arrive; raise CtlError on refusal or a broken stream."""
        try:
            yield from AdminClient(self.socket_path).stream(verb, **_given(args))
        except AdminClientError as exc:
            raise CtlError(str(exc)) from None

    def show(self, result: Any, human: Callable[[Any], None]) -> None:
        """Print RESULT as JSON with --json, else the way HUMAN formats it."""
        if self.as_json:
            click.echo(json.dumps(result, indent=2))
        else:
            human(result)


def _given(args: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in args.items() if v is not None}


pass_client = click.make_pass_decorator(Client)
tenant_arg = click.argument("tenant_name", metavar="TENANT")


# -- output ---------------------------------------------------------------------------------------

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


def emit(rows: Iterator[dict[str, Any]], columns: tuple[str, ...], fmt: str) -> int:
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
