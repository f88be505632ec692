"""Posts tenants' mail events (delivered, deferred, bounced, expired, suppressed, unsubscribed) to
their webhook endpoints, signed; never blocks delivery, never writes the mail log, never follows a redirect.

The dispatcher runs on the daemon's event loop. Every second (at once after a full batch) each
endpoint that is due gets up to BATCH_SIZE mail-log rows of its tenant after its cursor, posted as
`{"events": [...]}` with `X-Cmcd-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
"<t>." + body)>`. A 2xx moves the cursor past the batch; anything else (status, timeout, network
error, an address the SSRF guard refuses) is a failed attempt, retried with backoff (RETRY_BASE_S
doubling to RETRY_MAX_S, +-10 % jitter) until the endpoint has failed for api.webhook_retry_for,
when the batch is dropped (counted, logged, and put on the operation log). State is written to
the store after every attempt, so a restart resumes where it was: delivery is at-least-once.

Before every request the URL goes through the SSRF guard again (cmcd.tenancy.webhook_urls.check_url,
the one that also ran when the endpoint was added; through the daemon's resolver on dns.nameservers,
never the system's), and the request then connects only to the addresses checked (PinnedResolver),
so a DNS answer that changes in between cannot send it elsewhere. Settings: api.webhook_allow_private,
api.webhook_timeout, api.webhook_retry_for.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import socket
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import dns.asyncresolver
from aiohttp.abc import AbstractResolver, ResolveResult

from cmcd.config import Config
from cmcd.queue.audit import AuditLog
from cmcd.redact import redact_url, redact_urls
from cmcd.store import AsyncStore
from cmcd.store.log_store import OpRecord
from cmcd.store.webhook_store import Webhook
from cmcd.tenancy.webhook_urls import Target, WebhookUrlError, check_url

log = logging.getLogger("cmcd.webhooks")

BATCH_SIZE = 100
TICK_S = 1.0
RETRY_BASE_S = 5.0
RETRY_MAX_S = 3600.0
JITTER = 0.10
#: how often a cursor moved only past rows the endpoint does not want is written to the store
IDLE_PERSIST_S = 30.0
USER_AGENT = "cmcd-webhook/1"


# -- pure parts: the signature, the retry schedule ---------------------------------------------------


def signature(secret: bytes, body: bytes, t: int) -> str:
    """The X-Cmcd-Signature value: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>."""
    mac = hmac.new(secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def backoff_s(attempts: int, u: float = 0.5) -> float:
    """Seconds before the next try after ATTEMPTS failed ones: 5 s doubling, capped at an hour,
    scaled by 0.9 + 0.2*U (U uniform in [0, 1): +-10 % jitter, none at U = 0.5)."""
    base = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** max(0, min(attempts - 1, 30)))
    return base * (1 - JITTER + 2 * JITTER * u)


class PinnedResolver(AbstractResolver):
    """aiohttp's resolver for one request: the checked addresses of the checked host, nothing else."""

    def __init__(self, target: Target):
        self.target = target

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host.rstrip(".").lower() != self.target.host.lower():
            raise OSError(f"webhook request for {host}, not the checked host {self.target.host}")
        out: list[ResolveResult] = []
        for address in self.target.addresses:
            ip = ipaddress.ip_address(address)
            fam = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            if family in (socket.AF_UNSPEC, fam):
                out.append(
                    ResolveResult(
                        hostname=host, host=address, port=port, family=fam, proto=0, flags=socket.AI_NUMERICHOST
                    )
                )
        if not out:
            raise OSError(f"{host} has no checked address of the family asked for")
        return out

    async def close(self) -> None:
        return None


def _short(error: str, limit: int = 300) -> str:
    return error if len(error) <= limit else error[: limit - 3] + "..."


# -- the dispatcher -----------------------------------------------------------------------------------


class WebhookDispatcher:
    """Runs each due endpoint's deliveries as its own task; see the module docstring."""

    def __init__(
        self,
        config: Config,
        astore: AsyncStore,
        resolver: dns.asyncresolver.Resolver,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        audit: AuditLog | None = None,
    ):
        self.config = config
        self.astore = astore
        self.audit = audit
        self.store = astore.store
        self.resolver = resolver
        self.clock = clock
        self.rand = rand
        self._task: asyncio.Task[None] | None = None
        self._running: dict[int, asyncio.Task[None]] = {}
        #: endpoint id -> (cursor moved past unwanted rows only, when it was last written)
        self._skipped: dict[int, tuple[int, float]] = {}
        self._wake = asyncio.Event()
        self.posts = 0
        #: read by /metrics: events posted, events dropped, failed requests
        self.counts = {"sent": 0, "dropped": 0, "failed": 0}

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="webhooks")

    def wake(self) -> None:
        self._wake.set()

    async def close(self) -> None:
        """Stop; an attempt in flight is abandoned unrecorded (it is retried after a restart)."""
        tasks = [t for t in (self._task, *self._running.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
        for webhook_id, (cursor, _) in list(self._skipped.items()):
            await self._save_skip(webhook_id, cursor)

    async def _run(self) -> None:
        while True:
            try:
                await self._tick()
            except Exception:  # a bug here must not end webhooks for good (nor take anything else down)
                log.exception("event=webhook_tick_failed")
            try:
                await asyncio.wait_for(self._wake.wait(), TICK_S)
            except TimeoutError:
                pass
            self._wake.clear()

    async def _tick(self) -> None:
        endpoints = await self.astore.call(self.store.webhook_endpoints)
        live = {w.id for w in endpoints}
        for webhook_id in [i for i in self._skipped if i not in live]:
            del self._skipped[webhook_id]
        now = self.clock()
        for hook in endpoints:
            if hook.id in self._running or hook.next_attempt > now:
                continue
            task = asyncio.get_running_loop().create_task(self._serve(hook), name=f"webhook-{hook.id}")
            self._running[hook.id] = task
            task.add_done_callback(functools.partial(self._finished, hook.id))

    def _finished(self, webhook_id: int, _task: asyncio.Task[None]) -> None:
        self._running.pop(webhook_id, None)

    async def _serve(self, hook: Webhook) -> None:
        """Post batches to HOOK while full ones are waiting and they succeed; one request at a time."""
        try:
            while True:
                skipped = self._skipped.get(hook.id)
                if skipped is not None and skipped[0] > hook.cursor:
                    hook = dataclasses.replace(hook, cursor=skipped[0])
                next_hook, more = await self._attempt(hook)
                if next_hook is None or not more:
                    return
                hook = next_hook
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("event=webhook_failed webhook=%d", hook.id)

    async def _attempt(self, hook: Webhook) -> tuple[Webhook | None, bool]:
        """One batch: (the endpoint's state after it or None when it failed, more rows waiting)."""
        batch = await self.astore.call(self.store.webhook_batch, hook.tenant_id, hook.cursor, hook.events, BATCH_SIZE)
        if batch.end <= hook.cursor:
            return hook, False
        if not batch.events:  # only rows it does not want: move on, write it now and then
            await self._skip(hook.id, batch.end)
            return dataclasses.replace(hook, cursor=batch.end), batch.more
        body = json.dumps({"events": batch.events}, separators=(",", ":")).encode()
        now = self.clock()
        error = await self._post(hook, body, int(now))
        if error is not None:  # an HTTP client's error may quote the URL: its token stays out of logs
            error = redact_urls(error)
        self.posts += 1
        n = len(batch.events)
        done = self.clock()
        if error is None:
            await self.astore.call(
                self.store.webhook_record, hook.id, cursor=batch.end, attempts=0, failing_since=None,
                next_attempt=0.0, success_at=done, sent=n,
            )  # fmt: skip
            self._skipped.pop(hook.id, None)
            self.counts["sent"] += n
            log.info("event=webhook_sent webhook=%d tenant=%s events=%d cursor=%d", hook.id, hook.tenant, n, batch.end)
            hook = dataclasses.replace(hook, cursor=batch.end, attempts=0, failing_since=None, sent=hook.sent + n)
            return hook, batch.more
        self.counts["failed"] += 1
        attempts = hook.attempts + 1
        failing_since = hook.failing_since if hook.failing_since is not None else now
        retry_for = float(self.config.api.webhook_retry_for)
        if done - max(failing_since, batch.oldest) > retry_for:
            # every event of the batch has waited retry_for: give it up, and try the next batch
            # at once (its events may be as old; a long outage must not drop one batch an hour)
            await self._drop(hook, batch.events, batch.end, failing_since, error)
            return dataclasses.replace(hook, cursor=batch.end, attempts=0, failing_since=failing_since), True
        next_attempt = done + backoff_s(attempts, self.rand())
        await self.astore.call(
            self.store.webhook_record, hook.id, cursor=hook.cursor, attempts=attempts, failing_since=failing_since,
            next_attempt=next_attempt, last_error=error,
        )  # fmt: skip
        log.warning(
            "event=webhook_failed webhook=%d tenant=%s events=%d attempts=%d retry_in_s=%.1f error=%r",
            hook.id, hook.tenant, n, attempts, next_attempt - done, error,
        )  # fmt: skip
        return None, False

    async def _drop(self, hook: Webhook, events: list[dict[str, Any]], end: int, since: float, error: str) -> None:
        """The endpoint has failed, and this batch's events have waited, for longer than
        api.webhook_retry_for: the batch is given up. Failing since stays (the endpoint still is):
        a later batch is dropped after one more try once its own events are that old."""
        n = len(events)
        self.counts["dropped"] += n
        await self.astore.call(
            self.store.webhook_record, hook.id, cursor=end, attempts=0, failing_since=since,
            next_attempt=self.clock() + backoff_s(1, self.rand()), last_error=error, dropped=n,
        )  # fmt: skip
        self._skipped.pop(hook.id, None)
        detail = f"{n} events (mail-log ids {events[0]['id']}..{events[-1]['id']}) dropped; last error: {error}"
        log.warning("event=webhook_dropped webhook=%d tenant=%s events=%d error=%r", hook.id, hook.tenant, n, error)
        op = OpRecord(
            time.time(), None, "cmcd", "webhook.dropped", f"webhook {hook.id} {redact_url(hook.url)}", "dropped", hook.tenant_id,
            detail,
        )  # fmt: skip
        if self.audit is not None:  # to the spool's outbox if the store cannot take it
            await self.audit.ops([op])
        else:
            await self.astore.call(self.store.log_ops, [op])

    async def _skip(self, webhook_id: int, cursor: int) -> None:
        now = self.clock()
        previous = self._skipped.get(webhook_id)
        if previous is not None and now - previous[1] < IDLE_PERSIST_S:
            self._skipped[webhook_id] = (cursor, previous[1])
            return
        await self._save_skip(webhook_id, cursor)
        self._skipped[webhook_id] = (cursor, now)

    async def _save_skip(self, webhook_id: int, cursor: int) -> None:
        await self.astore.call(self.store.webhook_advance, webhook_id, cursor)

    async def _post(self, hook: Webhook, body: bytes, t: int) -> str | None:
        """POST BODY to HOOK's URL; None on a 2xx, else what went wrong."""
        api = self.config.api
        timeout = float(api.webhook_timeout)
        try:
            target = await asyncio.wait_for(check_url(hook.url, self.resolver, api.webhook_allow_private), timeout)
        except WebhookUrlError as exc:
            return _short(f"refused: {exc}")
        except TimeoutError:
            return f"DNS lookup of the webhook host took longer than {timeout:g}s"
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Cmcd-Webhook-Id": str(hook.id),
            "X-Cmcd-Signature": signature(hook.secret, body, t),
        }
        connector = aiohttp.TCPConnector(resolver=PinnedResolver(target), use_dns_cache=False, force_close=True)
        try:
            async with aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=timeout), trust_env=False
            ) as session:
                async with session.post(hook.url, data=body, headers=headers, allow_redirects=False) as resp:
                    if 200 <= resp.status < 300:
                        return None
                    return f"HTTP {resp.status} {resp.reason or ''}".rstrip()
        except TimeoutError:
            return f"no response within {timeout:g}s (api.webhook_timeout)"
        except (aiohttp.ClientError, OSError) as exc:
            return _short(f"{type(exc).__name__}: {exc}")
