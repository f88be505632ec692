"""What an admin verb is: its checked arguments, who called it, what it works with, and how the
operation log records it. Types only; never serves a socket and never changes anything itself.

A verb module (tenant_verbs.py, queue_verbs.py, ...) defines handlers `async def h(ctx, args)` and
a table of `Verb`s; cmcd/admin/verbs.py puts the tables together and server.py dispatches to them.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from cmcd.errors import CmcdError
from cmcd.tenancy import Op

if TYPE_CHECKING:
    from cmcd.config import Config
    from cmcd.deliver.engine import DeliveryEngine
    from cmcd.queue.audit import AuditLog
    from cmcd.queue.scheduler import Scheduler
    from cmcd.queue.spool import Spool
    from cmcd.store import AsyncStore
    from cmcd.store.store import Store
    from cmcd.submit.service import SubmitService
    from cmcd.tenancy import Tenancy


class Peers(Protocol):
    """The other workers of the host, reached through their private admin sockets."""

    async def each(self, verb: str, **args: Any) -> list[Any]:
        """VERB's result from every other worker (raises CmcdError naming one that failed)."""
        ...


class BadRequest(CmcdError):
    """The request itself is malformed (missing or mistyped argument); nothing was changed."""


@dataclass(frozen=True)
class Caller:
    """The process at the other end of a connection, as the kernel reports it."""

    pid: int
    uid: int
    gid: int
    name: str


class Args:
    """A verb's arguments, checked: unknown keys refused, values typed; errors never quote values.

    Carries the caller and the operation-log target the server rendered, so a handler hands a
    tenancy command the Op it is to record (`args.op`)."""

    def __init__(self, verb: str, raw: Any, allowed: tuple[str, ...], caller: Caller | None = None, target: str = "-"):
        self.caller = caller
        self.target = target
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise BadRequest(f'{verb}: "args" must be a JSON object')
        unknown = sorted(k for k in raw if k not in allowed)
        if unknown:
            expected = ", ".join(allowed) if allowed else "none"
            raise BadRequest(f"{verb}: unknown argument {unknown[0]!r} (expected: {expected})")
        self.verb = verb
        self.raw: dict[str, Any] = raw

    @property
    def actor(self) -> tuple[str, int | None]:
        """(name, uid) of the caller; ("cmcd", None) for the daemon itself."""
        return (self.caller.name, self.caller.uid) if self.caller is not None else ("cmcd", None)

    @property
    def op(self) -> Op:
        """How a tenancy command records this request in the operation log."""
        actor, uid = self.actor
        return Op(actor=actor, actor_uid=uid, action=self.verb, target=self.target)

    def text(self, key: str) -> str:
        value = self.optional_text(key)
        if value is None:
            raise BadRequest(f"{self.verb}: missing argument {key!r}")
        return value

    def optional_text(self, key: str) -> str | None:
        value = self.raw.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise BadRequest(f"{self.verb}: argument {key!r} must be a non-empty string")
        return value

    def password(self) -> str | None:
        value = self.raw.get("password")
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise BadRequest(f"{self.verb}: password must be a non-empty string (or left out to have one generated)")
        if "\x00" in value:
            raise BadRequest(f"{self.verb}: password must not contain a NUL character")
        return value

    def flag(self, key: str) -> bool:
        """True only for a JSON true (a missing or other value is False)."""
        return self.raw.get(key) is True

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self.raw.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise BadRequest(f"{self.verb}: argument {key!r} must be an integer from {low} to {high}")
        return value


@dataclass(frozen=True)
class Context:
    """The parts of the daemon verbs work with. Replaced whole (dataclasses.replace) on a reload."""

    config: Config
    tenancy: Tenancy
    spool: Spool
    audit: AuditLog
    status: Callable[[], dict[str, Any]]
    scheduler: Scheduler | None = None
    engine: DeliveryEngine | None = None
    #: blocks a tenant being purged (close_tenant) in every way in
    intake: SubmitService | None = None
    #: ends a tenant's SMTP sessions; returns how many
    drop_sessions: Callable[[int], int] | None = None
    #: the host's other workers (worker 0's; None in a single process): a purge reaches every shard
    peers: Peers | None = None
    #: this process's metrics in the text exposition format (a worker's: its supervisor merges them)
    metrics_text: Callable[[], Awaitable[bytes]] | None = None

    @property
    def astore(self) -> AsyncStore:
        return self.tenancy.core.astore

    @property
    def store(self) -> Store:
        return self.tenancy.core.store

    async def tenant_id(self, name: str | None) -> int | None:
        """The id of tenant NAME (NotFound when there is none); None for no tenant."""
        return None if name is None else (await self.astore.call(self.store.tenant, name)).id


Handler = Callable[[Context, Args], Awaitable[Any]]


class Log(enum.Enum):
    """Who writes a verb's operation-log row."""

    #: nothing changes; the server logs a refusal of a request that named something (a read of
    #: another tenant's queue id or domain is refused, and the attempt is on record)
    READ = "read"
    #: a change outside tenancy (queue, retention, backups, an evidence run): the server logs it, done or refused
    SERVER = "server"
    #: one tenancy command: the command writes the row (done, or refused); the server writes one
    #: only for what was refused before the command ran (bad arguments) or failed inside cmcd
    COMMAND = "command"


@dataclass(frozen=True)
class Verb:
    handler: Handler
    args: tuple[str, ...]
    #: how the operation log names the target, e.g. "{tenant}/{login}"; parts (space-separated)
    #: naming an argument the request did not give are left out. None: the arguments that name a
    #: scope (tenant, name, login, domain, state, status)
    target: str | None = None
    #: the argument naming the tenant the row belongs to
    tenant_arg: str = "tenant"
    log: Log = Log.READ

    @property
    def mutation(self) -> bool:
        return self.log is not Log.READ


def read(handler: Handler, *args: str) -> Verb:
    return Verb(handler, args)


def command(handler: Handler, args: tuple[str, ...], target: str, tenant_arg: str = "tenant") -> Verb:
    """A verb that is one tenancy command."""
    return Verb(handler, args, target, tenant_arg, Log.COMMAND)


def change(handler: Handler, args: tuple[str, ...], target: str) -> Verb:
    """A verb that changes something outside tenancy; the server logs it."""
    return Verb(handler, args, target, "tenant", Log.SERVER)


@dataclass
class Stream:
    """A result sent as many lines: {"ok": true, "stream": true}, one JSON object per row, then
    {"end": true, "rows": N} (or {"end": true, "error": ...}). Memory stays flat for any size."""

    rows: AsyncIterator[dict[str, Any]]
