"""Sending through the API: POST /v1/emails (one message) and /v1/emails/bulk (a mail merge).

The JSON is built into messages by compose.py off the event loop, then each goes through
SubmitService exactly like SMTP (sender domain, limits, suppression, DKIM, the spool's
durability contract): the 202 is sent only after the spool committed every message of the
request, together with its Idempotency-Key; a repeated key gets the stored answer, from whichever
worker process it reaches (cmcd/queue/requests.py: the key is claimed in the store first). A
refusal refuses the whole request and nothing is queued. Never imports cmcd.api.server: the server
passes itself as an ApiContext.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import re
from typing import Any

from aiohttp import web

from cmcd.api.compose import Composed, ComposeError, compose_bulk, compose_one
from cmcd.api.context import ApiContext, client_ip
from cmcd.api.problems import Problem, problem
from cmcd.queue.requests import Action, ApiRequest, Idempotency
from cmcd.records import Sender, SpoolMessage
from cmcd.store.api_store import ApiCaller
from cmcd.submit.service import SessionInfo
from cmcd.tenancy.refusals import Reason, Refusal

PREPARE_CONCURRENCY = 32
#: recipient entries of one bulk request (compose_bulk's max_recipients; sizes json_node_cap)
BULK_MAX_RECIPIENTS = 1000
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}\Z")


class Sending:
    """The two send endpoints of one server, and the Idempotency-Keys of its requests."""

    def __init__(self, api: ApiContext) -> None:
        self.api = api
        self._keys: Idempotency | None = None  # made at the first keyed request (the app is built without a daemon)

    @property
    def keys(self) -> Idempotency:
        if self._keys is None:
            api = self.api
            self._keys = Idempotency(
                api.service.spool, api.astore, api.service.shard, api.config.server.workers,
                lambda: api.config.api.idempotency_ttl, api.clock,
            )  # fmt: skip
        return self._keys

    async def post_email(self, request: web.Request) -> web.Response:
        return await self._send(request, bulk=False)

    async def post_bulk(self, request: web.Request) -> web.Response:
        return await self._send(request, bulk=True)

    async def _send(self, request: web.Request, *, bulk: bool) -> web.Response:
        api = self.api
        caller = await api.caller(request, "send")
        action = "api.emails.bulk" if bulk else "api.emails.send"
        key = request.headers.get("Idempotency-Key")
        body, raw = await api.read_json(request)
        digest = hashlib.sha256(f"{request.method} {request.path}\n".encode())
        digest.update(raw)  # not prefix + raw: that would copy the body once more
        request_hash = digest.digest()
        del raw  # parsed and hashed: its memory is not needed while the messages are built
        if key is not None:
            if not _IDEMPOTENCY_KEY.match(key):
                raise Problem(400, "bad-idempotency-key", "Idempotency-Key: 1 to 255 visible ASCII characters")
            verdict = await self.keys.begin(caller.tenant_id, key, request_hash)
            if verdict.action is Action.REPLAY:
                return web.Response(text=verdict.response, status=verdict.status, content_type="application/json",
                                    headers={"Idempotent-Replayed": "true"})  # fmt: skip
            if verdict.action is not Action.GO:
                raise _refusal(verdict.action)
        try:
            status, response, count = await self._queue(caller, body, bulk, key, request_hash, request)
        except asyncio.CancelledError:  # the commit may still land: settled by the next request or start
            if key is not None:
                self.keys.forget(caller.tenant_id, key)
            raise
        except Exception as exc:  # refused, or the spool failed: nothing of the request was committed
            if key is not None:
                await self.keys.refused(caller.tenant_id, key)
            if isinstance(exc, Problem):
                await api.log_op(caller, action, "-", f"{exc.status} {exc.detail}")
            raise
        if key is not None:
            await self.keys.answered(caller.tenant_id, key, request_hash, status, response)
        await api.log_op(caller, action, f"{count} message(s)", None, response[:200])
        return web.Response(text=response, status=status, content_type="application/json")

    async def _queue(
        self, caller: ApiCaller, body: Any, bulk: bool, key: str | None, request_hash: bytes, request: web.Request
    ) -> tuple[int, str, int]:
        config = self.api.config
        max_size = config.smtp.max_message_size
        build = (
            functools.partial(
                compose_bulk,
                body,
                max_size=max_size,
                max_total=config.api.max_bulk_bytes,
                max_recipients=BULK_MAX_RECIPIENTS,
            )
            if bulk
            else lambda: [compose_one(body, max_size=max_size)]
        )
        try:  # a bulk send builds up to api.max_bulk_bytes of messages: on a worker thread
            composed = await asyncio.get_running_loop().run_in_executor(None, build)
        except ComposeError as exc:
            raise Problem(422, "invalid", exc.detail, extra={"field": exc.field}) from None
        service = self.api.service
        if service.reloading:
            await service.current()
        sender = Sender(caller.user_id, caller.tenant_id, caller.tenant, caller.login, "API")
        first = composed[0]
        # UTF-8 addresses are taken as SMTP takes them with SMTPUTF8 (fields.py checked them)
        refusal = service.check_sender(sender, first.mail_from, True, sum(len(c.body) for c in composed))
        if refusal is not None:
            raise problem(refusal, "from")
        for n, c in enumerate(composed):
            for i, rcpt in enumerate(c.rcpts):
                refusal = service.check_rcpt(sender, rcpt, i, True)
                if refusal is not None:
                    raise problem(refusal, f"recipients[{n}].to" if bulk else "to")
        refusal = service.check_batch(sender, len(composed))
        if refusal is not None:
            raise problem(refusal)
        tls = request.transport.get_extra_info("ssl_object") if request.transport else None
        info = SessionInfo(client_ip(request), "api", tls.version() if tls else None,
                           tls.cipher()[0] if tls else None, "HTTPS")  # fmt: skip
        prepared = await self._prepare_all(sender, composed, info)
        queued = [{"index": n, "id": m.queue_id, "message_id": m.message_id} for n, m in enumerate(prepared)]
        if bulk:
            response = json.dumps({"count": len(prepared), "stream": prepared[0].stream, "messages": queued})
        else:
            response = json.dumps({"id": queued[0]["id"], "message_id": queued[0]["message_id"],
                                   "recipients": len(first.rcpts), "stream": prepared[0].stream})  # fmt: skip
        record = ApiRequest(caller.tenant_id, key, request_hash, 202, response) if key is not None else None
        refusal = await service.commit_all(sender, prepared, record)
        if refusal is not None:
            raise problem(refusal)
        return 202, response, len(prepared)

    async def _prepare_all(self, sender: Sender, composed: list[Composed], info: SessionInfo) -> list[SpoolMessage]:
        """Each message through SubmitService.prepare (header checks, Received:, DKIM off the loop),
        a bounded number at once; the first refusal refuses the whole request."""
        slots = asyncio.Semaphore(PREPARE_CONCURRENCY)

        async def one(c: Composed) -> list[SpoolMessage]:
            # a header with UTF-8 addresses needs SMTPUTF8 on the way: its Received: field says so
            mine = dataclasses.replace(info, smtputf8=True) if c.smtputf8 else info
            async with slots:
                result = await self.api.service.prepare(sender, c.mail_from, c.rcpts, c.body, mine, c.tags, c.stream)
            if isinstance(result, Refusal):
                raise problem(result, "headers" if result.reason is Reason.BAD_STREAM else "from")
            return result

        return [m for ms in await asyncio.gather(*(one(c) for c in composed)) for m in ms]


#: Retry-After, seconds, when the request with the key is running (here or in another worker)
IN_PROGRESS_RETRY_AFTER = "1"


def _refusal(action: Action) -> Problem:
    """The problem a keyed request gets when it is neither run nor replayed."""
    if action is Action.REUSED:
        return Problem(422, "idempotency-key-reused", "this Idempotency-Key was used for a different request")
    if action is Action.BUSY:
        p = Problem(409, "in-progress", "a request with this Idempotency-Key is still being processed; retry later")
    else:
        p = Problem(503, "try-later", "the Idempotency-Key cannot be checked now; retry later")
    p.headers["Retry-After"] = IN_PROGRESS_RETRY_AFTER
    return p
