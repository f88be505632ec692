"""The tenant HTTP API: JSON over HTTPS under /v1/, on the daemon's event loop (aiohttp).

This file is the server: the route table, the front door (cmcd/api/frontdoor.py), one middleware
that turns errors into RFC 9457 problem details and writes each response under
api.write_timeout, the caller's authentication (a Bearer API key or session token, its role
checked), and reading a request body under the API's size, memory and time limits. The
endpoints live beside it and take the server as an ApiContext (cmcd/api/context.py), never
importing it: send.py (through SubmitService exactly like SMTP; a 202 only once the spool
committed the request with its Idempotency-Key), sessions.py, records.py and blocks.py (always
the caller's tenant), users.py and hooks.py (each change one tenancy command, which writes its
operation-log row), and unsubscribe.py (/u/{token}: one-click unsubscribe, no sign-in). Decides no
rule about a message or a tenant itself.

aiohttp's low-level web.Application is used with an explicit route table and one middleware for
errors; authentication is a plain function each handler calls, so the whole path is visible here.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import dns.asyncresolver
from aiohttp import web, web_response

from cmcd import crypto, policy, writeguard
from cmcd.api import blocks, hooks, records, users
from cmcd.api.console import Console
from cmcd.api.console.web import CATCH_ALL_CANONICAL
from cmcd.api.context import api_actor, client_ip
from cmcd.api.fields import MAX_MERGE_KEYS
from cmcd.api.frontdoor import Connection, FrontDoor
from cmcd.api.problems import Problem
from cmcd.api.send import BULK_MAX_RECIPIENTS, Sending
from cmcd.api.sessions import Sessions
from cmcd.api.unsubscribe import Unsubscribe
from cmcd.config import Config, split_hostport
from cmcd.doors import JSON_BODY_WEIGHT, JSON_NODE_BYTES, json_node_cap, json_nodes
from cmcd.store import AsyncStore, LoginRecord
from cmcd.store.api_store import KEY_PREFIX, ApiCaller, split_api_key
from cmcd.submit.service import SubmitService
from cmcd.tenancy import Tenancy
from cmcd.unsubscribe import PATH

log = logging.getLogger("cmcd.api")

OPENAPI_PATH = Path(__file__).with_name("openapi.json")
#: what each role may do; admin may do everything
PERMISSIONS = {"sender": {"send"}, "viewer": {"read"}, "admin": {"send", "read", "manage"}}
#: what bad bearer tokens count against in the login throttle: guessing tokens from an address
#: stops at smtp.auth_fail_limit like guessing one login's password (a valid key is never held)
BEARER_LOGIN = "(bearer token)"
LARGE_BODY = 256 * 1024  # request bodies parsed off the event loop from this size on
#: request key: the body bytes this request holds in the data budget (released after its response)
_HELD_BYTES = "cmcd.held_bytes"
_CLOSE = "cmcd.close"  # request key: close the connection after the response
#: Retry-After, seconds, when the data budget is full (SMTP clients retry a 452 within minutes)
BUSY_RETRY_AFTER = "5"
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_KEY_ID = re.compile(r"[a-z0-9]{12}")  # an API key id as api_store makes them
#: the Server header of every response: no product versions for a scanner to match
SERVER_HEADER = "cmcd"


class ApiServer:
    def __init__(
        self,
        config: Config,
        service: SubmitService,
        astore: AsyncStore,
        tenancy: Tenancy,
        resolver: dns.asyncresolver.Resolver,
        clock: Callable[[], float] = time.time,
        *,
        max_connections: int | None = None,
    ) -> None:
        self.config = config
        #: the listener's caps: [api] max_connections (cut to its share of descriptors by the
        #: daemon: MAX_CONNECTIONS) and max_connections_per_ip; refusals and timeouts counted
        self.door = service.stats.doors["api"]
        self.door.max_total = config.api.max_connections if max_connections is None else max_connections
        self.door.max_per_ip = config.api.max_connections_per_ip
        self._front: FrontDoor | None = None
        self.resolver = resolver  # the daemon's (dns.nameservers): webhook URLs are checked with it
        self.service = service
        self.astore = astore
        self.store = astore.store
        self.tenancy = tenancy  # every change of tenancy state is one of its commands
        self.clock = clock
        self.tls = crypto.server_tls_context(
            str(config.path(config.smtp.tls_cert)), str(config.path(config.smtp.tls_key))
        )
        self._runner: web.AppRunner | None = None
        self._openapi = OPENAPI_PATH.read_bytes()
        self.port = 0

    # -- life cycle ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors])  # bodies are read by read_body, under its limits
        app.on_response_prepare.append(_server_header)
        # aiohttp's own answers before routing (400 for a malformed request line) take its
        # default Server value, which names Python's and aiohttp's versions: make that ours too
        web_response.SERVER_SOFTWARE = SERVER_HEADER
        sessions = Sessions(self)  # POST and DELETE /v1/sessions, and the pause after bad one-time codes
        sending = Sending(self)  # POST /v1/emails and /v1/emails/bulk, and the Idempotency-Keys in progress
        r = app.router
        r.add_get("/v1/openapi.json", self._get_openapi)
        r.add_post("/v1/sessions", sessions.login)
        r.add_delete("/v1/sessions", sessions.logout)
        r.add_post("/v1/emails", sending.post_email)
        r.add_post("/v1/emails/bulk", sending.post_bulk)
        r.add_get("/v1/deliveries", functools.partial(records.deliveries, self))
        r.add_get("/v1/bounces", functools.partial(records.bounces, self))
        r.add_get("/v1/blocks", functools.partial(blocks.list_blocks, self))
        r.add_post("/v1/blocks", functools.partial(blocks.add_block, self))
        r.add_delete("/v1/blocks/{address}", functools.partial(blocks.delete_block, self))
        r.add_get("/v1/block-policy", functools.partial(blocks.get_policy, self))
        r.add_put("/v1/block-policy", functools.partial(blocks.put_policy, self))
        r.add_get("/v1/audit", functools.partial(records.audit, self))
        r.add_get("/v1/users", functools.partial(users.list_users, self))
        r.add_post("/v1/users", functools.partial(users.add_user, self))
        r.add_delete("/v1/users/{login}", functools.partial(users.delete_user, self))
        r.add_get("/v1/apikeys", functools.partial(users.list_keys, self))
        r.add_post("/v1/apikeys", functools.partial(users.add_key, self))
        r.add_delete("/v1/apikeys/{key_id}", functools.partial(users.revoke_key, self))
        r.add_get("/v1/webhooks", functools.partial(hooks.list_hooks, self))
        r.add_post("/v1/webhooks", functools.partial(hooks.add_hook, self))
        r.add_delete("/v1/webhooks/{webhook_id}", functools.partial(hooks.delete_hook, self))
        Unsubscribe(self).add_routes(r)  # /u/{token}, one-click unsubscribe: before the console's catch-all
        Console(self).add_routes(r)  # the tenant console's pages, at / (cmcd/api/console/)
        return app

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on api.listen, or on SOCK (a worker's, bound by the supervisor)."""
        host, port = split_hostport(self.config.api.listen)
        api = self.config.api
        # aiohttp's own idle timer only backs ours up (cmcd/api/frontdoor.py): it can never fire first
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False,
                                     keepalive_timeout=api.keepalive_timeout + api.header_timeout + 1)  # fmt: skip
        await self._runner.setup()
        server = self._runner.server
        assert server is not None
        self._front = FrontDoor(self.door, self.tls, server, lambda: self.config.api)
        self.port = await self._front.start(host, port, backlog=512, sock=sock)
        log.info(
            "event=api_listening listen=%s port=%d max_connections=%d max_connections_per_ip=%d "
            "max_request_bytes=%d",
            api.listen, self.port, self.door.max_total, self.door.max_per_ip, self.config.api_max_request_bytes(),
        )  # fmt: skip

    def reload_certificate(self) -> None:
        """SIGHUP: new connections get the certificate now on disk."""
        self.tls.load_cert_chain(str(self.config.path(self.config.smtp.tls_cert)),
                                 str(self.config.path(self.config.smtp.tls_key)))  # fmt: skip

    async def close(self) -> None:
        if self._front is not None:
            await self._front.close()
            self._front = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- plumbing ------------------------------------------------------------------------------

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        transport = request.transport
        conn = transport.get_protocol() if transport is not None else None
        if isinstance(conn, Connection):
            conn.request_started()  # the headers are in: no header timer while it is handled
        try:
            response = await self._respond(request, handler)
            if request.get(_CLOSE):
                response.force_close()
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else CATCH_ALL_CANONICAL
            self.service.stats.api_request("unmatched" if route == CATCH_ALL_CANONICAL else route, response.status)
            await self._write_response(request, response)
        finally:
            held = request.get(_HELD_BYTES, 0)
            if held:  # the body is parsed, refused or spooled: its bytes leave the budget
                self.service.data_budget.release(held)
                request[_HELD_BYTES] = 0
            if isinstance(conn, Connection):
                conn.request_done()
        return response

    async def _write_response(self, request: web.Request, response: web.StreamResponse) -> None:
        """Write RESPONSE here, not after the middleware as aiohttp would, under api.write_timeout:
        a client that stops reading (a CSV export, a large page, pipelined requests) must take
        bytes within that time (measured as progress) or it is reset, instead of holding the
        connection, its handler and the response in memory for ever. aiohttp then finds the
        response sent, or the connection gone."""
        transport = request.transport
        if transport is None:
            return

        def timed_out(stalled_s: float, buffered: int) -> None:
            log.warning("event=api_write_timeout client_ip=%s method=%s path=%s stalled_s=%.1f buffered=%d",
                        client_ip(request), request.method, _logged(request.path), stalled_s, buffered)  # fmt: skip
            self.service.stats.api_write_timeouts += 1

        try:
            with writeguard.write_deadline(transport, self.config.api.write_timeout, timed_out):
                await response.prepare(request)
                await response.write_eof()
        except ConnectionError:
            pass  # the client went away, or was cut off: aiohttp's own write finds it closed

    async def _respond(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except Problem as problem:
            return problem.response()
        except web.HTTPRequestEntityTooLarge:
            return Problem(
                413, "too-large", f"request body over {self.config.api_max_request_bytes()} bytes"
            ).response()
        except web.HTTPMethodNotAllowed as exc:
            p = Problem(
                405, "method", f"{request.method} is not allowed here; use {', '.join(sorted(exc.allowed_methods))}"
            )
            p.headers["Allow"] = ",".join(sorted(exc.allowed_methods))
            return p.response()
        except web.HTTPNotFound:
            return Problem(404, "not-found", f"no endpoint {request.path}; see /v1/openapi.json").response()
        except web.HTTPException:
            raise
        except Exception:
            log.exception("event=api_request_failed method=%s path=%s", request.method, _logged(request.path))
            return Problem(500, "internal", "the request failed inside cmcd; see the daemon log").response()

    async def caller(self, request: web.Request, need: str | None) -> ApiCaller:
        """The authenticated caller (Authorization: Bearer API key or session token), allowed NEED
        (None: any role)."""
        ip = client_ip(request)
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            p = Problem(401, "unauthenticated", "send Authorization: Bearer <API key or session token>")
            p.headers["WWW-Authenticate"] = 'Bearer realm="cmcd"'
            raise p
        token = token.strip()
        if token.startswith("cmk_"):
            caller = await self.astore.call(self.store.apikey_caller, token)
        else:
            caller = await self.astore.call(self.store.session_caller, token, self.clock())
        if caller is None:
            # the throttle holds back guessing from an address; a valid key (256 random bits) from the
            # same address (a shared NAT) is never held back by it
            if await self.service.auth.count_failure(ip, BEARER_LOGIN) is not None:
                raise Problem(429, "throttled", "too many failed logins from your address; try again later")
            self.service.auth.log_login(
                LoginRecord(self.clock(), _token_name(token), ip, "API", "fail", None, "bad token")
            )
            p = Problem(401, "unauthenticated", "the API key or session token is unknown, revoked or expired")
            p.headers["WWW-Authenticate"] = 'Bearer realm="cmcd", error="invalid_token"'
            raise p
        if need is not None and need not in PERMISSIONS.get(caller.role, set()):
            raise Problem(403, "forbidden", f"a {caller.role} credential may not {need}; it needs the "
                          f"{'sender or admin' if need == 'send' else 'viewer or admin' if need == 'read' else 'admin'} role")  # fmt: skip
        return caller

    async def read_json(
        self, request: web.Request, limit: int | None = None, within_s: float | None = None
    ) -> tuple[Any, bytearray]:
        """The JSON body (read_body: at most LIMIT bytes, else the API's request limit, within
        WITHIN_S if given); a large one is counted and parsed on a worker thread so the event loop
        keeps serving SMTP meanwhile.

        Before parsing, its nodes are counted (doors.json_nodes, no object built): over
        json_node_cap it gets 413; else the parsed size (nodes x JSON_NODE_BYTES) is held in the
        data budget with the body (503 when it does not fit), so JSON that expands (3 bytes of
        "{}," become a 72-byte dict and slot) cannot take memory the budget does not count."""
        ctype = request.content_type
        if ctype != "application/json":
            raise Problem(415, "media-type", "send the request body as application/json")
        raw = await self.read_body(request, limit, within_s)
        cap = json_node_cap(BULK_MAX_RECIPIENTS, self.config.smtp.max_recipients, MAX_MERGE_KEYS)
        loop = asyncio.get_running_loop()
        large = len(raw) > LARGE_BODY
        nodes = await loop.run_in_executor(None, json_nodes, raw, cap) if large else json_nodes(raw, cap)
        if nodes > cap:
            raise Problem(413, "too-many-values", f"the JSON body has {nodes} values, objects and arrays; "
                          f"at most {cap} are accepted")  # fmt: skip
        self._hold(request, nodes * JSON_NODE_BYTES)
        if large:
            return await loop.run_in_executor(None, _parse_json, raw), raw
        return _parse_json(raw), raw

    def _hold(self, request: web.Request, n: int) -> None:
        """Hold N more bytes in the data budget for REQUEST (given back after its response), or
        refuse it with 503 and Retry-After (the connection closes) when they do not fit."""
        budget = self.service.data_budget
        if not budget.room_for(n):
            log.warning("event=data_budget_exceeded door=api client_ip=%s in_flight=%d wanted=%d",
                        client_ip(request), budget.held_bytes, n)  # fmt: skip
            p = Problem(503, "try-later", "cmcd holds as many message bytes as it may now; try again later",
                        smtp="452 4.3.1 Insufficient system storage; try again later")  # fmt: skip
            p.headers["Retry-After"] = BUSY_RETRY_AFTER
            raise _closing(request, p)
        budget.hold(n)
        request[_HELD_BYTES] = request.get(_HELD_BYTES, 0) + n

    async def read_body(
        self, request: web.Request, limit: int | None = None, within_s: float | None = None
    ) -> bytearray:
        """The request body, read under three bounds, each checked before the bytes it concerns are read:

        - size: a Content-Length over LIMIT (else Config.api_max_request_bytes) gets 413 before any
          body byte is read; a chunked body is counted as it arrives and refused at the limit;
        - memory: the body is held in the daemon's one budget for message bytes in flight
          (smtp.max_data_in_flight, shared with SMTP DATA) until the response is written, each
          byte weighing JSON_BODY_WEIGHT (its copies while parsed and composed). A declared
          Content-Length must fit when the body starts, but only the bytes that arrived are
          held (a trickled body holds what it sent, not what it promised); a body that does not
          fit, declared or as it arrives, gets 503 with Retry-After instead;
        - time: each read must bring bytes within api.body_timeout (progress, as nginx's
          client_body_timeout), the body as a whole must keep up api.min_body_rate once
          api.min_body_rate_grace has passed (as smtp.min_data_rate), and be complete within
          WITHIN_S when given (unauthenticated requests); else the connection is reset.

        A refusal closes the connection after its response (aiohttp reads and drops what the
        client still sends for a few seconds, so that the client sees the answer)."""
        limit = limit if limit is not None else self.config.api_max_request_bytes()
        declared = request.content_length
        if declared is not None and declared > limit:
            raise _closing(request, Problem(413, "too-large", f"request body over {limit} bytes"))
        if declared and not self.service.data_budget.room_for(declared * JSON_BODY_WEIGHT):
            self._hold(request, declared * JSON_BODY_WEIGHT)  # refuses: 503 before the first byte
        buf = bytearray()
        api = self.config.api
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            # the first of: no progress for body_timeout, too slow in all, the WITHIN_S deadline
            waits: dict[str, float] = {"stalled": api.body_timeout}
            slow_after = policy.slow_after_s(len(buf), api.min_body_rate, api.min_body_rate_grace)
            if slow_after is not None:
                waits["too_slow"] = start + slow_after - loop.time()
            if within_s is not None:
                waits["deadline"] = start + within_s - loop.time()
            why = min(waits, key=waits.__getitem__)
            try:
                chunk = await asyncio.wait_for(request.content.readany(), max(0.0, waits[why]))
            except TimeoutError:
                self.door.timed_out("body")
                log.info("event=api_timeout phase=body reason=%s client_ip=%s bytes=%d elapsed_s=%.1f",
                         why, client_ip(request), len(buf), loop.time() - start)  # fmt: skip
                if request.transport is not None:
                    writeguard.reset(request.transport)
                raise Problem(408, "timeout", {"stalled": f"no body bytes within {api.body_timeout:g}s",
                              "too_slow": f"the body came slower than {api.min_body_rate} bytes/s",
                              "deadline": f"the body was not complete within {within_s}s"}[why]) from None  # fmt: skip
            if not chunk:
                break
            if len(buf) + len(chunk) > limit:
                raise _closing(request, Problem(413, "too-large", f"request body over {limit} bytes"))
            self._hold(request, len(chunk) * JSON_BODY_WEIGHT)  # as it arrives, declared or chunked
            buf += chunk
        return buf  # not bytes(buf): one copy fewer of a body that may be large

    async def log_op(self, caller: ApiCaller, action: str, target: str, error: str | None, detail: str = "") -> None:
        # to the store, or to the spool's outbox when the store cannot take it: never dropped
        await self.service.audit.op(
            ts=time.time(),
            actor_uid=None,
            actor=api_actor(caller),
            action=action,
            target=target,
            result="ok" if error is None else "refused",
            tenant_id=caller.tenant_id,
            detail=error or detail,
        )

    # -- endpoints: documents -----------------------------------------------------------------

    async def _get_openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type="application/json")


def _parse_json(raw: bytes | bytearray) -> Any:
    try:
        body = json.loads(raw)
        if _SURROGATE_ESCAPE.search(raw):  # valid pairs decode to one character; a lone one stays
            json.dumps(body, ensure_ascii=False).encode()
        return body
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # UnicodeEncodeError: a lone surrogate
        detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise Problem(400, "bad-json", f"the body is not valid JSON: {detail}") from None


def _closing(request: web.Request, problem: Problem) -> Problem:
    """PROBLEM, after which REQUEST's connection closes (the body it refused is not read)."""
    request[_CLOSE] = True
    return problem


async def _server_header(_request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER_HEADER


def _token_name(token: str) -> str:
    """What the login log may say about a token that did not authenticate: the key id of an API
    key ("cmk_<id>", public: it is listed and used to revoke the key), never a byte of a
    secret; "" for a session token or anything else."""
    key_id = split_api_key(token)
    return f"{KEY_PREFIX}{key_id}" if key_id is not None and _KEY_ID.fullmatch(key_id) else ""


__all__ = ["ApiServer"]


def _logged(path: str) -> str:
    """PATH as a log line may show it: an unsubscribe link's token is cut (whoever holds it can use it)."""
    return PATH + "<token>" if path.startswith(PATH) else path[:200]
