"""Serves cmcctl's JSON-lines requests on a local Unix socket, logging every change; never listens on the network or returns a message body.

Requests are `{"verb": "tenant.add", "args": {"name": "acme"}}`; replies are `{"ok": true, "result": ...}`
or `{"ok": false, "error": "..."}`. The caller is whoever the kernel says is at the other end
(SO_PEERCRED); who may connect at all is decided by the socket's mode (0660) and group.
Every mutation, done or refused, goes to the operation log; passwords never do.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import pwd
import socket
import stat
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from cmcd import crypto
from cmcd.admin import dkim_keys, logs
from cmcd.admin.retention import run_retention
from cmcd.config import Config
from cmcd.deliver.engine import DeliveryEngine
from cmcd.deliver.routing import make_resolver
from cmcd.errors import CmcdError, NotFound, StoreError
from cmcd.queue import manage
from cmcd.queue.audit import AuditLog
from cmcd.queue.scheduler import Scheduler
from cmcd.queue.spool import Spool
from cmcd.records import Tenant, User
from cmcd.store import AsyncStore
from cmcd.store.store import OpRecord
from cmcd.tenancy.suppressions import Suppressions
from cmcd.submit.service import SubmitService

log = logging.getLogger("cmcd.admin")

#: longest request line accepted; a longer one is discarded and answered with an error
MAX_LINE_BYTES = 1024 * 1024
#: the admin socket's mode from its creation on: owner and group (the operators) may connect
SOCKET_MODE = 0o660
QUEUE_LIST_DEFAULT = 100
QUEUE_LIST_MAX = 10_000


class BadRequest(CmcdError):
    """The request itself is malformed (missing or mistyped argument); nothing was changed."""


@dataclass(frozen=True)
class Caller:
    """The process at the other end of a connection, as the kernel reports it."""

    pid: int
    uid: int
    gid: int
    name: str


class _Args:
    """A verb's arguments, checked: unknown keys refused, values typed; errors never quote values."""

    def __init__(self, verb: str, raw: Any, allowed: tuple[str, ...], caller: Caller | None = None):
        self.caller = caller
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

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self.raw.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise BadRequest(f"{self.verb}: argument {key!r} must be an integer from {low} to {high}")
        return value


Handler = Callable[["AdminServer", _Args], Awaitable[Any]]


@dataclass(frozen=True)
class _Verb:
    handler: Handler
    args: tuple[str, ...]
    #: for mutations: how the operation log names the target, e.g. "{tenant}/{login}"; parts
    #: (space-separated) naming an argument the request did not give are left out
    target: str | None = None
    #: for mutations: the argument naming the tenant the change belongs to
    tenant_arg: str = "tenant"

    @property
    def mutation(self) -> bool:
        return self.target is not None


_READ_TARGET_ARGS = frozenset({"tenant", "name", "login", "domain", "state", "status"})


def _render_target(template: str, names: dict[str, str]) -> str:
    """TEMPLATE's space-separated parts filled from NAMES; a part naming an argument not given is
    left out ("{queue_id} tenant={tenant}" -> "25X... " alone when no tenant was named)."""
    out = []
    for part in template.split(" "):
        try:
            out.append(part.format_map(names))
        except KeyError:
            continue
    return " ".join(out) or "-"


def _user(u: User) -> dict[str, Any]:
    return {"tenant": u.tenant, "login": u.login, "role": u.role, "enabled": u.enabled, "created": u.created}


class _Connection:
    __slots__ = ("task", "busy")

    def __init__(self, task: asyncio.Task[Any] | None):
        self.task = task
        self.busy = False


class AdminServer:
    def __init__(
        self,
        config: Config,
        astore: AsyncStore,
        spool: Spool,
        on_change: Callable[[], None],
        status: Callable[[], dict[str, Any]],
        *,
        scheduler: Scheduler | None = None,
        engine: DeliveryEngine | None = None,
        suppressions: Suppressions | None = None,
        drop_sessions: Callable[[int], int] | None = None,
        audit: AuditLog | None = None,
        intake: SubmitService | None = None,
    ):
        self._path = config.path(config.admin.socket)
        self._audit = audit if audit is not None else AuditLog(spool, astore)
        self._resume_task: asyncio.Task[None] | None = None
        self._config = config
        self._scheduler = scheduler
        self._engine = engine
        self._suppressions = suppressions
        self._drop_sessions = drop_sessions
        self._intake = intake  # blocks a tenant being purged (close_tenant) in every way in
        self._astore = astore
        self._store = astore.store
        self._spool = spool
        self._on_change = on_change
        self._get_status = status
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._conns: set[_Connection] = set()
        self._closing = False

    @property
    def path(self) -> Path:
        return self._path

    # -- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on admin.socket (mode 0660), replacing a stale socket file but never a live one."""
        loop = asyncio.get_running_loop()
        sock = await loop.run_in_executor(None, _bind, self._path)
        self._inode = os.stat(self._path).st_ino
        try:
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_LINE_BYTES)
        except BaseException:
            sock.close()
            self._unlink()
            raise
        log.info("event=admin_listening socket=%s", self._path)
        self._resume_task = loop.create_task(self._resume_purges())

    async def _resume_purges(self) -> None:
        """Finish what a crash (kill -9, power loss) cut short: a tenant purge begun and not
        committed is run again from the start; a committed one's checkpoint and vacuum are redone."""
        try:
            for p in await self._astore.call(self._store.purges_pending):
                log.warning("event=tenant_purge_resumed tenant_id=%d", p["tenant_id"])
                tenant = Tenant(id=p["tenant_id"], name=p["name"])
                await self._purge(tenant, p["actor"], p["actor_uid"], note="resumed after a restart; ")
            if await self._astore.call(self._store.finish_erase):
                log.warning("event=tenant_purge_erase_finished reason=interrupted")
        except Exception:
            log.exception("event=tenant_purge_resume_failed")

    async def close(self) -> None:
        """Stop accepting, let a request in progress finish, drop idle connections, remove the socket."""
        self._closing = True
        if self._resume_task is not None:
            self._resume_task.cancel()
            await asyncio.gather(self._resume_task, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for conn in list(self._conns):
            if not conn.busy and conn.task is not None:
                conn.task.cancel()
        tasks = [c.task for c in self._conns if c.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        self._unlink()

    def _unlink(self) -> None:
        """Remove the socket file only if it is still the one this server created."""
        try:
            if self._inode is not None and os.lstat(self._path).st_ino == self._inode:
                self._path.unlink()
        except FileNotFoundError:
            pass
        self._inode = None

    # -- connections -----------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(asyncio.current_task())
        self._conns.add(conn)
        try:
            if self._closing:
                return
            caller = await self._peer(writer)
            while not self._closing:
                try:
                    line = await _next_line(reader)
                except _Overlong:
                    await _send(writer, _error(f"request longer than {MAX_LINE_BYTES} bytes; it was discarded"))
                    continue
                if line is None:
                    return
                if not line.strip():
                    continue
                conn.busy = True
                try:
                    reply = await self._handle(caller, line)
                    if isinstance(reply.get("result"), Stream):
                        await _stream(writer, reply["result"])
                    else:
                        await _send(writer, reply)
                finally:
                    conn.busy = False
        except OSError as exc:
            log.info("event=admin_connection_lost error=%r", str(exc))
        finally:
            self._conns.discard(conn)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def _peer(self, writer: asyncio.StreamWriter) -> Caller:
        sock = writer.get_extra_info("socket")
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        name = await asyncio.get_running_loop().run_in_executor(None, _user_name, uid)
        return Caller(pid=pid, uid=uid, gid=gid, name=name)

    async def _handle(self, caller: Caller, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError as exc:
            return _error(f'request is not valid JSON ({exc}); send one object a line, like {{"verb": "status"}}')
        if not isinstance(request, dict) or not isinstance(request.get("verb"), str):
            return _error('request must be a JSON object with a string "verb" and an object "args"')
        verb: str = request["verb"]
        spec = VERBS.get(verb)
        if spec is None:
            return _error(f"unknown verb {verb!r}; known verbs: {', '.join(VERBS)}")
        raw_args = request.get("args")
        result: Any = None
        error: str | None = None
        try:
            result = await spec.handler(self, _Args(verb, raw_args, spec.args, caller))
        except (StoreError, BadRequest) as exc:
            error = str(exc)
        except Exception as exc:
            log.exception("event=admin_request_failed verb=%s uid=%d", verb, caller.uid)
            error = f"{verb} failed inside cmcd ({exc}); see the daemon log"
        args = raw_args if isinstance(raw_args, dict) else {}
        if spec.mutation or (error is not None and args):
            # every change, and every refusal of a request that named something (a read of another
            # tenant's queue id or domain is refused, and the attempt is on record)
            await self._log_op(caller, verb, spec, args, error)
            if error is None:
                self._changed()
        if error is not None:
            return _error(error)
        return {"ok": True, "result": result}

    async def _log_op(self, caller: Caller, verb: str, spec: _Verb, args: dict[str, Any], error: str | None) -> None:
        names = {k: v for k, v in args.items() if isinstance(v, str) and k != "password" and v}
        # a refused read is named by its scope only, never by the addresses or queue id it asked for
        # (those rows can be shown to the tenant named, through the API's audit records)
        default = " ".join(f"{k}={{{k}}}" for k in spec.args if k in _READ_TARGET_ARGS)
        target = _render_target(spec.target or default, names)
        tenant = args.get(spec.tenant_arg)
        try:
            tenant_id = await self._astore.call(_tenant_id, self._store, tenant) if isinstance(tenant, str) else None
        except Exception:  # the store cannot be read: the row is still written, without its tenant
            log.exception("event=ops_log_tenant_unknown verb=%s uid=%d", verb, caller.uid)
            tenant_id = None
        # to the store, or to the spool's outbox when the store cannot take it: never dropped
        await self._audit.op(
            ts=time.time(),
            actor_uid=caller.uid,
            actor=caller.name,
            action=verb,
            target=target,
            result="ok" if error is None else "refused",
            tenant_id=tenant_id,
            detail=error or "",
        )

    def _changed(self) -> None:
        try:
            self._on_change()
        except Exception:
            log.exception("event=admin_on_change_failed")

    # -- verbs -----------------------------------------------------------------------------

    async def _status(self, a: _Args) -> Any:
        return dict(self._get_status())

    async def _tenant_add(self, a: _Args) -> Any:
        t = await self._astore.call(self._store.tenant_add, a.text("name"))
        return dataclasses.asdict(t)

    async def _tenant_list(self, a: _Args) -> Any:
        return [dataclasses.asdict(t) for t in await self._astore.call(self._store.tenants)]

    async def _tenant_show(self, a: _Args) -> Any:
        return await self._astore.call(self._store.tenant_summary, a.text("name"))

    async def _hash(self, password: str) -> str:
        return await asyncio.get_running_loop().run_in_executor(None, crypto.hash_password, password)

    async def _user_add(self, a: _Args) -> Any:
        tenant, login, role = a.text("tenant"), a.text("login"), a.optional_text("role") or "sender"
        password = a.password()
        generated = password is None
        if password is None:
            password = crypto.generate_password()
        await self._astore.call(self._store.tenant, tenant)  # refuse an unknown tenant before hashing
        u = await self._astore.call(self._store.user_add, tenant, login, role, await self._hash(password))
        return _user(u) | ({"password": password} if generated else {})

    async def _user_list(self, a: _Args) -> Any:
        return [_user(u) for u in await self._astore.call(self._store.users, a.text("tenant"))]

    async def _user_passwd(self, a: _Args) -> Any:
        tenant, login = a.text("tenant"), a.text("login")
        password = a.password()
        generated = password is None
        if password is None:
            password = crypto.generate_password()
        await self._astore.call(self._store.user, tenant, login)  # refuse an unknown user before hashing
        u = await self._astore.call(self._store.user_update, tenant, login, password_hash=await self._hash(password))
        return _user(u) | ({"password": password} if generated else {})

    async def _user_enable(self, a: _Args, enabled: bool) -> Any:
        u = await self._astore.call(self._store.user_update, a.text("tenant"), a.text("login"), enabled=enabled)
        return _user(u)

    async def _user_set_role(self, a: _Args) -> Any:
        """A new role for LOGIN; like a password change or disable, it ends the user's API sessions."""
        u = await self._astore.call(self._store.user_update, a.text("tenant"), a.text("login"), role=a.text("role"))
        return _user(u)

    async def _user_disable_verb(self, a: _Args) -> Any:
        return await self._user_enable(a, False)

    async def _user_enable_verb(self, a: _Args) -> Any:
        return await self._user_enable(a, True)

    async def _user_delete(self, a: _Args) -> Any:
        tenant, login = a.text("tenant"), a.text("login")
        await self._astore.call(self._store.user_delete, tenant, login)
        return {"tenant": tenant, "login": login, "deleted": True}

    async def _ipcred_add(self, a: _Args) -> Any:
        c = await self._astore.call(self._store.ipcred_add, a.text("tenant"), a.text("login"), a.text("cidr"))
        return {"tenant": c.tenant, "login": c.login, "cidr": c.cidr}

    async def _ipcred_list(self, a: _Args) -> Any:
        creds = await self._astore.call(self._store.ipcreds, a.optional_text("tenant"))
        return [{"tenant": c.tenant, "login": c.login, "cidr": c.cidr} for c in creds]

    async def _ipcred_delete(self, a: _Args) -> Any:
        tenant, login, cidr = a.text("tenant"), a.text("login"), a.text("cidr")
        await self._astore.call(self._store.ipcred_delete, tenant, login, cidr)
        return {"tenant": tenant, "login": login, "cidr": cidr, "deleted": True}

    async def _domain_add(self, a: _Args) -> Any:
        tenant, name = a.text("tenant"), a.text("domain").strip().lower().rstrip(".")
        await self._astore.call(self._store.tenant, tenant)  # refuse an unknown tenant before making keys
        try:
            keys = await asyncio.get_running_loop().run_in_executor(
                None, dkim_keys.new_keys, self._config.dkim, name, set(), time.time()
            )
        except ValueError:
            raise BadRequest(f"{name!r} is not a domain name (like example.com)") from None
        d = await self._astore.call(self._store.domain_add, tenant, name, keys)
        return {"tenant": d.tenant, "domain": d.name, "selectors": [k.selector for k in keys]}

    async def _domain_keys(self, a: _Args) -> Any:
        return await self._astore.call(self._store.dkim_keys, a.text("tenant"), a.text("domain"))

    async def _domain_records(self, a: _Args) -> list[dict[str, Any]]:
        tenant, domain = a.text("tenant"), a.text("domain").strip().lower().rstrip(".")
        keys = await self._astore.call(self._store.dkim_keys, tenant, domain)
        return dkim_keys.records(domain, keys, self._config.server.hostname)

    async def _domain_dns(self, a: _Args) -> Any:
        recs = await self._domain_records(a)
        return {"records": recs, "zone": dkim_keys.zone_lines(recs)}

    async def _domain_check(self, a: _Args) -> Any:
        recs = await self._domain_records(a)
        results = await dkim_keys.check(make_resolver(self._config), recs)
        states = {
            r["selector"]: res["status"]
            for r, res in zip(recs, results)
            if "selector" in r and res["status"] in ("published", "missing", "mismatch")
        }
        await self._astore.call(self._store.dkim_set_dns, a.text("tenant"), a.text("domain"), states)
        return results

    async def _dkim_rotate(self, a: _Args) -> Any:
        tenant, domain = a.text("tenant"), a.text("domain").strip().lower().rstrip(".")
        current = await self._astore.call(self._store.dkim_keys, tenant, domain)
        if any(k["state"] == "pending" for k in current):
            raise BadRequest(f"{domain} already has pending keys: activate or retire them first")
        taken = {k["selector"] for k in current}
        keys = await asyncio.get_running_loop().run_in_executor(
            None, dkim_keys.new_keys, self._config.dkim, domain, taken, time.time()
        )
        await self._astore.call(self._store.dkim_add, tenant, domain, keys, "pending")
        return {"domain": domain, "pending": [k.selector for k in keys]}

    async def _dkim_activate(self, a: _Args) -> Any:
        tenant, domain = a.text("tenant"), a.text("domain").strip().lower().rstrip(".")
        keys = await self._astore.call(self._store.dkim_keys, tenant, domain)
        pending = [k for k in keys if k["state"] == "pending"]
        if not pending:
            raise BadRequest(f"{domain} has no pending keys (dkim-rotate makes them)")
        unready = [k["selector"] for k in pending if k["dns_state"] != "published"]
        if unready and a.raw.get("force") is not True:
            raise BadRequest(
                f"{domain}: DNS does not show {', '.join(unready)} yet; run domain check after publishing (or force)"
            )
        algorithms = {k["algorithm"] for k in pending}
        # the keys they replace stay published but unused (standby) until dkim-retire
        old = {k["selector"] for k in keys if k["state"] == "active" and k["algorithm"] in algorithms}
        await self._astore.call(self._store.dkim_transition, tenant, domain, {"active": "standby"}, old)
        await self._astore.call(self._store.dkim_transition, tenant, domain, {"pending": "active"})
        return {"domain": domain, "active": [k["selector"] for k in pending], "standby": sorted(old)}

    async def _dkim_retire(self, a: _Args) -> Any:
        tenant, domain = a.text("tenant"), a.text("domain").strip().lower().rstrip(".")
        n = await self._astore.call(self._store.dkim_transition, tenant, domain, {"standby": "retired"})
        if not n:
            raise BadRequest(f"{domain} has no standby keys to retire")
        return {"domain": domain, "retired": n}

    async def _domain_import_key(self, a: _Args) -> Any:
        tenant, domain = a.text("tenant"), a.text("domain").strip().lower().rstrip(".")
        selector, pem = a.text("selector").lower(), a.text("pem")
        try:
            key = dkim_keys.imported_key(domain, selector, pem.encode())
        except ValueError as exc:
            raise BadRequest(f"domain.import-key: {exc}") from None
        await self._astore.call(self._store.domain, tenant, domain)
        old = {
            k["selector"]
            for k in await self._astore.call(self._store.dkim_keys, tenant, domain)
            if k["state"] == "active" and k["algorithm"] == key.algorithm
        }
        await self._astore.call(self._store.dkim_add, tenant, domain, [key], "active")
        await self._astore.call(self._store.dkim_transition, tenant, domain, {"active": "standby"}, old)
        return {"domain": domain, "selector": selector, "algorithm": key.algorithm, "standby": sorted(old)}

    async def _domain_list(self, a: _Args) -> Any:
        domains = await self._astore.call(self._store.domains, a.optional_text("tenant"))
        return [{"tenant": d.tenant, "domain": d.name} for d in domains]

    async def _tenant_names(self) -> dict[int, str]:
        return {t.id: t.name for t in await self._astore.call(self._store.tenants)}

    async def _tenant_scope(self, a: _Args) -> int | None:
        tenant = a.optional_text("tenant")
        return None if tenant is None else (await self._astore.call(self._store.tenant, tenant)).id

    async def _named(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        names = await self._tenant_names()
        return [{"tenant": names.get(r["tenant_id"], str(r["tenant_id"]))} | r for r in rows]

    async def _queue_list(self, a: _Args) -> Any:
        tenant_id = await self._tenant_scope(a)
        limit = a.integer("limit", QUEUE_LIST_DEFAULT, 1, QUEUE_LIST_MAX)
        state = a.optional_text("state")
        if state is not None and state not in manage.STATES:
            raise BadRequest(f"queue.list: state must be one of {', '.join(manage.STATES)}")
        older = a.integer("older_than", 0, 0, 10 * 365 * 86400)
        spool = self._spool
        page: dict[str, Any] = await spool.read(
            functools.partial(
                manage.list_page,
                keys=spool.keys,
                tenant_id=tenant_id,
                state=state,
                domain=a.optional_text("domain"),
                received_before=time.time() - older if older else None,
                after=a.optional_text("after") or "",
                limit=limit,
            )
        )
        return {"items": await self._named(page["items"]), "next": page["next"]}

    async def _queue_show(self, a: _Args) -> Any:
        tenant_id = await self._tenant_scope(a)
        spool = self._spool
        row: dict[str, Any] = await spool.read(
            functools.partial(manage.show, keys=spool.keys, queue_id=a.text("queue_id"), tenant_id=tenant_id)
        )
        return (await self._named([row]))[0]

    async def _queue_summary(self, a: _Args) -> Any:
        tenant_id = await self._tenant_scope(a)
        return await self._spool.read(functools.partial(manage.summary, now=time.time(), tenant_id=tenant_id))

    def _wake(self) -> None:
        if self._scheduler is not None:
            self._scheduler.wake()

    async def _queue_retry(self, a: _Args) -> Any:
        tenant_id = await self._tenant_scope(a)
        everything = a.raw.get("all") is True
        queue_id, domain = a.optional_text("queue_id"), a.optional_text("domain")
        if sum((queue_id is not None, domain is not None, everything)) != 1:
            raise BadRequest("queue.retry: give exactly one of queue_id, domain or all")
        if domain is not None and self._engine is not None:
            self._engine.revive(domain)
        n = await self._spool.call(
            functools.partial(
                manage.retry, now=time.time(), queue_id=queue_id, domain=domain, everything=everything,
                tenant_id=tenant_id,
            )
        )  # fmt: skip
        self._wake()
        return {"recipients": n}

    def _one_target(self, a: _Args, verb: str) -> str | None:
        """A queue id (optionally scoped by tenant), or a tenant for all its messages."""
        queue_id = a.optional_text("queue_id")
        if queue_id is None and a.optional_text("tenant") is None:
            raise BadRequest(f"{verb}: give a queue_id or a tenant")
        return queue_id

    async def _queue_hold(self, a: _Args) -> Any:
        queue_id = self._one_target(a, "queue.hold")
        tenant_id = await self._tenant_scope(a)
        n = await self._spool.call(functools.partial(manage.hold, queue_id=queue_id, tenant_id=tenant_id))
        return {"recipients": n}

    async def _queue_release(self, a: _Args) -> Any:
        queue_id = self._one_target(a, "queue.release")
        tenant_id = await self._tenant_scope(a)
        n = await self._spool.call(
            functools.partial(manage.release, now=time.time(), queue_id=queue_id, tenant_id=tenant_id)
        )
        self._wake()
        return {"recipients": n}

    async def _queue_delete(self, a: _Args) -> Any:
        tenant_id = await self._tenant_scope(a)
        n = await self._spool.call(
            functools.partial(
                manage.delete, keys=self._spool.keys, now=time.time(), queue_id=a.text("queue_id"), tenant_id=tenant_id
            )
        )
        if self._engine is not None:
            self._engine.erased()
        return {"queue_id": a.text("queue_id"), "recipients": n, "deleted": True}

    # -- logs, retention, purge -------------------------------------------------------------

    async def _log(self, a: _Args, kind: str) -> Stream:
        tz = ZoneInfo(self._config.server.timezone)
        now = time.time()
        filters: dict[str, Any] = {}
        try:
            for key in ("since", "until"):
                text = a.optional_text(key)
                if text is not None:
                    filters[key] = logs.parse_when(text, now, tz)
        except logs.TimeError as exc:
            raise BadRequest(f"{a.verb}: {exc}") from None
        filters["tenant_id"] = await self._tenant_scope(a)
        filters["status"] = a.optional_text("status")
        if kind == "mail":
            filters |= {k: a.optional_text(k) for k in ("rcpt", "sender", "queue_id")}
        limit = a.integer("limit", 0, 0, 100_000_000) or None
        return Stream(logs.rows(self._astore, kind, tz, limit, **filters))

    async def _log_mail(self, a: _Args) -> Any:
        return await self._log(a, "mail")

    async def _log_login(self, a: _Args) -> Any:
        return await self._log(a, "login")

    async def _log_ops(self, a: _Args) -> Any:
        return await self._log(a, "ops")

    async def _retention_run(self, a: _Args) -> Any:
        caller = a.caller
        return await run_retention(
            self._config, self._astore, time.time(), actor=caller.name if caller else "cmcd",
            actor_uid=caller.uid if caller else None, audit=self._audit,
        )  # fmt: skip

    async def _tenant_delete(self, a: _Args) -> Any:
        name = a.text("name")
        if a.raw.get("purge") is not True:
            raise BadRequest("tenant.delete: a tenant is only removed with everything it owns; pass purge: true")
        caller = a.caller
        actor, actor_uid = (caller.name, caller.uid) if caller else ("cmcd", None)
        # marked first: a purge cut short (kill -9 after the queue went, before the store's
        # transaction committed) is finished by the next start (_resume_purges)
        tenant = await self._astore.call(self._store.purge_begin, name, actor, actor_uid)
        result = await self._purge(tenant, actor, actor_uid)
        return {"tenant": name} | result

    async def _purge(self, tenant: Tenant, actor: str, actor_uid: int | None, note: str = "") -> dict[str, int]:
        """Intake closed to the tenant, sessions dropped, queue purged, then the store's rows in one
        transaction with the operation-log row that says so (the tenant's number, no name, login or
        address), then the erase (checkpoint and vacuum). Proceed carefully: each step may be cut
        short by a crash and is then run again by the next start, so each must be safe to repeat."""
        log.info("event=tenant_purge_started tenant_id=%d", tenant.id)
        logins = tuple(u.login for u in await self._astore.call(self._store.users, tenant.name))
        try:
            return await self._purge_closed(tenant, logins, actor, actor_uid, note)
        finally:
            if self._intake is not None:
                self._intake.reopen_tenant(tenant.id)

    async def _purge_closed(
        self, tenant: Tenant, logins: tuple[str, ...], actor: str, actor_uid: int | None, note: str
    ) -> dict[str, int]:
        if self._intake is not None:
            # Closes the race with intake. From here on no way in hands the spool anything of the
            # tenant; what was handed over before is already in the writer's FIFO queue, ahead of
            # the purge queued below, so it lands first and is erased with the rest (its sender
            # got a 250 or 202 for a message that is then erased, or was cut off by the drop).
            self._intake.close_tenant(tenant.id, logins)
        sessions = self._drop_sessions(tenant.id) if self._drop_sessions is not None else 0
        messages = await self._spool.call(functools.partial(manage.purge_tenant, tenant_id=tenant.id, logins=logins))
        log.info("event=tenant_purge_queue_done tenant_id=%d messages=%d", tenant.id, messages)
        op = OpRecord(
            time.time(), actor_uid, actor, "tenant.purge", f"tenant #{tenant.id}", "ok",
            detail=f"{note}sessions={sessions} messages={messages}",
        )  # fmt: skip
        counts = await self._astore.call(self._store.tenant_purge, tenant.name, op)
        log.info("event=tenant_purge_store_done tenant_id=%d", tenant.id)
        await self._astore.call(self._store.finish_erase)
        if self._suppressions is not None:
            self._suppressions.load(await self._astore.call(self._store.suppression_index))
        self._changed()
        if self._intake is not None:
            await self._intake.current()  # the caches without the tenant, before it is reopened
        log.info("event=tenant_purge_done tenant_id=%d", tenant.id)
        return {"sessions": sessions, "messages": messages} | counts

    async def _tenant_set(self, a: _Args) -> Any:
        name = a.text("name")
        dsn = a.raw.get("dsn")
        if dsn is not None and not isinstance(dsn, bool):
            raise BadRequest("tenant.set: dsn must be true or false")
        mode = a.optional_text("suppressed_rcpt")
        if dsn is None and mode is None:
            raise BadRequest("tenant.set: nothing to change (dsn, suppressed_rcpt)")
        await self._astore.call(self._store.tenant_set, name, dsn=dsn, suppressed_rcpt=mode)
        return await self._astore.call(self._store.tenant_summary, name)

    async def _suppression_list(self, a: _Args) -> Any:
        limit = a.integer("limit", QUEUE_LIST_DEFAULT, 1, QUEUE_LIST_MAX)
        return await self._astore.call(self._store.suppressions, a.text("tenant"), limit)

    async def _suppression_add(self, a: _Args) -> Any:
        tenant, address = a.text("tenant"), a.text("address")
        if "@" not in address or any(c in address for c in " \r\n\0"):
            raise BadRequest(f"suppression.add: {address!r} is not an email address")
        added = await self._astore.call(self._store.suppression_add, tenant, address, "added by operator")
        if self._suppressions is not None:
            self._suppressions.add((await self._astore.call(self._store.tenant, tenant)).id, address)
        return {"tenant": tenant, "address": address, "added": added}

    async def _suppression_delete(self, a: _Args) -> Any:
        tenant, address = a.text("tenant"), a.text("address")
        await self._astore.call(self._store.suppression_delete, tenant, address)
        if self._suppressions is not None:
            self._suppressions.discard((await self._astore.call(self._store.tenant, tenant)).id, address)
        return {"tenant": tenant, "address": address, "deleted": True}


VERBS: dict[str, _Verb] = {
    "status": _Verb(AdminServer._status, ()),
    "tenant.add": _Verb(AdminServer._tenant_add, ("name",), target="{name}", tenant_arg="name"),
    "tenant.list": _Verb(AdminServer._tenant_list, ()),
    "tenant.show": _Verb(AdminServer._tenant_show, ("name",)),
    "user.add": _Verb(AdminServer._user_add, ("tenant", "login", "role", "password"), target="{tenant}/{login}"),
    "user.list": _Verb(AdminServer._user_list, ("tenant",)),
    "user.passwd": _Verb(AdminServer._user_passwd, ("tenant", "login", "password"), target="{tenant}/{login}"),
    "user.disable": _Verb(AdminServer._user_disable_verb, ("tenant", "login"), target="{tenant}/{login}"),
    "user.enable": _Verb(AdminServer._user_enable_verb, ("tenant", "login"), target="{tenant}/{login}"),
    "user.delete": _Verb(AdminServer._user_delete, ("tenant", "login"), target="{tenant}/{login}"),
    "user.set-role": _Verb(
        AdminServer._user_set_role, ("tenant", "login", "role"), target="{tenant}/{login} role={role}"
    ),
    "ipcred.add": _Verb(AdminServer._ipcred_add, ("tenant", "login", "cidr"), target="{tenant}/{login} {cidr}"),
    "ipcred.list": _Verb(AdminServer._ipcred_list, ("tenant",)),
    "ipcred.delete": _Verb(AdminServer._ipcred_delete, ("tenant", "login", "cidr"), target="{tenant}/{login} {cidr}"),
    "domain.add": _Verb(AdminServer._domain_add, ("tenant", "domain"), target="{tenant}/{domain}"),
    "domain.list": _Verb(AdminServer._domain_list, ("tenant",)),
    "domain.keys": _Verb(AdminServer._domain_keys, ("tenant", "domain")),
    "domain.dns": _Verb(AdminServer._domain_dns, ("tenant", "domain")),
    "domain.check": _Verb(AdminServer._domain_check, ("tenant", "domain"), target="{tenant}/{domain}"),
    "domain.dkim-rotate": _Verb(AdminServer._dkim_rotate, ("tenant", "domain"), target="{tenant}/{domain}"),
    "domain.dkim-activate": _Verb(
        AdminServer._dkim_activate, ("tenant", "domain", "force"), target="{tenant}/{domain}"
    ),
    "domain.dkim-retire": _Verb(AdminServer._dkim_retire, ("tenant", "domain"), target="{tenant}/{domain}"),
    "domain.import-key": _Verb(
        AdminServer._domain_import_key, ("tenant", "domain", "selector", "pem"), target="{tenant}/{domain} {selector}"
    ),
    "tenant.delete": _Verb(AdminServer._tenant_delete, ("name", "purge")),
    "log.mail": _Verb(
        AdminServer._log_mail, ("tenant", "since", "until", "rcpt", "sender", "queue_id", "status", "limit")
    ),
    "log.login": _Verb(AdminServer._log_login, ("tenant", "since", "until", "status", "limit")),
    "log.ops": _Verb(AdminServer._log_ops, ("tenant", "since", "until", "status", "limit")),
    "retention.run": _Verb(AdminServer._retention_run, ()),
    "tenant.set": _Verb(
        AdminServer._tenant_set, ("name", "dsn", "suppressed_rcpt"), target="{name}", tenant_arg="name"
    ),
    "queue.list": _Verb(AdminServer._queue_list, ("tenant", "state", "domain", "older_than", "after", "limit")),
    "queue.show": _Verb(AdminServer._queue_show, ("queue_id", "tenant")),
    "queue.summary": _Verb(AdminServer._queue_summary, ("tenant",)),
    "queue.retry": _Verb(
        AdminServer._queue_retry,
        ("queue_id", "domain", "all", "tenant"),
        target="{queue_id} domain={domain} tenant={tenant}",
    ),
    "queue.hold": _Verb(AdminServer._queue_hold, ("queue_id", "tenant"), target="{queue_id} tenant={tenant}"),
    "queue.release": _Verb(AdminServer._queue_release, ("queue_id", "tenant"), target="{queue_id} tenant={tenant}"),
    "queue.delete": _Verb(AdminServer._queue_delete, ("queue_id", "tenant"), target="{queue_id} tenant={tenant}"),
    "suppression.list": _Verb(AdminServer._suppression_list, ("tenant", "limit")),
    "suppression.add": _Verb(AdminServer._suppression_add, ("tenant", "address"), target="{tenant}"),
    "suppression.delete": _Verb(AdminServer._suppression_delete, ("tenant", "address"), target="{tenant}"),
}


@dataclass
class Stream:
    """A result sent as many lines: {"ok": true, "stream": true}, one JSON object per row, then
    {"end": true, "rows": N} (or {"end": true, "error": ...}). Memory stays flat for any size."""

    rows: AsyncIterator[dict[str, Any]]


async def _stream(writer: asyncio.StreamWriter, stream: Stream) -> None:
    await _send(writer, {"ok": True, "stream": True})
    n = 0
    try:
        async for row in stream.rows:
            writer.write(json.dumps(row).encode("utf-8") + b"\n")
            n += 1
            if n % 500 == 0:
                await writer.drain()
    except (StoreError, BadRequest) as exc:
        await _send(writer, {"end": True, "rows": n, "error": str(exc)})
        return
    await _send(writer, {"end": True, "rows": n})


class _Overlong(Exception):
    """A request line passed MAX_LINE_BYTES; it has been read and thrown away."""


async def _next_line(reader: asyncio.StreamReader) -> bytes | None:
    """The next request line, or None at end of input; raise _Overlong after discarding a line that is too long."""
    overlong = False
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            return None if overlong or not exc.partial else exc.partial
        except asyncio.LimitOverrunError as exc:
            await reader.readexactly(exc.consumed)  # drop what is buffered; keep dropping up to the newline
            overlong = True
            continue
        if overlong:
            raise _Overlong
        return line


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


async def _send(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
    writer.write(json.dumps(reply).encode("utf-8") + b"\n")
    await writer.drain()


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _tenant_id(store: Any, name: str) -> int | None:
    try:
        return int(store.tenant(name).id)
    except NotFound:
        return None


def _bind(path: Path) -> socket.socket:
    """Bind a Unix socket at PATH and set its mode before it listens, so no other mode is ever reachable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise CmcdError(f"{path}: exists and is not a socket; remove it or set admin.socket to another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2)
        try:
            probe.connect(str(path))
            live = True
        except (ConnectionRefusedError, FileNotFoundError):
            live = False
        except OSError:
            live = True
        finally:
            probe.close()
        if live:
            raise CmcdError(f"{path}: another process is serving the admin socket (is cmcd already running?)")
        path.unlink()
        log.info("event=admin_stale_socket_removed socket=%s", path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Linux gives the file bind() creates the socket inode's mode less the umask: set that
        # mode first, so the file is never wider than SOCKET_MODE, not even between bind() and
        # the chmod below (which only adds back group write a umask like 022 took). The umask
        # is process-wide and other threads run: it is not touched.
        os.fchmod(sock.fileno(), SOCKET_MODE)
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise CmcdError(f"{path}: cannot create the admin socket (admin.socket): {exc.strerror or exc}") from None
    try:
        os.chmod(path, SOCKET_MODE)
    except OSError as exc:
        sock.close()
        path.unlink()
        raise CmcdError(f"{path}: cannot create the admin socket (admin.socket): {exc.strerror or exc}") from None
    return sock
