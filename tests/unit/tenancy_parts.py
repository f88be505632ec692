"""The parts every tenancy unit test builds: a store and a spool in a temporary directory, the
audit log over them, a directory with no poller (it moves only when a test or a command makes it)
and the Tenancy façade; torn down in the reverse order."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from cmcd.config import Config
from cmcd.queue.audit import AuditLog
from cmcd.queue.spool import Spool
from cmcd.store import AsyncStore, open_store
from cmcd.tenancy import Directory, Op, Tenancy


@contextlib.asynccontextmanager
async def open_tenancy(tmp_path: Path, config: Config | None = None) -> AsyncIterator[Tenancy]:
    astore = AsyncStore(open_store(tmp_path / "cmcd.db", tmp_path / "data.key"))
    spool = Spool(tmp_path / "spool", astore.store.keys)  # the audit log's fallback for rows the store cannot take
    spool.start()
    directory = Directory(astore, poll_s=0)
    await directory.start()
    try:
        yield Tenancy(config or Config(), astore, AuditLog(spool, astore), directory)
    finally:
        await directory.close()
        spool.stop()
        astore.close()


def op(action: str, target: str) -> Op:
    """An operator's Op, as cmcctl's would be."""
    return Op(actor="root", action=action, target=target, actor_uid=0)
