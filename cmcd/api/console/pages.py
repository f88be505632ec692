"""Which views the console has: each page module registers its own routes on the console.

A new page is a module with `register(console)` and its templates, added to PAGES; its texts
go to i18n when it is imported.
"""

from __future__ import annotations

from cmcd.api.console import dashboard, signin
from cmcd.api.console.web import Console

PAGES = (signin, dashboard)


def register(console: Console) -> None:
    for module in PAGES:
        module.register(console)
