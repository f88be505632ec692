"""`cmcctl backup now|list|verify|purge-tenant` (through the admin socket) and `cmcd restore` (offline, cmcd stopped).

Built on cmcd/admin/cli_base.py, never on cli.py (which adds the backup group to cmcctl), so
`python -m cmcd.admin.cli` loads each module once.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import click

from cmcd.admin.cli_base import Client, fields, pass_client, table

#: the daemon's default configuration file (as `cmcd serve`)
DEFAULT_CONFIG = "/etc/cmcd/cmcd.toml"


def size(n: int) -> str:
    """N bytes for a person: 812 B, 2.2 KiB, 31.0 MiB."""
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _rows(rows: dict[str, int]) -> str:
    return " ".join(f"{table}={n}" for table, n in rows.items())


def _utc(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


@click.group()
def backup() -> None:
    """Encrypted backups of the store (never the spool or a message body)."""


@backup.command("now")
@pass_client
def backup_now(c: Client) -> None:
    """Take a backup now, into backup.dir (older ones beyond backup.keep are removed)."""

    def human(r: dict[str, Any]) -> None:
        click.echo(f"wrote {r['path']} ({size(r['size_bytes'])} in {r['seconds']:.1f}s)")

    c.show(c.call("backup.now"), human)


@backup.command("list")
@pass_client
def backup_list(c: Client) -> None:
    """List the backups in backup.dir, oldest first."""

    def human(result: list[dict[str, Any]]) -> None:
        rows = [r | {"size": size(r["size_bytes"])} for r in result]
        table({"NAME": "name", "SIZE": "size", "CREATED": "created"}, rows, "no backups")

    c.show(c.call("backup.list"), human)


@backup.command("verify")
@click.argument("file")
@pass_client
def backup_verify(c: Client, file: str) -> None:
    """Decrypt backup FILE and run SQLite's integrity check on it.

    FILE is a name in backup.dir, or a path to a file there (cmcd only reads backups in backup.dir).
    """

    def human(r: dict[str, Any]) -> None:
        fields(
            {
                "file": r["path"],
                "created": r["created"],
                "size": size(r["size_bytes"]),
                "store size": size(r["db_bytes"]),
                "integrity": r["integrity"],
                "rows": _rows(r["rows"]),
                "data key": r["data_key"],
            }
        )

    c.show(c.call("backup.verify", file=file if "/" not in file else os.path.abspath(file)), human)


def purge_from_backups(c: Client, name: str) -> None:
    """Ask cmcd to remove tenant NAME from every kept backup, and say what it did."""

    def human(r: dict[str, Any]) -> None:
        click.echo(
            f"removed tenant {name} from {len(r['rewritten'])} of {r['generations']} backups "
            f"({', '.join(f'{k}={v}' for k, v in r['rows'].items()) or 'no rows'}); "
            f"{r['chunks_erased']} chunks that held it erased"
        )

    c.show(c.call("backup.purge-tenant", tenant_name=name), human)


@backup.command("purge-tenant")
@click.argument("name")
@pass_client
def backup_purge_tenant(c: Client, name: str) -> None:
    """Remove tenant NAME, already erased with `tenant delete --purge`, from every kept backup.

    Each backup that holds it is decrypted, its rows deleted (secure_delete) and it is written again under
    its own name; the chunks only it used are overwritten and unlinked. Without this, an erased tenant
    stays in the backups until the last one taken before the erase is pruned (backup.keep generations).
    """
    purge_from_backups(c, name)


# -- cmcd restore ----------------------------------------------------------------------------


def _fail(message: str, status: int = 1) -> None:
    click.echo(f"cmcd: {message}", err=True)
    sys.exit(status)


def _daemon_answers(sock: Path) -> bool:
    """Whether something serves the admin socket (a running cmcd)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(str(sock))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as exc:
        _fail(
            f"{sock}: cannot tell whether cmcd is running ({exc.strerror or exc}); "
            "run restore as the user cmcd runs as, with cmcd stopped"
        )
    finally:
        probe.close()
    return True


@click.command("restore")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--config", "config_path", default=DEFAULT_CONFIG, show_default=True, help="TOML configuration file.")
def restore_command(file: Path, config_path: str) -> None:
    """Replace the store with the one in backup FILE; cmcd must be stopped.

    FILE is a generation, cmcd-store-TIME.bak: since format 2 a manifest whose chunks are in the chunks/
    directory next to it (restore on a new host from a copy of the whole backup.dir). FILE must authenticate with backup.key_file and pass SQLite's integrity check, and the data key in
    store.key_file must be the one its store was written with; otherwise nothing is changed. The store
    it replaces is kept next to it as STORE.pre-restore-TIME.
    """
    from cmcd.config import load
    from cmcd.errors import CmcdError, ConfigError
    from cmcd.store.backup import restore_backup

    try:
        cfg = load(config_path)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"cmcd: {config_path}: {problem}", err=True)
        sys.exit(2)
    sock = cfg.path(cfg.admin.socket)
    if _daemon_answers(sock):
        _fail(f"cmcd is running (its admin socket {sock} answers); stop it before restoring")
    try:
        result = restore_backup(
            file,
            cfg.path(cfg.backup.key_file),
            cfg.path(cfg.store.path),
            data_key_file=cfg.path(cfg.store.key_file),
            now=time.time(),
        )
    except CmcdError as exc:
        _fail(str(exc))
        return
    v = result.verified
    click.echo(f"restored {v.path} (taken {_utc(v.created)}) into {result.store_path}")
    click.echo(f"rows: {_rows(v.rows)}")
    if result.previous is not None:
        click.echo(f"the store it replaced is kept as {result.previous}; remove it once the restored one is checked")
