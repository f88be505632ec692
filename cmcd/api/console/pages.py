"""Which views the console has: each page module registers its own routes on the console.

A new page is a module with `register(console)` and its templates, added to PAGES; its texts
go to i18n when it is imported.
"""

from __future__ import annotations

from cmcd.api.console import (
    account,
    blocks,
    contact,
    dashboard,
    domains,
    keys,
    logs,
    maillog,
    signin,
    users,
    webhooks,
)
from cmcd.api.console.web import Console

PAGES = (signin, dashboard, maillog, users, account, keys, domains, blocks, webhooks, logs, contact)


def register(console: Console) -> None:
    for module in PAGES:
        module.register(console)
