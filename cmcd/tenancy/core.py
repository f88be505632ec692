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
from cmcd.store.log_store import OpRecord
from cmcd.store.store import Store
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
    change instead. REFUSED_TEXT, when the door tells its caller less than the refusal says
    (a login taken by another tenant), is what a "refused" row's detail says instead: the
    tenant reads its own rows through the API."""

    actor: str
    action: str
    target: str
    actor_uid: int | None = None
    detail: str = ""
    ok_row: Callable[[Any], tuple[str, str]] | None = None
    refused_text: Callable[[Refused], str] | None = None


#: an operation-log row keeps at most this much of a target or detail (they may echo input)
MAX_TARGET_CHARS = 200
MAX_DETAIL_CHARS = 500


def _clip(text: str, most: int) -> str:
    return text if len(text) <= most else text[: most - 1] + "…"


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
        self,
        op: Op,
        tenant: str | None,
        fn: Callable[[Store], T],
        detail: Callable[[T], str] | None = None,
        *,
        accounts: bool = True,
        removals: bool = False,
    ) -> T:
        """Run FN(store) in one transaction with the directory bump and OP's operation-log row
        (for TENANT, when named; its detail is DETAIL(result) when given, else OP's), then refresh
        the directory; Refused when the store refuses. ACCOUNTS and REMOVALS say which version
        the change moves (an added suppression moves neither: its row id is newer)."""
        if accounts:
            self.directory.changing()

        def tx() -> T:
            with transaction(self.store.conn):
                out = fn(self.store)
                tenant_id = self._tenant_id(tenant)
                if accounts or removals:
                    self.store.bump_directory(accounts=accounts, removals=removals)
                target, said = (
                    op.ok_row(out) if op.ok_row is not None
                    else (op.target, op.detail if detail is None else detail(out))
                )  # fmt: skip
                row = OpRecord(time.time(), op.actor_uid, op.actor, op.action, _clip(target, MAX_TARGET_CHARS), "ok",
                               tenant_id, _clip(said, MAX_DETAIL_CHARS))  # fmt: skip
                self.store.log_ops([without_url_secrets(row)])  # a webhook URL's token is never on record
            return out

        try:
            out = await self.astore.call(tx)
        except StoreError as exc:
            await self.refuse(op, tenant, as_refused(exc))
        try:
            await self.directory.refresh()
        except Exception:  # committed: the poller brings the directory up to date when it can
            self.directory.refresh_failures += 1
            log.exception("event=directory_refresh_failed action=%s", op.action)
        return out

    async def refuse(self, op: Op, tenant: str | None, refused: Refused) -> NoReturn:
        """Write OP's "refused" row (never dropped) and raise REFUSED."""
        try:
            tenant_id = await self.astore.call(self._tenant_id, tenant)
        except Exception:  # the store cannot be read: the row is still written, without its tenant
            log.exception("event=ops_log_tenant_unknown action=%s", op.action)
            tenant_id = None
        said = op.refused_text(refused) if op.refused_text is not None else str(refused)
        await self.audit.op(
            ts=time.time(), actor_uid=op.actor_uid, actor=op.actor, action=op.action,
            target=_clip(op.target, MAX_TARGET_CHARS), result="refused", tenant_id=tenant_id,
            detail=_clip(said, MAX_DETAIL_CHARS),
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
