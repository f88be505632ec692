"""Webhooks without sockets: the SSRF address classifier, URL checks, the signature, the retry schedule,
and the dispatcher's batches, retries and drops against a real store with a fake clock."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cmcd.api.webhooks import RETRY_MAX_S, WebhookDispatcher, backoff_s, signature
from cmcd.config import ApiConfig, Config, Duration
from cmcd.errors import NotFound, StoreError
from cmcd.store import AsyncStore, open_store
from cmcd.store.store import Store
from cmcd.store.webhook_store import WEBHOOK_EVENTS, Webhook, parse_events
from cmcd.tenancy.webhook_urls import WebhookUrlError, check_url, refused_reason, split_url


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("10.255.255.255", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.254", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.1.2.3", "private"),
        ("64:ff9b::a00:1", "private"),
        ("2002:7f00:1::1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("100.64.0.1", "non-public"),
        ("100.127.255.254", "non-public"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "private"),
        ("255.255.255.255", "private"),
        ("192.0.2.10", "private"),
        ("8.8.8.8", None),
        ("93.184.215.14", None),
        ("172.32.0.1", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
        ("64:ff9b::808:808", None),
        ("2002:808:808::1", None),
    ],
    ids=lambda v: str(v),
)
def test_address_classifier(address: str, reason: str | None) -> None:
    assert refused_reason(address) == reason


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/", "must start with https:// or http://"),
        ("https://user:pw@example.com/", "user name or password"),
        ("https://user@example.com/", "user name or password"),
        ("https:///path", "needs a host"),
        ("https://example.com:99999/", "not a valid URL"),
        ("example.com/hook", "must start with"),
        ("https://bücher.example/hook", "ASCII form"),
    ],
    ids=["scheme", "userinfo", "user-only", "no-host", "bad-port", "no-scheme", "idna"],
)
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(WebhookUrlError, match=message):
        split_url(url)


def test_split_url_defaults_ports() -> None:
    assert split_url("https://Hooks.Example.com/x?y=1") == ("https", "hooks.example.com", 443)
    assert split_url("http://example.com:8080/") == ("http", "example.com", 8080)
    assert split_url("http://[2001:db8::1]/") == ("http", "2001:db8::1", 80)


class _NoDns:
    """A resolver that must not be asked: IP literals are judged as they are."""

    async def resolve(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("an IP literal was looked up in DNS")


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("http://127.0.0.1:8080/hook", "127.0.0.1 is a loopback address; set api.webhook_allow_private to allow"),
        ("http://[::1]/hook", "::1 is a loopback address"),
        ("https://10.0.0.5/", "10.0.0.5 is a private address"),
        ("https://[::ffff:169.254.169.254]/", "is a link-local address"),
        ("https://8.8.8.8/hook", None),
    ],
    ids=["v4-loopback", "v6-loopback", "private", "mapped-metadata", "public"],
)
async def test_check_url_literals(url: str, refused: str | None) -> None:
    if refused is None:
        target = await check_url(url, _NoDns(), allow_private=False)  # type: ignore[arg-type]
        assert target.addresses == ("8.8.8.8",) and target.port == 443
    else:
        with pytest.raises(WebhookUrlError, match=refused.replace("[", r"\[")):
            await check_url(url, _NoDns(), allow_private=False)  # type: ignore[arg-type]
        allowed = await check_url(url, _NoDns(), allow_private=True)  # type: ignore[arg-type]
        assert allowed.addresses


def test_signature_format() -> None:
    secret, body, t = b"whsec_abc", b'{"events":[]}', 1767225600
    value = signature(secret, body, t)
    expected = hmac.new(secret, b"1767225600." + body, hashlib.sha256).hexdigest()
    assert value == f"t=1767225600,v1={expected}"
    assert signature(secret, body + b" ", t) != value
    assert signature(secret, body, t + 1) != value


@pytest.mark.parametrize(
    ("attempts", "seconds"),
    [(1, 5), (2, 10), (3, 20), (4, 40), (5, 80), (10, 2560), (11, 3600), (12, 3600), (100, 3600)],
    ids=lambda v: str(v),
)
def test_backoff_schedule(attempts: int, seconds: float) -> None:
    assert backoff_s(attempts) == pytest.approx(seconds)
    assert backoff_s(attempts, 0.0) == pytest.approx(seconds * 0.9)
    assert backoff_s(attempts, 0.999999) == pytest.approx(seconds * 1.1, rel=1e-5)


def test_backoff_never_passes_cap_plus_jitter() -> None:
    assert max(backoff_s(n, u / 10) for n in range(1, 60) for u in range(10)) <= RETRY_MAX_S * 1.1


def test_parse_events() -> None:
    assert parse_events(None) == WEBHOOK_EVENTS
    assert parse_events("Bounced, delivered") == ("delivered", "bounced")
    with pytest.raises(StoreError, match="unknown webhook event 'opened'"):
        parse_events("delivered,opened")
    with pytest.raises(StoreError, match="at least one"):
        parse_events(",")


# -- the dispatcher's state machine: a real store, a fake clock, a scripted POST (no sockets) -----------


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _log_events(store: Store, tenant: str, *events: tuple[str, str], ts: float | None = None) -> None:
    """Mail-log rows of TENANT: (event, recipient) each, from sender app@<tenant>.test, at TS (now)."""
    at = time.time() if ts is None else ts
    tenant_id = store.tenant(tenant).id
    keys = store.keys
    rows = []
    for n, (event, rcpt) in enumerate(events):
        sender = f"app@{tenant}.test"
        rows.append(
            (f"{tenant}:{rcpt}:{event}:{n}:{time.time()}", at, tenant_id, f"Q{tenant.upper()}{n}", event,
             keys.encrypt(sender), keys.index(sender), keys.encrypt(rcpt), keys.index(rcpt), "dst.test",
             event, f"250 {event}", 1, "mx.dst.test", "127.0.0.1", "", 0.1, 100, "<m@x>")
        )  # fmt: skip
    store.insert_mail_events(rows)


@pytest.fixture
async def dispatch(tmp_path: Path) -> AsyncIterator[tuple[WebhookDispatcher, Store, _Clock, list[Any]]]:
    store = open_store(tmp_path / "cmcd.db", tmp_path / "data.key")
    for tenant in ("acme", "beta"):
        store.tenant_add(tenant)
    astore = AsyncStore(store)
    clock = _Clock(1_800_000_000.0)
    config = Config(api=ApiConfig(webhook_retry_for=Duration(600)))
    d = WebhookDispatcher(config, astore, None, clock=clock, rand=lambda: 0.5)  # type: ignore[arg-type]
    replies: list[Any] = []  # what the next posts answer: None (2xx) or an error string

    async def post(hook: Webhook, body: bytes, t: int) -> str | None:
        replies.append(("posted", hook.id, json.loads(body)["events"]))
        return next((r for r in replies if isinstance(r, str) or r is None), None)

    d._post = post  # type: ignore[method-assign]
    yield d, store, clock, replies
    astore.close()


async def _hook(store: Store, webhook_id: int) -> Webhook:
    return next(w for w in store.webhook_endpoints() if w.id == webhook_id)


async def test_dispatcher_batches_retries_and_drops(dispatch: Any) -> None:
    d, store, clock, replies = dispatch
    _log_events(store, "acme", ("delivered", "old@dst.test"))  # before the webhook: never posted
    hook = store.webhook_add("acme", "https://hooks.example/x", ("delivered", "bounced"), b"secret")
    _log_events(store, "acme", ("accepted", "a@dst.test"), ("delivered", "a@dst.test"), ("deferred", "b@dst.test"))
    _log_events(store, "beta", ("delivered", "beta@dst.test"))
    _log_events(store, "acme", ("bounced", "b@dst.test"))

    replies.append("HTTP 503 Service Unavailable")
    state, more = await d._attempt(await _hook(store, hook["id"]))
    assert state is None and not more
    posted = [(e["event"], e["recipient"]) for e in replies[1][2]]
    assert posted == [("delivered", "a@dst.test"), ("bounced", "b@dst.test")]
    failing = store.webhook("acme", hook["id"])
    assert failing["attempts"] == 1 and failing["failing_since"] == clock.now and failing["sent"] == 0
    assert failing["next_attempt"] == pytest.approx(clock.now + 5)
    assert failing["last_error"] == "HTTP 503 Service Unavailable" and failing["cursor"] == hook["cursor"]

    clock.now += 6  # a second failure doubles the wait
    await d._attempt(await _hook(store, hook["id"]))
    assert store.webhook("acme", hook["id"])["next_attempt"] == pytest.approx(clock.now + 10)

    clock.now += 601  # failing for longer than webhook_retry_for: the batch is dropped
    await d._attempt(await _hook(store, hook["id"]))
    dropped = store.webhook("acme", hook["id"])
    assert dropped["dropped"] == 2 and dropped["attempts"] == 0 and dropped["cursor"] > hook["cursor"]
    ops = [o for o in store.ops_log() if o["action"] == "webhook.dropped"]
    assert ops and ops[0]["tenant"] == "acme" and "2 events" in ops[0]["detail"]

    replies.clear()
    replies.append(None)
    _log_events(store, "acme", ("delivered", "c@dst.test"))
    clock.now += 60
    state, _ = await d._attempt(await _hook(store, hook["id"]))
    assert state is not None and [e["recipient"] for e in replies[1][2]] == ["c@dst.test"]
    ok = store.webhook("acme", hook["id"])
    assert ok["sent"] == 1 and ok["attempts"] == 0 and ok["failing_since"] is None and ok["last_success"] == clock.now


async def test_unwanted_rows_advance_without_a_post(dispatch: Any) -> None:
    d, store, _, replies = dispatch
    hook = store.webhook_add("beta", "https://hooks.example/y", ("bounced",), b"s")
    _log_events(store, "beta", ("delivered", "x@dst.test"), ("deferred", "y@dst.test"))
    _log_events(store, "acme", ("bounced", "acme@dst.test"))
    state, more = await d._attempt(await _hook(store, hook["id"]))
    assert replies == [] and state is not None and not more
    assert state.cursor == store.conn.execute("SELECT MAX(id) FROM mail_log").fetchone()[0]
    await d.close()  # the skipped-over cursor is written at close
    assert store.webhook("beta", hook["id"])["cursor"] == state.cursor


def test_full_batches_are_capped(tmp_path: Path) -> None:
    store = open_store(tmp_path / "cmcd.db", tmp_path / "data.key")
    store.tenant_add("acme")
    hook = store.webhook_add("acme", "https://hooks.example/z", WEBHOOK_EVENTS, b"s")
    _log_events(store, "acme", *[("delivered", f"r{i}@dst.test") for i in range(250)])
    first = store.webhook_batch(store.tenant("acme").id, hook["cursor"], WEBHOOK_EVENTS, 100)
    assert len(first.events) == 100 and first.more and first.end == first.events[-1]["id"]
    second = store.webhook_batch(store.tenant("acme").id, first.end, WEBHOOK_EVENTS, 100)
    assert second.events[0]["id"] == first.end + 1
    assert store.webhook_batch(store.tenant("acme").id, second.end, ("bounced",), 100).events == []
    with pytest.raises(NotFound):
        store.webhook_delete("acme", hook["id"] + 1)
    store.close()


async def test_a_long_outage_drops_only_events_that_waited_the_whole_retry_period(dispatch: Any) -> None:
    """The endpoint has been failing for longer than webhook_retry_for: a batch of old events is
    dropped and the next batch is tried at once; a batch of fresh events is kept and retried."""
    d, store, clock, replies = dispatch
    hook = store.webhook_add("acme", "https://hooks.example/x", ("delivered",), b"secret")
    _log_events(store, "acme", *[("delivered", f"old{n}@dst.test") for n in range(100)], ts=clock.now - 700)
    _log_events(store, "acme", ("delivered", "fresh@dst.test"), ts=clock.now - 10)
    replies.append("HTTP 502 Bad Gateway")
    state, more = await d._attempt(await _hook(store, hook["id"]))  # first failure: failing since now
    assert state is None
    clock.now += 601
    state, more = await d._attempt(await _hook(store, hook["id"]))  # the old batch waited long enough
    assert state is not None and more
    assert store.webhook("acme", hook["id"])["dropped"] == 100
    state, more = await d._attempt(state)  # the fresh event (611 s old) has waited long enough too
    assert store.webhook("acme", hook["id"])["dropped"] == 101
    _log_events(store, "acme", ("delivered", "new@dst.test"), ts=clock.now)
    state, more = await d._attempt(await _hook(store, hook["id"]))  # a new event: kept for retries
    after = store.webhook("acme", hook["id"])
    assert state is None and after["dropped"] == 101 and after["attempts"] >= 1
