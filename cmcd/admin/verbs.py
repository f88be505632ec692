"""The admin socket's verb table: every verb cmcctl can send, put together from the verb modules;
never handles a request itself (cmcd/admin/server.py dispatches to it).

The table is built here, explicitly, once: no module adds verbs to it when imported.
"""

from __future__ import annotations

from typing import Any

from cmcd.admin.api_verbs import API_VERBS
from cmcd.admin.backup_verbs import BACKUP_VERBS
from cmcd.admin.domain_verbs import DOMAIN_VERBS
from cmcd.admin.evidence import EVIDENCE_VERBS
from cmcd.admin.logs import LOG_VERBS
from cmcd.admin.purge import PURGE_VERBS
from cmcd.admin.queue_verbs import QUEUE_VERBS
from cmcd.admin.retention import RETENTION_VERBS
from cmcd.admin.shaping_verbs import SHAPING_VERBS
from cmcd.admin.tenant_verbs import TENANT_VERBS
from cmcd.admin.verb import Args, Context, Verb, read
from cmcd.admin.webhook_verbs import WEBHOOK_VERBS


async def _status(ctx: Context, a: Args) -> Any:
    return dict(ctx.status())


def table(*groups: dict[str, Verb]) -> dict[str, Verb]:
    """GROUPS merged in order; a verb defined twice is a programming error."""
    out: dict[str, Verb] = {}
    for group in groups:
        twice = sorted(set(out) & set(group))
        if twice:
            raise ValueError(f"admin verbs defined twice: {', '.join(twice)}")
        out |= group
    return out


VERBS: dict[str, Verb] = table(
    {"status": read(_status)},
    TENANT_VERBS,
    PURGE_VERBS,
    DOMAIN_VERBS,
    LOG_VERBS,
    RETENTION_VERBS,
    QUEUE_VERBS,
    SHAPING_VERBS,
    API_VERBS,
    WEBHOOK_VERBS,
    BACKUP_VERBS,
    EVIDENCE_VERBS,
)
