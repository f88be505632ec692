"""How every tenancy command runs: checked, one store transaction holding the change, the
directory version and the operation-log row, then the directory refreshed before it returns.

A command that is refused changes nothing; its operation-log row ("refused", with the reason)
goes through the audit log (the spool's outbox when the store cannot take it). Never speaks a
protocol: doors (admin socket, HTTP API) render the Refused it raises.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from cmcd import crypto
from cmcd.config import Config
from cmcd.db import transaction
from cmcd.errors import Conflict, NotFound, StoreError
from cmcd.queue.audit import AuditLog, without_url_secrets
from cmcd.store import AsyncStore
from cmcd.store.store import OpRecord, Store
from cmcd.tenancy.directory import Directory
from cmcd.tenancy.refusals import Reason, Refusal, Refused

if TYPE_CHECKING:
    from cmcd.tenancy.suppressions import Suppressions

log = logging.getLogger("cmcd.tenancy")

T = TypeVar("T")


@dataclass(frozen=True)
class Op:
    """Who asks for a change and how the operation log names it. ACTION and TARGET are the
    door's words for it (`user.add` and `acme/alice` from cmcctl, `api.users.add` from the API);
    DETAIL is added to the row of a change that was made. OK_ROW, when the door names what the
    change made (a key id, a webhook id), gives that row's (target, detail) from the command's
    change instead."""

    actor: str
    action: str
    target: str
    actor_uid: int | None = None
    detail: str = ""
    ok_row: Callable[[Any], tuple[str, str]] | None = None


def as_refused(exc: StoreError) -> Refused:
    """The typed refusal for a store's error (a Refused passes through)."""
    if isinstance(exc, Refused):
        return exc
    reason = (
        Reason.NOT_FOUND
        if isinstance(exc, NotFound)
        else Reason.CONFLICT
        if isinstance(exc, Conflict)
        else Reason.INVALID
    )
    code, enhanced = {Reason.NOT_FOUND: (550, "5.1.1"), Reason.CONFLICT: (550, "5.7.1")}.get(reason, (501, "5.5.4"))
    refused = Refused(Refusal(reason, code, enhanced, str(exc)))
    refused.__cause__ = exc
    return refused


class Core:
    """What every command group shares: the store, the audit log, the directory, the config."""

    def __init__(self, config: Config, astore: AsyncStore, audit: AuditLog, directory: Directory):
        self.config = config
        self.astore = astore
        self.store: Store = astore.store
        self.audit = audit
        self.directory = directory

    @property
    def suppressions(self) -> Suppressions:
        return self.directory.suppressions

    async def read(self, fn: Callable[..., T], *args: object) -> T:
        """A read on the store thread; a store error comes back as Refused."""
        try:
            return await self.astore.call(fn, *args)
        except StoreError as exc:
            raise as_refused(exc) from None

    async def change(
        self, op: Op, tenant: str | None, fn: Callable[[Store], T], detail: Callable[[T], str] | None = None
    ) -> T:
        """Run FN(store) in one transaction with the directory bump and OP's operation-log row
        (for TENANT, when named; its detail is DETAIL(result) when given, else OP's), then refresh
        the directory; Refused when the store refuses."""
        self.directory.changing()

        def tx() -> T:
            with transaction(self.store.conn):
                out = fn(self.store)
                tenant_id = self._tenant_id(tenant)
                self.store.bump_directory()
                target, said = (
                    op.ok_row(out) if op.ok_row is not None
                    else (op.target, op.detail if detail is None else detail(out))
                )  # fmt: skip
                row = OpRecord(time.time(), op.actor_uid, op.actor, op.action, target, "ok", tenant_id, said)
                self.store.log_ops([without_url_secrets(row)])  # a webhook URL's token is never on record
            return out

        try:
            out = await self.astore.call(tx)
        except StoreError as exc:
            await self.refuse(op, tenant, as_refused(exc))
        await self.directory.refresh()
        return out

    async def refuse(self, op: Op, tenant: str | None, refused: Refused) -> NoReturn:
        """Write OP's "refused" row (never dropped) and raise REFUSED."""
        try:
            tenant_id = await self.astore.call(self._tenant_id, tenant)
        except Exception:  # the store cannot be read: the row is still written, without its tenant
            log.exception("event=ops_log_tenant_unknown action=%s", op.action)
            tenant_id = None
        await self.audit.op(
            ts=time.time(), actor_uid=op.actor_uid, actor=op.actor, action=op.action, target=op.target,
            result="refused", tenant_id=tenant_id, detail=str(refused),
        )  # fmt: skip
        raise refused

    async def need(self, op: Op, tenant: str | None, fn: Callable[..., T], *args: Any) -> T:
        """A store read a change is worked out from: what it refuses (an unknown tenant or user,
        another tenant's domain) is refused, and on record, before any work (a password hashed,
        a key made, a URL looked up)."""
        try:
            return await self.astore.call(fn, *args)
        except StoreError as exc:
            await self.refuse(op, tenant, as_refused(exc))

    async def checked(self, op: Op, tenant: str | None, check: Callable[[], T]) -> T:
        """CHECK() (a rule from cmcd.tenancy.rules); its Refused is written to the log and raised."""
        try:
            return check()
        except Refused as refused:
            await self.refuse(op, tenant, refused)

    def _tenant_id(self, tenant: str | None) -> int | None:
        if tenant is None:
            return None
        row = self.store.conn.execute("SELECT id FROM tenants WHERE name = ?", (tenant,)).fetchone()
        return None if row is None else int(row[0])

    async def hash_password(self, password: str) -> str:
        """scrypt, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, crypto.hash_password, password)
