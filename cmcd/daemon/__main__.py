"""`python -m cmcd.daemon`: the `cmcd` command."""

from cmcd.daemon.cli import main

main()
