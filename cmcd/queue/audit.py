"""Login and operation-log rows that are never lost to a store that cannot be written; never reads a message.

A row goes to the store at once (so `cmcctl log` shows it when the command returns). When that
write fails (the store's disk is full, its file system read-only, a lock held too long) the rows
are committed to the spool's outbox instead, beside the mail-log events, and EventShipper
(cmcd/queue/events.py) ships them when the store can take them again. Each row carries a unique
event_key and the store skips a key it already has, so shipping at least once never doubles a row.
Only when the spool cannot be written either are rows held in memory (up to MAX_UNWRITTEN) and
retried with the next shipment.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

from cmcd.queue.outbox import KINDS, AuditRecord
from cmcd.queue.spool import Spool
from cmcd.redact import redact_urls
from cmcd.store import AsyncStore
from cmcd.store.log_store import LoginRecord, OpRecord

log = logging.getLogger("cmcd.audit")

MAX_UNWRITTEN = 100_000  # rows held in memory while neither the store nor the spool can be written


class AuditLog:
    """Writes login and operation-log rows: to the store, else to the spool's outbox; never raises."""

    def __init__(self, spool: Spool, astore: AsyncStore):
        self.spool = spool
        self.astore = astore
        #: called after rows went to the outbox (EventShipper.wake: ship them as soon as possible)
        self.on_outbox: Callable[[], None] | None = None
        self._unwritten: list[tuple[str, AuditRecord]] = []
        self.deferred = 0  # rows that went through the outbox
        self.lost = 0  # rows given up: neither store, spool nor memory could hold them

    async def logins(self, records: Sequence[LoginRecord]) -> None:
        await self._write("login", records)

    async def op(
        self,
        *,
        ts: float,
        actor_uid: int | None,
        actor: str,
        action: str,
        target: str,
        result: str,
        tenant_id: int | None = None,
        detail: str = "",
    ) -> None:
        await self._write("ops", [OpRecord(ts, actor_uid, actor, action, target, result, tenant_id, detail)])

    async def ops(self, records: Sequence[OpRecord]) -> None:
        await self._write("ops", records)

    async def _write(self, kind: str, records: Sequence[AuditRecord]) -> None:
        if not records:
            return
        if kind == "ops":  # kept for years and shown to tenants (/v1/audit): no URL keeps its secrets
            records = [without_url_secrets(r) if isinstance(r, OpRecord) else r for r in records]
        store = self.astore.store
        try:
            if kind == "login":
                await self.astore.call(store.log_logins, [r for r in records if isinstance(r, LoginRecord)])
            else:
                await self.astore.call(store.log_ops, [r for r in records if isinstance(r, OpRecord)])
            return
        except Exception as exc:
            log.warning("event=audit_store_failed kind=%s rows=%d error=%r outbox=spool", kind, len(records), str(exc))
        await self._to_outbox(kind, records)

    async def _to_outbox(self, kind: str, records: Sequence[AuditRecord]) -> bool:
        try:
            await self.spool.put_audit(kind, records)
        except Exception as exc:
            log.error("event=audit_outbox_failed kind=%s rows=%d error=%r held=memory", kind, len(records), str(exc))
            self._unwritten.extend((kind, r) for r in records)
            over = len(self._unwritten) - MAX_UNWRITTEN
            if over > 0:
                del self._unwritten[:over]
                self.lost += over
                log.error("event=audit_rows_lost rows=%d reason=store_spool_and_memory_full", over)
            return False
        self.deferred += len(records)
        if self.on_outbox is not None:
            self.on_outbox()
        return True

    async def retry_unwritten(self) -> None:
        """Move rows held in memory to the outbox (called by the shipper before each shipment)."""
        held, self._unwritten = self._unwritten, []
        for i, kind in enumerate(KINDS):
            rows = [r for k, r in held if k == kind]
            if rows and not await self._to_outbox(kind, rows):  # held again, with the kinds not yet tried
                later = KINDS[i + 1 :]
                self._unwritten.extend((k, r) for k, r in held if k in later)
                return

    def backlog_in_memory(self) -> int:
        return len(self._unwritten)


def group_by_kind(rows: list[tuple[int, str, AuditRecord]]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {kind: [] for kind in KINDS}
    for _, kind, record in rows:
        out[kind].append(record)
    return out


def without_url_secrets(record: OpRecord) -> OpRecord:
    """RECORD with the user information, query string and fragment of every URL in its target
    and detail redacted (a webhook URL's token)."""
    target, detail = redact_urls(record.target), redact_urls(record.detail)
    if target == record.target and detail == record.detail:
        return record
    return dataclasses.replace(record, target=target, detail=detail)
