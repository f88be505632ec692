"""Sending through the API: POST /v1/emails (one message) and /v1/emails/bulk (a mail merge).

The JSON is built into messages by compose.py off the event loop, then each goes through
SubmitService exactly like SMTP (sender domain, limits, suppression, DKIM, the spool's
durability contract): the 202 is sent only after the spool committed every message of the
request, together with its Idempotency-Key; a repeated key gets the stored answer. A refusal
refuses the whole request and nothing is queued. Never imports cmcd.api.server: the server
passes itself as an ApiContext.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import re
from typing import Any

from aiohttp import web

from cmcd.api.compose import Composed, ComposeError, compose_bulk, compose_one
from cmcd.api.context import ApiContext, client_ip
from cmcd.api.problems import Problem, problem
from cmcd.queue.requests import ApiRequest
from cmcd.records import Sender, SpoolMessage
from cmcd.store.api_store import ApiCaller
from cmcd.submit.service import SessionInfo
from cmcd.tenancy.refusals import Refusal

PREPARE_CONCURRENCY = 32
#: recipient entries of one bulk request (compose_bulk's max_recipients; sizes json_node_cap)
BULK_MAX_RECIPIENTS = 1000
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}\Z")


class Sending:
    """The two send endpoints of one server, and the Idempotency-Keys of its requests in progress."""

    def __init__(self, api: ApiContext) -> None:
        self.api = api
        self._in_progress: set[tuple[int, str]] = set()

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
                since = api.clock() - api.config.api.idempotency_ttl
                found = await api.service.spool.find_request(caller.tenant_id, key, since)
                if found is not None:
                    if found.request_hash != request_hash:
                        raise Problem(422, "idempotency-key-reused",
                                      "this Idempotency-Key was used for a different request")  # fmt: skip
                    return web.Response(text=found.response, status=found.status, content_type="application/json",
                                        headers={"Idempotent-Replayed": "true"})  # fmt: skip
            try:
                status, response, count = await self._queue(caller, body, bulk, key, request_hash, request)
            except Problem as p:
                await api.log_op(caller, action, "-", f"{p.status} {p.detail}")
                raise
            await api.log_op(caller, action, f"{count} message(s)", None, response[:200])
            return web.Response(text=response, status=status, content_type="application/json")
        finally:
            if slot is not None:
                self._in_progress.discard(slot)

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
        info = SessionInfo(client_ip(request), "api", tls.version() if tls else None,
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
                result = await self.api.service.prepare(sender, c.mail_from, c.rcpts, c.body, info, c.tags)
            if isinstance(result, Refusal):
                raise problem(result, "from")
            return result

        return list(await asyncio.gather(*(one(c) for c in composed)))
