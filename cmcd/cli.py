"""The `cmcd` command: serve the daemon or check a configuration file; administration is cmcctl's."""

from __future__ import annotations

import os
import sys

import click

from cmcd import config as config_mod
from cmcd.errors import CmcdError, ConfigError

DEFAULT_CONFIG = "/etc/cmcd/cmcd.toml"


def _load(path: str) -> config_mod.Config:
    try:
        return config_mod.load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"cmcd: {path}: {problem}", err=True)
        sys.exit(2)


@click.group()
def main() -> None:
    """cmcd: a self-hosted, multi-tenant mail delivery daemon."""


@main.command()
@click.option("--config", "config_path", default=DEFAULT_CONFIG, show_default=True, help="TOML configuration file.")
def serve(config_path: str) -> None:
    """Run the daemon in the foreground (systemd Type=notify)."""
    from cmcd.daemon import serve as run, setup_logging

    cfg = _load(config_path)
    setup_logging()
    try:
        run(cfg, notify_socket=os.environ.get("NOTIFY_SOCKET"))
    except CmcdError as exc:
        click.echo(f"cmcd: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"cmcd: cannot start: {exc}", err=True)
        sys.exit(1)


@main.command("check-config")
@click.option("--config", "config_path", default=DEFAULT_CONFIG, show_default=True, help="TOML configuration file.")
def check_config(config_path: str) -> None:
    """Validate a configuration file without starting; exit non-zero on any problem."""
    _load(config_path)
    click.echo(f"{config_path}: ok")


if __name__ == "__main__":
    main()
