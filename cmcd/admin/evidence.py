"""The `evidence` admin verb: measures, control by control (ISO/IEC 27017), what holds; never changes anything.

Each line names a control, the setting in force, what was measured and a status: ok, attention
(needs a person's look) or fail (the control does not hold), with the reason. Measured means asked
of the thing itself: the listeners are connected to and offered TLS 1.0 and 1.1, the newest backup
is decrypted and its tables read, addresses are sampled from the store and decrypted, files are
stat()ed. Blocking work (SQLite, decryption, sockets, timedatectl) runs off the event loop: store
reads on the store's thread, queue reads on the spool's reader, the rest in the default executor.

With a tenant, tenant-specific lines (accounts, logs, samples, purges, segregation:
cmcd/admin/evidence_records.py) read only that tenant's rows; daemon-wide lines (backups, TLS,
time, capacity: cmcd/admin/evidence_host.py) hold no tenant's data. The run itself is written to
the operation log by the admin server (the verb has a target), naming who asked. cmcctl renders
the result (cmcd/admin/evidence_render.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cmcd.admin import evidence_host as host
from cmcd.admin import evidence_records as records
from cmcd.admin.evidence_lines import CONTROLS, STATUSES, Line, Run, utc
from cmcd.admin.evidence_probes import ntp_state
from cmcd.admin.verb import Args, Context, Verb, change

__all__ = ["CONTROLS", "EVIDENCE_VERBS", "Line", "ntp_state", "report_lines"]

log = logging.getLogger("cmcd.evidence")

Section = Callable[[Run], Awaitable[list[Line]]]

#: (control, item, section), in the order they are measured
SECTIONS: tuple[tuple[str, str, Section], ...] = (
    ("9.2.1", "users and API keys", records.accounts),
    ("9.2.3", "console admins with TOTP", records.privileged),
    ("9.4.1", "access to the daemon's files and socket", host.access),
    ("10.1.1", "encryption at rest", records.crypto_at_rest),
    ("10.1.1", "TLS on the listeners", host.tls_listeners),
    ("10.1.1", "outbound TLS policy", host.tls_outbound),
    ("12.3.1", "backups", host.backups),
    ("12.4.1", "logs written", records.logging),
    ("18.1.3", "retention of records", records.retention),
    ("CLD.8.1.5", "tenant purges", records.purges),
    ("CLD.9.5.1", "tenant segregation", records.segregation),
    ("12.4.4", "clock", host.clock),
    ("12.1.3", "capacity", host.capacity),  # after backups: it reads the newest backup's age
)


async def report_lines(run: Run) -> list[Line]:
    """Every section's lines, in the controls' order; a section that fails is a failed line."""
    out: list[Line] = []
    for control, item, section in SECTIONS:
        try:
            out += await section(run)
        except Exception as exc:
            log.exception("event=evidence_section_failed control=%s item=%r", control, item)
            out.append(Line(control, item, "-", "-", "fail", f"could not be measured: {exc}"))
    order = list(CONTROLS)
    return sorted(out, key=lambda line: order.index(line.control))


async def _evidence(ctx: Context, a: Args) -> Any:
    tenant = a.optional_text("tenant")
    tenant_id = await ctx.tenant_id(tenant)  # unknown: refused, logged
    now = time.time()
    started = time.monotonic()
    lines = await report_lines(Run(ctx, tenant, tenant_id, now))
    summary = {s: sum(1 for line in lines if line.status == s) for s in STATUSES}
    caller = a.caller
    log.info("event=evidence_report tenant=%s ok=%d attention=%d fail=%d", tenant or "-", *summary.values())
    return {
        "generated": now,
        "generated_iso": utc(now),
        "hostname": ctx.config.server.hostname,
        "timezone": ctx.config.server.timezone,
        "tenant": tenant,
        "asked_by": {"name": caller.name, "uid": caller.uid} if caller else None,
        "seconds": round(time.monotonic() - started, 3),
        "controls": CONTROLS,
        "summary": summary,
        "lines": [line.as_dict() for line in lines],
    }


EVIDENCE_VERBS: dict[str, Verb] = {
    # the server writes each run (and each refusal) to the operation log, naming who asked
    "evidence": change(_evidence, ("tenant",), "report tenant={tenant}"),
}
