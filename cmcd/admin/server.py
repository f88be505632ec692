"""Serves cmcctl's JSON-lines requests on a local Unix socket; never listens on the network or returns a message body.

Requests are `{"verb": "tenant.add", "args": {"name": "acme"}}`; replies are `{"ok": true, "result": ...}`
or `{"ok": false, "error": "..."}`. The caller is whoever the kernel says is at the other end
(SO_PEERCRED); who may connect at all is decided by the socket's mode (0660) and group.

This module is the transport: socket, peer credentials, framing and dispatch to the verb table
(cmcd/admin/verbs.py). Every mutation, done or refused, goes to the operation log, passwords
never do: a verb that is a tenancy command writes its own row (verb.Log.COMMAND); this server
writes the rows of the others (queue, retention, backups, evidence) and of refused reads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import pwd
import socket
import stat
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cmcd.admin import purge
from cmcd.admin.verb import Args, BadRequest, Caller, Context, Log, Stream, Verb
from cmcd.admin.verbs import VERBS
from cmcd.config import Config
from cmcd.deliver.engine import DeliveryEngine
from cmcd.errors import CmcdError, NotFound, StoreError
from cmcd.queue.scheduler import Scheduler
from cmcd.queue.spool import Spool
from cmcd.submit.service import SubmitService
from cmcd.tenancy import Tenancy
from cmcd.tenancy.refusals import Refused

log = logging.getLogger("cmcd.admin")

#: longest request line accepted; a longer one is discarded and answered with an error
MAX_LINE_BYTES = 1024 * 1024
#: how long a shutdown waits for a request in progress (a stream to a reader that stopped reading)
CLOSE_WAIT_S = 10.0
#: the admin socket's mode from its creation on: owner and group (the operators) may connect
SOCKET_MODE = 0o660

_READ_TARGET_ARGS = frozenset({"tenant", "name", "login", "domain", "state", "status"})


def render_target(template: str, names: dict[str, str]) -> str:
    """TEMPLATE's space-separated parts filled from NAMES; a part naming an argument not given is
    left out ("{queue_id} tenant={tenant}" -> "25X... " alone when no tenant was named)."""
    out = []
    for part in template.split(" "):
        try:
            out.append(part.format_map(names))
        except KeyError:
            continue
    return " ".join(out) or "-"


def _target(spec: Verb, raw: Any) -> str:
    """How the operation log names what a request is about: the verb's template, or for a read
    its scope only, never the addresses or queue id it asked for (those rows can be shown to the
    tenant named, through the API's audit records). Never a password."""
    args = raw if isinstance(raw, dict) else {}
    names = {k: v for k, v in args.items() if isinstance(v, str) and k != "password" and v}
    default = " ".join(f"{k}={{{k}}}" for k in spec.args if k in _READ_TARGET_ARGS)
    return render_target(spec.target or default, names)


class _Connection:
    __slots__ = ("task", "busy")

    def __init__(self, task: asyncio.Task[Any] | None):
        self.task = task
        self.busy = False


class SocketServer:
    """The admin socket's transport: a Unix socket at PATH (mode 0660), JSON lines in, one reply
    (or a stream) out per request; what a request does is `handle`'s. PRIVATE: only processes of
    this user may connect (a worker's socket, spoken to by its supervisor)."""

    def __init__(self, path: Path, *, private: bool = False):
        self._path = path
        self.private = private
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._conns: set[_Connection] = set()
        self._closing = False

    @property
    def path(self) -> Path:
        return self._path

    async def handle(self, caller: Caller, line: bytes) -> dict[str, Any]:
        raise NotImplementedError

    # -- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on the path (mode 0660), replacing a stale socket file but never a live one."""
        loop = asyncio.get_running_loop()
        sock = await loop.run_in_executor(None, _bind, self._path)
        self._inode = os.stat(self._path).st_ino
        try:
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_LINE_BYTES)
        except BaseException:
            sock.close()
            self._unlink()
            raise
        log.info("event=admin_listening socket=%s private=%s", self._path, str(self.private).lower())

    async def close(self) -> None:
        """Stop accepting, let a request in progress finish, drop idle connections, remove the socket."""
        self._closing = True
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for conn in list(self._conns):
            if not conn.busy and conn.task is not None:
                conn.task.cancel()
        tasks = [c.task for c in self._conns if c.task is not None]
        if tasks:  # a request in progress may finish; one stuck on a reader that stopped reading may not
            _, stuck = await asyncio.wait(tasks, timeout=CLOSE_WAIT_S)
            for task in stuck:
                task.cancel()
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
            if self.private and caller.uid != os.getuid():
                log.warning("event=admin_private_refused uid=%d socket=%s", caller.uid, self._path)
                return
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
                    reply = await self.handle(caller, line)
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


class AdminServer(SocketServer):
    """The verbs of one cmcd process. PRIVATE (a worker's socket): a request may name the caller its
    supervisor serves ("as"), ask for no operation-log row ("log": false: the supervisor has the
    row written once, by worker 0, with "record": the outcome of a verb it fanned out)."""

    def __init__(
        self,
        config: Config,
        tenancy: Tenancy,
        spool: Spool,
        status: Callable[[], dict[str, Any]],
        *,
        scheduler: Scheduler | None = None,
        engine: DeliveryEngine | None = None,
        drop_sessions: Callable[[int], int] | None = None,
        intake: SubmitService | None = None,
        verbs: dict[str, Verb] = VERBS,
        path: Path | None = None,
        private: bool = False,
        resume_purges: bool = True,
        extra: dict[str, Any] | None = None,
    ):
        super().__init__(path if path is not None else config.path(config.admin.socket), private=private)
        self.context = Context(
            config=config, tenancy=tenancy, spool=spool, audit=tenancy.core.audit, status=status,
            scheduler=scheduler, engine=engine, intake=intake, drop_sessions=drop_sessions, **(extra or {}),
        )  # fmt: skip
        self._verbs = verbs
        self._resume_purges = resume_purges
        self._resume_task: asyncio.Task[None] | None = None

    def reconfigure(self, config: Config) -> None:
        """A reload: verbs use CONFIG from the next request on (the socket stays where it is)."""
        self.context = dataclasses.replace(self.context, config=config)

    async def start(self) -> None:
        await super().start()
        if self._resume_purges:
            self._resume_task = asyncio.get_running_loop().create_task(purge.resume(self.context))

    async def close(self) -> None:
        if self._resume_task is not None:
            self._resume_task.cancel()
            await asyncio.gather(self._resume_task, return_exceptions=True)
        await super().close()

    async def handle(self, caller: Caller, line: bytes) -> dict[str, Any]:
        return await self._handle(caller, line)

    async def _handle(self, caller: Caller, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError as exc:
            return _error(f'request is not valid JSON ({exc}); send one object a line, like {{"verb": "status"}}')
        if not isinstance(request, dict) or not isinstance(request.get("verb"), str):
            return _error('request must be a JSON object with a string "verb" and an object "args"')
        verb: str = request["verb"]
        spec = self._verbs.get(verb)
        if spec is None:
            return _error(f"unknown verb {verb!r}; known verbs: {', '.join(self._verbs)}")
        raw_args = request.get("args")
        target = _target(spec, raw_args)
        if self.private:  # the supervisor speaks for the operator it serves
            caller = _forwarded(request.get("as"), caller)
            if "record" in request:  # the outcome of a verb the supervisor fanned out: its one row
                args = raw_args if isinstance(raw_args, dict) else {}
                record = request["record"]
                await self._log_op(caller, verb, spec, target, args, None if record == "ok" else str(record))
                return {"ok": True, "result": None}
        logged = not (self.private and request.get("log") is False)
        result: Any = None
        error: str | None = None
        on_record = False  # a tenancy command's refusal: the command wrote its row
        try:
            result = await spec.handler(self.context, Args(verb, raw_args, spec.args, caller, target))
        except (StoreError, BadRequest) as exc:
            error = str(exc)  # a Refused's text is its CLI message
            on_record = spec.log is Log.COMMAND and isinstance(exc, Refused)
        except Exception as exc:
            log.exception("event=admin_request_failed verb=%s uid=%d", verb, caller.uid)
            error = f"{verb} failed inside cmcd ({exc}); see the daemon log"
        args = raw_args if isinstance(raw_args, dict) else {}
        if logged and (spec.log is Log.SERVER or (error is not None and not on_record and (spec.mutation or args))):
            await self._log_op(caller, verb, spec, target, args, error)
        if error is not None:
            return _error(error)
        return {"ok": True, "result": result}

    async def _log_op(
        self, caller: Caller, verb: str, spec: Verb, target: str, args: dict[str, Any], error: str | None
    ) -> None:
        tenant = args.get(spec.tenant_arg)
        ctx = self.context
        try:
            tenant_id = await ctx.astore.call(_tenant_id, ctx.store, tenant) if isinstance(tenant, str) else None
        except Exception:  # the store cannot be read: the row is still written, without its tenant
            log.exception("event=ops_log_tenant_unknown verb=%s uid=%d", verb, caller.uid)
            tenant_id = None
        # to the store, or to the spool's outbox when the store cannot take it: never dropped
        await ctx.audit.op(
            ts=time.time(),
            actor_uid=caller.uid,
            actor=caller.name,
            action=verb,
            target=target,
            result="ok" if error is None else "refused",
            tenant_id=tenant_id,
            detail=error or "",
        )


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


def _forwarded(raw: Any, peer: Caller) -> Caller:
    """The caller a supervisor names in a request ("as"), else the peer itself."""
    if not isinstance(raw, dict):
        return peer
    try:
        return Caller(pid=int(raw["pid"]), uid=int(raw["uid"]), gid=int(raw["gid"]), name=str(raw["name"]))
    except (KeyError, TypeError, ValueError):
        return peer


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
