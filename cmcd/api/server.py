"""The tenant HTTP API: JSON over HTTPS under /v1/, on the daemon's event loop (aiohttp).

Sending goes through SubmitService exactly like SMTP (sender domain, limits, suppression, DKIM,
the spool's durability contract): a 202 is sent only after the spool committed every message of
the request, together with its Idempotency-Key. Records are read from the store, always filtered
by the caller's tenant; every change to tenancy state (users, keys, blocks, webhooks) is one
tenancy command, which writes its operation-log row. Errors are RFC 9457 problem details
carrying the equivalent SMTP reply.

aiohttp's low-level web.Application is used with an explicit route table and one middleware for
errors; authentication is a plain function each handler calls, so the whole path is visible here.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import functools
import hashlib
import hmac
import io
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import dns.asyncresolver
from aiohttp import web, web_response

from cmcd import crypto, policy, totp, writeguard
from cmcd.api import hooks, users
from cmcd.api.compose import MAX_MERGE_KEYS, Composed, ComposeError, compose_bulk, compose_one
from cmcd.api.context import api_actor, api_op
from cmcd.api.frontdoor import Connection, FrontDoor
from cmcd.api.problems import Problem, iso, problem
from cmcd.config import Config, split_hostport
from cmcd.doors import JSON_BODY_WEIGHT, JSON_NODE_BYTES, json_node_cap, json_nodes
from cmcd.errors import StoreError
from cmcd.queue.requests import ApiRequest
from cmcd.records import Sender, SpoolMessage
from cmcd.store import AsyncStore, LoginRecord
from cmcd.store.api_store import KEY_PREFIX, SESSION_PREFIX, ApiCaller, split_api_key
from cmcd.submit.service import SessionInfo, SubmitService
from cmcd.tenancy import Tenancy
from cmcd.tenancy.refusals import Reason, Refusal, Refused
from cmcd.textout import CsvWriter

log = logging.getLogger("cmcd.api")

OPENAPI_PATH = Path(__file__).with_name("openapi.json")
#: what each role may do; admin may do everything
PERMISSIONS = {"sender": {"send"}, "viewer": {"read"}, "admin": {"send", "read", "manage"}}
#: mail-log events each record endpoint lists
DELIVERY_EVENTS = ("accepted", "deferred", "delivered", "bounced", "expired", "suppressed", "deleted", "lost")
BOUNCE_EVENTS = ("bounced", "expired")
PAGE_MAX = 1000
#: what bad bearer tokens count against in the login throttle: guessing tokens from an address
#: stops at smtp.auth_fail_limit like guessing one login's password (a valid key is never held)
BEARER_LOGIN = "(bearer token)"
PREPARE_CONCURRENCY = 32
LARGE_BODY = 256 * 1024  # request bodies parsed off the event loop from this size on
SESSION_BODY_MAX = 4096
#: POST /v1/sessions is unauthenticated and its body tiny: it must be in within this (or
#: api.header_timeout if shorter) of its headers, whatever its rate
SESSION_BODY_S = 5.0
#: recipient entries of one bulk request (compose_bulk's max_recipients; sizes json_node_cap)
BULK_MAX_RECIPIENTS = 1000
OTP_FAIL_LIMIT, OTP_FAIL_WINDOW_S = (
    10,
    900.0,
)  # bad one-time codes per user before a pause  # POST /v1/sessions is unauthenticated: a login is small
#: request key: the body bytes this request holds in the data budget (released after its response)
_HELD_BYTES = "cmcd.held_bytes"
_CLOSE = "cmcd.close"  # request key: close the connection after the response
#: Retry-After, seconds, when the data budget is full (SMTP clients retry a 452 within minutes)
BUSY_RETRY_AFTER = "5"
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}\Z")
_ISO_HINT = 'an ISO 8601 time like "2026-11-26T10:00:00Z"'
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
#: the secret a one-time code is checked against when the login has no enrolment (never matches a
#: real one: the answer is the same and the work too)
_NO_SECRET = secrets.token_bytes(totp.SECRET_BYTES)
_KEY_ID = re.compile(r"[a-z0-9]{12}")  # an API key id as api_store makes them
#: the Server header of every response: no product versions for a scanner to match
SERVER_HEADER = "cmcd"


def _parse_time(name: str, value: str | None) -> float | None:
    if value is None or value == "":
        return None
    try:
        t = datetime.datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise Problem(400, "bad-parameter", f"{name}: expected {_ISO_HINT}", extra={"field": name}) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.UTC)
    return t.timestamp()


def _cursor_out(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"c{last_id}".encode()).decode().rstrip("=")


def _cursor_in(value: str | None) -> int:
    if not value:
        return 0
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
        if raw.startswith("c") and raw[1:].isdigit() and int(raw[1:]) < 2**63:  # SQLite's INTEGER range
            return int(raw[1:])
    except (ValueError, UnicodeDecodeError):
        pass
    raise Problem(400, "bad-parameter", "cursor: not a cursor this API returned", extra={"field": "cursor"})


def _limit(value: str | None) -> int:
    if value is None or value == "":
        return 100
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= PAGE_MAX:  # "²".isdigit() is true
        raise Problem(400, "bad-parameter", f"limit: expected 1 to {PAGE_MAX}", extra={"field": "limit"})
    return int(value)


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
        self._in_progress: set[tuple[int, str]] = set()
        self._otp_failures = policy.SlidingWindow(OTP_FAIL_WINDOW_S)  # user id -> failed second factors
        self._openapi = OPENAPI_PATH.read_bytes()
        self.port = 0

    # -- life cycle ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors])  # bodies are read by read_body, under its limits
        app.on_response_prepare.append(_server_header)
        # aiohttp's own answers before routing (400 for a malformed request line) take its
        # default Server value, which names Python's and aiohttp's versions: make that ours too
        web_response.SERVER_SOFTWARE = SERVER_HEADER
        r = app.router
        r.add_get("/v1/openapi.json", self._get_openapi)
        r.add_post("/v1/sessions", self._post_session)
        r.add_delete("/v1/sessions", self._delete_session)
        r.add_post("/v1/emails", self._post_email)
        r.add_post("/v1/emails/bulk", self._post_bulk)
        r.add_get("/v1/deliveries", self._get_deliveries)
        r.add_get("/v1/bounces", self._get_bounces)
        r.add_get("/v1/blocks", self._get_blocks)
        r.add_post("/v1/blocks", self._post_block)
        r.add_delete("/v1/blocks/{address}", self._delete_block)
        r.add_get("/v1/audit", self._get_audit)
        r.add_get("/v1/users", functools.partial(users.list_users, self))
        r.add_post("/v1/users", functools.partial(users.add_user, self))
        r.add_delete("/v1/users/{login}", functools.partial(users.delete_user, self))
        r.add_get("/v1/apikeys", functools.partial(users.list_keys, self))
        r.add_post("/v1/apikeys", functools.partial(users.add_key, self))
        r.add_delete("/v1/apikeys/{key_id}", functools.partial(users.revoke_key, self))
        r.add_get("/v1/webhooks", functools.partial(hooks.list_hooks, self))
        r.add_post("/v1/webhooks", functools.partial(hooks.add_hook, self))
        r.add_delete("/v1/webhooks/{webhook_id}", functools.partial(hooks.delete_hook, self))
        return app

    async def start(self) -> None:
        host, port = split_hostport(self.config.api.listen)
        api = self.config.api
        # aiohttp's own idle timer only backs ours up (cmcd/api/frontdoor.py): it can never fire first
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False,
                                     keepalive_timeout=api.keepalive_timeout + api.header_timeout + 1)  # fmt: skip
        await self._runner.setup()
        server = self._runner.server
        assert server is not None
        self._front = FrontDoor(self.door, self.tls, server, lambda: self.config.api)
        self.port = await self._front.start(host, port, backlog=512)
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
            self.service.stats.api_request(resource.canonical if resource is not None else "unmatched", response.status)
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
                        self._client_ip(request), request.method, request.path, stalled_s, buffered)  # fmt: skip
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
            log.exception("event=api_request_failed method=%s path=%s", request.method, request.path)
            return Problem(500, "internal", "the request failed inside cmcd; see the daemon log").response()

    @staticmethod
    def _client_ip(request: web.Request) -> str:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        return str(peer[0]) if peer else "?"

    async def caller(self, request: web.Request, need: str | None) -> ApiCaller:
        """The authenticated caller (Authorization: Bearer API key or session token), allowed NEED
        (None: any role)."""
        ip = self._client_ip(request)
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
            if self.service.auth_throttled(ip, BEARER_LOGIN):
                raise Problem(429, "throttled", "too many failed logins from your address; try again later")
            self.service.note_auth_failure(ip, BEARER_LOGIN)
            self.service.log_login(LoginRecord(self.clock(), _token_name(token), ip, "API", "fail", None, "bad token"))
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
                        self._client_ip(request), budget.held_bytes, n)  # fmt: skip
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
                         why, self._client_ip(request), len(buf), loop.time() - start)  # fmt: skip
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

    # -- endpoints: documents and sessions -----------------------------------------------------

    async def _get_openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type="application/json")

    async def _post_session(self, request: web.Request) -> web.Response:
        """A tenant admin's login: password + TOTP code (or a recovery code) -> a session token.

        Every failed login gets one answer (_login_failed: the same status and body), whatever was
        wrong (unknown login, wrong password, missing, wrong or reused code, not an admin, no TOTP,
        disabled, paused for bad codes), after the same work: one scrypt computation (a dummy hash
        for an unknown login), the same store reads and one code check (a dummy secret without an
        enrolment). What was wrong goes to the login log only.
        """
        ip = self._client_ip(request)
        if self.service.auth_throttled(ip):
            raise Problem(429, "throttled", "too many failed logins from your address; try again later")
        body, _ = await self.read_json(request, SESSION_BODY_MAX, min(SESSION_BODY_S, self.config.api.header_timeout))
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("login"), str)
            or not isinstance(body.get("password"), str)
        ):
            raise Problem(422, "invalid", 'expected {"login": ..., "password": ..., "otp": "123456"} '
                          '(or "recovery_code" instead of "otp")')  # fmt: skip
        unknown = set(body) - {"login", "password", "otp", "recovery_code"}
        if unknown:
            raise Problem(422, "invalid", f"unknown field {sorted(unknown)[0]!r}", extra={"field": sorted(unknown)[0]})
        login, password = body["login"], body["password"]
        if self.service.auth_throttled(ip, login):  # this login from this address used up its failures
            raise Problem(429, "throttled", "too many failed logins from your address; try again later")
        otp, recovery = body.get("otp"), body.get("recovery_code")
        if (
            not isinstance(otp, str | None)
            or not isinstance(recovery, str | None)
            or (otp is None) == (recovery is None)
        ):
            raise Problem(422, "invalid", 'give exactly one of "otp" (the 6-digit code) or "recovery_code"')
        user, password_ok = await self.service.check_password(login, password, ip)
        state = await self.astore.call(self.store.otp_state, user.id if user is not None else 0)
        enrolled = state is not None and state[1]
        secret, recovery_digests, last_step = _NO_SECRET, list[str](), 0
        if state is not None and enrolled:
            secret, _, recovery_digests, last_step = state
        now = self.clock()
        step = totp.verify(secret, otp, now, last_step) if otp is not None else None
        recovery_digest = totp.hash_recovery(recovery) if recovery is not None else ""
        recovery_ok = sum(hmac.compare_digest(h, recovery_digest) for h in recovery_digests) > 0
        paused = user is not None and self._otp_failures.count(user.id, now) >= OTP_FAIL_LIMIT
        if user is None or not password_ok:
            detail = "unknown login" if user is None else "bad password"
        elif not user.enabled:
            detail = "disabled"
        elif user.role != "admin" or not enrolled:
            detail = "not a tenant admin with TOTP enrolled"
        elif paused:  # per user, whatever the address: the password is known to whoever gets here
            detail = "paused: too many bad one-time codes"
        elif otp is not None:
            ok = step is not None and await self.astore.call(self.store.otp_use_step, user.id, step)
            detail = "" if ok else "bad or reused one-time code"
        else:
            ok = recovery_ok and await self.astore.call(self.store.otp_use_recovery, user.id, recovery_digest)
            detail = "recovery code used" if ok else "bad recovery code"
        if user is None or detail not in ("", "recovery code used"):
            self.service.note_auth_failure(ip, login)
            self.service.stats.authenticated(False, throttled=False)
            if user is not None and password_ok and not paused:
                self._otp_failures.add(user.id, now)
            result = "throttled" if detail.startswith("paused") else "fail"
            tenant_id = user.tenant_id if user is not None else None
            self.service.log_login(LoginRecord(now, login, ip, "API-SESSION", result, tenant_id, detail))
            raise _login_failed()
        self.service.stats.authenticated(True, throttled=False)
        token = SESSION_PREFIX + secrets.token_urlsafe(32)
        expires = self.clock() + self.config.api.session_ttl
        await self.astore.call(self.store.session_add, token, user.id, user.tenant_id, expires)
        self.service.log_login(LoginRecord(self.clock(), login, ip, "API-SESSION", "ok", user.tenant_id, detail))
        return web.json_response({"token": token, "expires": iso(expires)}, status=201)

    async def _delete_session(self, request: web.Request) -> web.Response:
        """Sign-out: the session token presented ends now (the console's sign-out)."""
        caller = await self.caller(request, None)
        if not caller.credential.startswith("session:"):
            raise Problem(400, "not-a-session", "sign out with a session token; an API key is revoked with "
                          "DELETE /v1/apikeys/{key_id}")  # fmt: skip
        token = request.headers["Authorization"].partition(" ")[2].strip()
        await self.astore.call(self.store.session_end, token)
        await self.log_op(caller, "api.sessions.delete", caller.credential, None)
        return web.Response(status=204)

    # -- endpoints: sending --------------------------------------------------------------------

    async def _post_email(self, request: web.Request) -> web.Response:
        return await self._send(request, bulk=False)

    async def _post_bulk(self, request: web.Request) -> web.Response:
        return await self._send(request, bulk=True)

    async def _send(self, request: web.Request, *, bulk: bool) -> web.Response:
        caller = await self.caller(request, "send")
        action = "api.emails.bulk" if bulk else "api.emails.send"
        key = request.headers.get("Idempotency-Key")
        body, raw = await self.read_json(request)
        digest = hashlib.sha256(f"{request.method} {request.path}\n".encode())
        digest.update(raw)  # not prefix + raw: that would copy the body once more
        request_hash = digest.digest()
        del raw  # parsed and hashed: its memory is not needed while the messages are built
        slot: tuple[int, str] | None = None
        if key is not None:
            if not _IDEMPOTENCY_KEY.match(key):
                raise Problem(400, "bad-idempotency-key", "Idempotency-Key: 1 to 255 visible ASCII characters")
            slot = (caller.tenant_id, key)
            if slot in self._in_progress:  # taken before the lookup: no second request slips in between
                raise Problem(409, "in-progress", "a request with this Idempotency-Key is still being processed")
            self._in_progress.add(slot)
        try:
            if key is not None:
                since = self.clock() - self.config.api.idempotency_ttl
                found = await self.service.spool.find_request(caller.tenant_id, key, since)
                if found is not None:
                    if found.request_hash != request_hash:
                        raise Problem(422, "idempotency-key-reused",
                                      "this Idempotency-Key was used for a different request")  # fmt: skip
                    return web.Response(text=found.response, status=found.status, content_type="application/json",
                                        headers={"Idempotent-Replayed": "true"})  # fmt: skip
            try:
                status, response, count = await self._queue(caller, body, bulk, key, request_hash, request)
            except Problem as p:
                await self.log_op(caller, action, "-", f"{p.status} {p.detail}")
                raise
            await self.log_op(caller, action, f"{count} message(s)", None, response[:200])
            return web.Response(text=response, status=status, content_type="application/json")
        finally:
            if slot is not None:
                self._in_progress.discard(slot)

    async def _queue(
        self, caller: ApiCaller, body: Any, bulk: bool, key: str | None, request_hash: bytes, request: web.Request
    ) -> tuple[int, str, int]:
        max_size = self.config.smtp.max_message_size
        build = (
            functools.partial(
                compose_bulk,
                body,
                max_size=max_size,
                max_total=self.config.api.max_bulk_bytes,
                max_recipients=BULK_MAX_RECIPIENTS,
            )
            if bulk
            else lambda: [compose_one(body, max_size=max_size)]
        )
        try:  # a bulk send builds up to api.max_bulk_bytes of messages: on a worker thread
            composed = await asyncio.get_running_loop().run_in_executor(None, build)
        except ComposeError as exc:
            raise Problem(422, "invalid", exc.detail, extra={"field": exc.field}) from None
        service = self.service
        if service.reloading:
            await service.current()
        sender = Sender(caller.user_id, caller.tenant_id, caller.tenant, caller.login, "API")
        first = composed[0]
        refusal = service.check_sender(sender, first.mail_from, False, sum(len(c.body) for c in composed))
        if refusal is not None:
            raise problem(refusal, "from")
        for n, c in enumerate(composed):
            for i, rcpt in enumerate(c.rcpts):
                refusal = service.check_rcpt(sender, rcpt, i, False)
                if refusal is not None:
                    raise problem(refusal, f"recipients[{n}].to" if bulk else "to")
        refusal = service.check_batch(sender, len(composed))
        if refusal is not None:
            raise problem(refusal)
        tls = request.transport.get_extra_info("ssl_object") if request.transport else None
        info = SessionInfo(self._client_ip(request), "api", tls.version() if tls else None,
                           tls.cipher()[0] if tls else None, "HTTPS")  # fmt: skip
        prepared = await self._prepare_all(sender, composed, info)
        queued = [{"index": n, "id": m.queue_id, "message_id": m.message_id} for n, m in enumerate(prepared)]
        if bulk:
            response = json.dumps({"count": len(prepared), "messages": queued})
        else:
            response = json.dumps({"id": queued[0]["id"], "message_id": queued[0]["message_id"],
                                   "recipients": len(first.rcpts)})  # fmt: skip
        record = ApiRequest(caller.tenant_id, key, request_hash, 202, response) if key is not None else None
        refusal = await service.commit_all(sender, prepared, record)
        if refusal is not None:
            raise problem(refusal)
        return 202, response, len(prepared)

    async def _prepare_all(self, sender: Sender, composed: list[Composed], info: SessionInfo) -> list[SpoolMessage]:
        """Each message through SubmitService.prepare (header checks, Received:, DKIM off the loop),
        a bounded number at once; the first refusal refuses the whole request."""
        slots = asyncio.Semaphore(PREPARE_CONCURRENCY)

        async def one(c: Composed) -> SpoolMessage:
            async with slots:
                result = await self.service.prepare(sender, c.mail_from, c.rcpts, c.body, info, c.tags)
            if isinstance(result, Refusal):
                raise problem(result, "from")
            return result

        return list(await asyncio.gather(*(one(c) for c in composed)))

    # -- endpoints: records --------------------------------------------------------------------

    async def _get_deliveries(self, request: web.Request) -> web.StreamResponse:
        return await self._mail_records(request, DELIVERY_EVENTS)

    async def _get_bounces(self, request: web.Request) -> web.StreamResponse:
        return await self._mail_records(request, BOUNCE_EVENTS)

    async def _mail_records(self, request: web.Request, events: tuple[str, ...]) -> web.StreamResponse:
        caller = await self.caller(request, "read")
        q = request.query
        _known(q, {"since", "until", "recipient", "status", "tag", "queue_id", "cursor", "limit", "format"})
        status = q.get("status")
        if status is not None and status not in events:
            raise Problem(
                400, "bad-parameter", f"status: expected one of {', '.join(events)}", extra={"field": "status"}
            )
        rows = await self.astore.call(
            self.store.log_page,
            "mail",
            tenant_id=caller.tenant_id,
            since=_parse_time("since", q.get("since")),
            until=_parse_time("until", q.get("until")),
            rcpt=q.get("recipient") or None,
            queue_id=q.get("queue_id") or None,
            events=(status,) if status else events,
            tag=q.get("tag") or None,
            after=_cursor_in(q.get("cursor")),
            limit=_limit(q.get("limit")),
        )
        tags = await self.astore.call(self.store.message_tags, sorted({r["queue_id"] for r in rows}))
        out = [
            {
                "time": iso(r["ts"]), "queue_id": r["queue_id"], "event": r["event"], "status": r["status"],
                "sender": r["sender"], "recipient": r["rcpt"], "domain": r["rcpt_domain"], "response": r["response"] or "",
                "attempt": r["attempt"], "mx": r["mx"], "ip": r["ip"], "tls": r["tls"], "delay": round(r["delay"], 3),
                "size": r["size"], "message_id": r["message_id"], "tags": tags.get(r["queue_id"], []),
            }
            for r in rows
        ]  # fmt: skip
        return _page(request, out, rows[-1]["id"] if len(rows) == _limit(q.get("limit")) else None)

    async def _get_blocks(self, request: web.Request) -> web.StreamResponse:
        caller = await self.caller(request, "read")
        q = request.query
        _known(q, {"recipient", "cursor", "limit", "format"})
        limit = _limit(q.get("limit"))
        rows = await self.astore.call(
            self.store.suppression_page,
            caller.tenant_id,
            _cursor_in(q.get("cursor")),
            limit,
            q.get("recipient") or None,
        )
        out = [{"address": r["address"], "domain": r["domain"], "reason": r["reason"], "created": iso(r["created"])}
               for r in rows]  # fmt: skip
        return _page(request, out, rows[-1]["id"] if len(rows) == limit else None)

    async def _post_block(self, request: web.Request) -> web.Response:
        caller = await self.caller(request, "manage")
        body, _ = await self.read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("address"), str) or set(body) - {"address", "reason"}:
            raise Problem(422, "invalid", 'expected {"address": "user@example.com", "reason": "optional text"}')
        address = body["address"].strip()
        reason = str(body.get("reason") or "added through the API")[:200]
        op = api_op(caller, "api.blocks.add", "1 address")  # the row says "added" or "already listed"
        try:
            added = await self.tenancy.accounts.suppression_add(op, caller.tenant, address, reason)
        except Refused as exc:  # the address rule
            raise problem(exc.refusal) from None
        return web.json_response({"address": address, "added": added}, status=201 if added else 200)

    async def _delete_block(self, request: web.Request) -> web.Response:
        caller = await self.caller(request, "manage")
        address = request.match_info["address"]
        try:
            await self.tenancy.accounts.suppression_delete(
                api_op(caller, "api.blocks.delete", "1 address"), caller.tenant, address
            )
        except Refused as exc:
            if exc.refusal.reason is Reason.NOT_FOUND:
                raise Problem(404, "not-found", "that address is not on your block list") from None
            raise problem(exc.refusal) from None
        return web.Response(status=204)

    async def _get_audit(self, request: web.Request) -> web.StreamResponse:
        caller = await self.caller(request, "read")
        q = request.query
        _known(q, {"log", "since", "until", "status", "cursor", "limit", "format"})
        kind = q.get("log", "ops")
        if kind not in ("ops", "login"):
            raise Problem(400, "bad-parameter", "log: expected ops or login", extra={"field": "log"})
        limit = _limit(q.get("limit"))
        rows = await self.astore.call(
            self.store.log_page,
            kind,
            tenant_id=caller.tenant_id,
            since=_parse_time("since", q.get("since")),
            until=_parse_time("until", q.get("until")),
            status=q.get("status") or None,
            after=_cursor_in(q.get("cursor")),
            limit=limit,
        )
        skip = {"id", "ts", "tenant", "actor_uid"}
        out = [{"time": iso(r["ts"]), **{k: v for k, v in r.items() if k not in skip}} for r in rows]
        return _page(request, out, rows[-1]["id"] if len(rows) == limit else None)


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


def _known(query: Any, allowed: set[str]) -> None:
    for name in query:
        if name not in allowed:
            raise Problem(400, "bad-parameter", f"unknown parameter {name!r}; known: {', '.join(sorted(allowed))}",
                          extra={"field": name})  # fmt: skip


def _login_failed() -> Problem:
    """The one answer to every failed login on POST /v1/sessions."""
    return Problem(401, "login-failed", "login failed: a tenant admin's login, password and a valid one-time code "
                   "(or recovery code) are needed")  # fmt: skip


async def _server_header(_request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER_HEADER


def _token_name(token: str) -> str:
    """What the login log may say about a token that did not authenticate: the key id of an API
    key ("cmk_<id>", public: it is listed and used to revoke the key), never a byte of a
    secret; "" for a session token or anything else."""
    key_id = split_api_key(token)
    return f"{KEY_PREFIX}{key_id}" if key_id is not None and _KEY_ID.fullmatch(key_id) else ""


def _page(request: web.Request, rows: list[dict[str, Any]], last_id: int | None) -> web.StreamResponse:
    """One page as JSON ({"data": [...], "next_cursor": ...}) or CSV (?format=csv; the next cursor
    in the Link header)."""
    fmt = request.query.get("format", "json")
    cursor = _cursor_out(last_id) if last_id is not None else None
    if fmt == "json":
        return web.json_response({"data": rows, "next_cursor": cursor})
    if fmt != "csv":
        raise Problem(400, "bad-parameter", "format: expected json or csv", extra={"field": "format"})
    buf = io.StringIO()
    if rows:  # through the one CSV writer: remote replies and addresses are outsiders' text
        w = CsvWriter(buf)
        w.writerow(rows[0])
        for r in rows:
            w.writerow(r.values())
    headers = {}
    if cursor:
        query = dict(request.query)
        query["cursor"] = cursor
        headers["Link"] = f'<{request.url.with_query(query).path_qs}>; rel="next"'
    return web.Response(text=buf.getvalue(), content_type="text/csv", charset="utf-8", headers=headers)


__all__ = ["ApiServer", "Problem", "StoreError"]
