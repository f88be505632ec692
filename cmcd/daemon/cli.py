"""The `cmcd` command: serve (one process, or a supervisor and its workers), worker (started by
the supervisor only), check-config, hash-password, restore. Wires nothing itself."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sqlite3
import sys
from collections.abc import Callable
from typing import Any

import click

from cmcd import bounces, crypto, shaping
from cmcd import config as config_mod
from cmcd.admin.backup_cli import restore_command
from cmcd.config import Config
from cmcd.daemon.logs import setup_logging
from cmcd.daemon.process import Daemon, WorkerRole, bounce_override, shaping_override, worker_socket
from cmcd.daemon.supervisor import Supervisor
from cmcd.daemon.wire import WorkerPeers
from cmcd.daemon.workers import CONFIG_ENV, CONTROL_ENV, PARENT_ENV, die_with_parent
from cmcd.errors import CmcdError, ConfigError
from cmcd.listening import Inherited


def serve(
    config: Config, notify_socket: str | None = None, config_path: str | None = None, accept_loss: bool = False
) -> None:
    """One process ([server] workers = 1), or a supervisor and its workers."""
    import uvloop

    if config.server.workers > 1 and config_path is not None:
        uvloop.run(Supervisor(config, config_path, notify_socket, accept_loss).run())
    else:
        uvloop.run(Daemon(config, notify_socket, config_path, accept_loss).run())


DEFAULT_CONFIG = "/etc/cmcd/cmcd.toml"


def _load(path: str) -> config_mod.Config:
    """PATH's configuration, and the bounce rules and shaping files it names loaded once to check
    them; a problem with any is one line each on stderr and exit status 2."""
    try:
        cfg = config_mod.load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"cmcd: {path}: {problem}", err=True)
        sys.exit(2)
    try:
        bounces.load_rules(bounce_override(cfg))
    except bounces.BounceRulesError as exc:
        click.echo(f"cmcd: {exc}", err=True)
        sys.exit(2)
    try:
        shaping.load_shaping(shaping_override(cfg))
    except shaping.ShapingError as exc:
        click.echo(f"cmcd: {exc}", err=True)
        sys.exit(2)
    return cfg


@click.group()
def main() -> None:
    """cmcd: a self-hosted, multi-tenant mail delivery daemon."""


@main.command("serve")
@click.option("--config", "config_path", default=DEFAULT_CONFIG, show_default=True, help="TOML configuration file.")
@click.option(
    "--accept-loss",
    is_flag=True,
    help="Start even though the spool is missing, empty, damaged or not this store's: rename it FILE.lost-TIME, "
    "start a new spool and log every recipient it held as lost. Use once, after an intact copy proved unavailable.",
)
def serve_command(config_path: str, accept_loss: bool) -> None:
    """Run the daemon in the foreground (systemd Type=notify).

    Start-up refuses, with one line naming the file and what to do, a store or spool it cannot
    trust: a data key without its store, a store that is missing while the spool holds mail, empty,
    garbled or failing SQLite's quick_check (restore it with `cmcd restore BACKUP`), or a spool that
    is missing, empty, damaged or another store's (put it back, or start once with --accept-loss).
    """
    cfg = _load(config_path)
    os.umask(0o077)  # the store, spool and keys are for the daemon's user only
    setup_logging()
    _run_or_explain(
        lambda: serve(
            cfg, notify_socket=os.environ.get("NOTIFY_SOCKET"), config_path=config_path, accept_loss=accept_loss
        )
    )


def _run_or_explain(run: Callable[[], None]) -> None:
    """RUN; a reason not to start is one line on stderr and exit status 1, never a traceback."""
    try:
        run()
    except CmcdError as exc:
        click.echo(f"cmcd: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"cmcd: cannot start: {exc}", err=True)
        sys.exit(1)
    except sqlite3.Error as exc:  # a database the start-up checks did not name: still one line, no traceback
        click.echo(f"cmcd: cannot start: a database file cannot be used: {' '.join(str(exc).split())}", err=True)
        sys.exit(1)


@main.command("worker", hidden=True)
@click.option("--config", "config_path", required=True)
@click.option("--index", type=int, required=True)
@click.option("--workers", type=int, required=True)
@click.option("--accept-loss", is_flag=True)
def worker_command(config_path: str, index: int, workers: int, accept_loss: bool) -> None:
    """Worker INDEX of WORKERS: started by `cmcd serve`, never by hand."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the daemon handles it: a reload mid-start is no death
    die_with_parent()
    if os.environ.get(PARENT_ENV) != str(os.getppid()):  # the supervisor died before this process began
        click.echo("cmcd worker: started by `cmcd serve` only (its supervisor is gone)", err=True)
        sys.exit(2)
    try:  # the supervisor's configuration, whatever the file says now (what only a restart changes stays)
        cfg = config_mod.from_dict(json.loads(os.environ[CONFIG_ENV]))
    except (KeyError, ValueError, ConfigError) as exc:
        click.echo(f"cmcd worker: no usable configuration from the supervisor ({exc})", err=True)
        sys.exit(2)
    cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, workers=workers))
    os.umask(0o077)
    setup_logging()
    control = socket.socket(fileno=int(os.environ[CONTROL_ENV]))
    peers = WorkerPeers([worker_socket(cfg, k) for k in range(1, workers)]) if index == 0 else None
    role = WorkerRole(index=index, workers=workers, control=control, inherited=Inherited(), peers=peers)
    _run_or_explain(lambda: uvloop_run(Daemon(cfg, None, config_path, accept_loss, role=role).run()))


def uvloop_run(main_coro: Any) -> None:
    import uvloop

    uvloop.run(main_coro)


@main.command("check-config")
@click.option("--config", "config_path", default=DEFAULT_CONFIG, show_default=True, help="TOML configuration file.")
def check_config(config_path: str) -> None:
    """Validate a configuration file without starting; exit non-zero on any problem."""
    _load(config_path)
    click.echo(f"{config_path}: ok")


@main.command("hash-password")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin instead of asking twice.")
def hash_password_command(password_stdin: bool) -> None:
    """Print the scrypt hash of a password, for [metrics] basic_auth_users."""
    if password_stdin:
        password = sys.stdin.read().removesuffix("\n").removesuffix("\r")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    if not password:
        click.echo("cmcd: an empty password; nothing to hash", err=True)
        sys.exit(2)
    click.echo(crypto.hash_password(password))


main.add_command(restore_command)

if __name__ == "__main__":
    main()
