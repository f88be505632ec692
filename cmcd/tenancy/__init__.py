"""Tenancy: the one place that changes tenants, users, credentials, domains and their DKIM keys,
suppressions, webhooks and tenant settings, and that keeps the in-memory directory of them.

What it is: typed commands (one validation, one transaction, one operation-log row each, the
directory current in this process when a command returns, and a store-wide directory version so
other processes see the change too) and typed refusals (`refusals.Refused`) that each door
renders once for its protocol. What it is not: a protocol (smtp/, api/ and admin/ translate to
and from it), the rules for a message coming in (submit/), or the queue (queue/).
"""

from __future__ import annotations

from cmcd.config import Config
from cmcd.queue.audit import AuditLog
from cmcd.store import AsyncStore
from cmcd.tenancy.accounts import Accounts
from cmcd.tenancy.core import Core, Op
from cmcd.tenancy.credentials import Credentials
from cmcd.tenancy.directory import Directory
from cmcd.tenancy.domains import Domains
from cmcd.tenancy.tenants import Tenants
from cmcd.tenancy.webhooks import Webhooks

__all__ = ["Directory", "Op", "Tenancy"]


class Tenancy:
    """The command groups over one store, audit log and directory."""

    def __init__(self, config: Config, astore: AsyncStore, audit: AuditLog, directory: Directory):
        self.directory = directory
        self.core = Core(config, astore, audit, directory)
        self.accounts = Accounts(self.core)
        self.tenants = Tenants(self.core)
        self.domains = Domains(self.core)
        self.credentials = Credentials(self.core)
        self.webhooks = Webhooks(self.core)
