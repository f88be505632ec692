"""Tenancy commands for tenants' webhook endpoints: add (events checked, the URL through the SSRF
guard, at most MAX_PER_TENANT per tenant, a signing secret made and returned once) and delete.

Each runs through Core (one transaction with its operation-log row, Refused for anything it will
not do). Never posts an event (cmcd.api.webhooks does) and never builds a resolver: the door hands
in the daemon's (cmcd.deliver.routing.make_resolver, on dns.nameservers), which the URL's host is
looked up with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dns.asyncresolver

from cmcd.errors import StoreError
from cmcd.store.store import Store
from cmcd.store.webhook_store import MAX_PER_TENANT, parse_events
from cmcd.tenancy.core import Core, Op
from cmcd.tenancy.refusals import Refusal, Refused, conflict, invalid, not_found
from cmcd.tenancy.webhook_urls import WebhookUrlError, check_url, new_secret

#: the largest id SQLite stores (INTEGER is 64-bit signed)
_MAX_ID = 2**63 - 1


class UrlRefused(Refused):
    """A webhook URL the SSRF guard refused. The refusal's text is the whole reason (the operator's
    and the operation log's); PUBLIC is the same refusal in the words a tenant may be told
    (WebhookUrlError.public: nothing learned about the host through the daemon's resolver)."""

    def __init__(self, error: WebhookUrlError):
        super().__init__(invalid(str(error), "url").refusal)
        self.public = Refusal(self.refusal.reason, self.refusal.code, self.refusal.enhanced, error.public, "url")


def webhook_events(events: str | Sequence[str] | None) -> tuple[str, ...]:
    """EVENTS ("delivered,bounced", a list of names, or None for all) as the store keeps them,
    or Refused naming the field."""
    try:
        return parse_events(events if events is None or isinstance(events, str) else list(events))
    except StoreError as exc:
        raise invalid(str(exc), "events") from None


def parse_webhook_id(tenant: str, value: int | str) -> int:
    """VALUE as a webhook id (a positive integer, or its decimal digits); anything else names no
    webhook of TENANT."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_ID:
        raise not_found(f"tenant {tenant!r} has no webhook {str(value)[:20]!r}", "id")
    return value


class Webhooks:
    def __init__(self, core: Core):
        self.core = core

    async def add(
        self,
        op: Op,
        tenant: str,
        url: str,
        events: str | Sequence[str] | None,
        resolver: dns.asyncresolver.Resolver,
    ) -> tuple[dict[str, Any], str]:
        """A new endpoint of TENANT posting EVENTS (None: all) to URL, from the newest mail-log row
        on: (its listing row, the signing secret, shown once). URL's host is looked up through
        RESOLVER; a refused URL raises UrlRefused."""
        wanted = await self.core.checked(op, tenant, lambda: webhook_events(events))
        await self.core.need(op, tenant, self.core.store.tenant, tenant)  # before any DNS lookup
        try:
            await check_url(url, resolver, self.core.config.api.webhook_allow_private)
        except WebhookUrlError as exc:
            await self.core.refuse(op, tenant, UrlRefused(exc))
        secret = new_secret()

        def change(s: Store) -> dict[str, Any]:
            have = len(s.webhooks(tenant))
            if have >= MAX_PER_TENANT:
                raise conflict(f"tenant {tenant!r} has {have} webhooks, the most allowed; delete one first")
            return s.webhook_add(tenant, url, wanted, secret.encode())

        row = await self.core.change(op, tenant, change)
        return row, secret

    async def delete(self, op: Op, tenant: str, webhook_id: int | str) -> int:
        """TENANT's endpoint WEBHOOK_ID (an id, or its digits as given) is gone; returns the id."""
        wid = await self.core.checked(op, tenant, lambda: parse_webhook_id(tenant, webhook_id))
        await self.core.change(op, tenant, lambda s: s.webhook_delete(tenant, wid))
        return wid
