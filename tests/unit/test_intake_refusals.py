"""The refusals of a message coming in: each one's SMTP reply, HTTP problem and metric label, as
tables; and SubmitService's checks on a real store and spool in a temporary directory (no daemon,
no sockets, a fixed clock)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cmcd import config, crypto, policy, stats
from cmcd.api.problems import PROBLEM_TYPE, problem
from cmcd.queue.spool import Spool
from cmcd.records import Sender
from cmcd.store import AsyncStore, open_store
from cmcd.submit import refusals
from cmcd.submit.refusals import Accepted
from cmcd.submit.service import SessionInfo, SubmitService
from cmcd.tenancy.refusals import Reason, Refusal
from cmcd.tenancy.rules import address_refusal

T0 = 1_794_999_600.0


@dataclass(frozen=True)
class Rendered:
    """What one refusal is said as: the SMTP reply, the HTTP status, problem type and Retry-After."""

    reply: str
    status: int
    slug: str
    retry_after: str | None = None


def _nul() -> Refusal:
    return refusals.bad_content(policy.check_data(b"\r\na\x00b\r\n", "reject").problem)


def _bare_lf() -> Refusal:
    return refusals.bad_content(policy.check_data(b"\r\na\nb\r\n", "reject").problem)


def _rule(address: str, smtputf8: bool = False) -> Refusal:
    refusal = address_refusal(address, smtputf8=smtputf8)
    assert refusal is not None
    return refusal


#: every refusal a message coming in can meet, as SMTP and the API have always said it
RENDERED: list[tuple[str, Refusal, Rendered]] = [
    ("auth-invalid", refusals.AUTH_INVALID,
     Rendered("535 5.7.8 Authentication credentials invalid", 401, "login-failed")),
    ("auth-throttled", refusals.AUTH_THROTTLED,
     Rendered("421 4.7.0 Too many failed logins from your address; try again later", 429, "rate-limit", "1")),
    ("auth-closing", refusals.AUTH_CLOSING,
     Rendered("535 5.7.8 Authentication credentials invalid: the account is being deleted", 401, "login-failed")),
    ("null-sender", refusals.NULL_SENDER,
     Rendered("550 5.7.1 A null sender is not allowed for submission", 422, "refused")),
    ("sender-domain", refusals.SENDER_DOMAIN,
     Rendered("553 5.7.1 Sender address rejected: its domain is not one of your tenant's domains", 403,
              "sender-domain")),
    ("address-literal", refusals.ADDRESS_LITERAL,
     Rendered("550 5.1.2 Address literals are not accepted as recipients", 422, "bad-address")),
    ("suppressed", refusals.SUPPRESSED,
     Rendered("550 5.7.1 Recipient address is on your suppression list (it bounced before)", 422, "suppressed")),
    ("tenant-closing", refusals.TENANT_CLOSING,
     Rendered("550 5.7.1 Your tenant is being deleted; nothing more is accepted for it", 403, "tenant-deleted")),
    ("spool-low", refusals.SPOOL_LOW,
     Rendered("452 4.3.1 Insufficient system storage: the queue's disk is nearly full; try again later", 503,
              "try-later", "1")),
    ("daily-quota", refusals.daily_quota(500),
     Rendered("550 5.7.1 Daily quota of 500 messages reached for this tenant", 429, "daily-quota", "3600")),
    ("daily-quota-batch", refusals.daily_quota(500, would_exceed=True),
     Rendered("550 5.7.1 Daily quota of 500 messages would be exceeded for this tenant", 429, "daily-quota",
              "3600")),
    ("rate-limit", refusals.rate_limit(2.5),
     Rendered("451 4.7.1 Rate limit of 2.5 messages per second reached; try again later", 429, "rate-limit", "1")),
    ("rate-limit-whole", refusals.rate_limit(10.0),
     Rendered("451 4.7.1 Rate limit of 10 messages per second reached; try again later", 429, "rate-limit", "1")),
    ("too-many-recipients", refusals.too_many_recipients(100),
     Rendered("452 4.5.3 Too many recipients (limit 100 per message)", 503, "try-later", "1")),
    ("no-from", refusals.NO_FROM,
     Rendered("550 5.7.1 Message has no From: header; it must name one of your domains", 403, "sender-domain")),
    ("from-domain", refusals.FROM_DOMAIN,
     Rendered("550 5.7.1 From: header rejected: its domain is not one of your tenant's domains", 403,
              "sender-domain")),
    ("spool-failed", refusals.SPOOL_FAILED,
     Rendered("451 4.3.0 Could not write the message to the queue; try again later", 503, "try-later", "1")),
    ("quota-unchecked", refusals.QUOTA_UNCHECKED,
     Rendered("451 4.3.0 Could not check the daily quota; try again later", 503, "try-later", "1")),
    ("too-big", refusals.TOO_BIG,
     Rendered("552 5.3.4 Message size exceeds fixed maximum message size", 422, "refused")),
    ("data-busy", refusals.DATA_BUSY,
     Rendered("452 4.3.1 Insufficient system storage; try again later", 503, "try-later", "1")),
    ("mail-loop", refusals.mail_loop(50),
     Rendered("554 5.4.6 Too many hops: the message already has 50 Received: fields (mail loop?)", 422, "refused")),
    ("bad-stream", refusals.bad_stream("bulk\x00"),
     Rendered("550 5.6.0 X-Cmcd-Stream: must be transactional or broadcast, not 'bulk\\x00'", 422, "refused")),
    ("broadcast-too-big", refusals.broadcast_too_big(3, 1000, 2000),
     Rendered("552 5.3.4 A broadcast is one message per recipient: 3 copies of 1000 bytes pass the limit of 2000 "
              "bytes; send it to fewer recipients at a time", 422, "refused")),
    ("nul-byte", _nul(), Rendered("550 5.6.0 Message contains a NUL character", 422, "refused")),
    ("bare-lf", _bare_lf(),
     Rendered("550 5.6.0 Message contains a bare CR or LF; lines must end with CRLF", 422, "refused")),
    ("address-controls", _rule("a b@acme.test"),
     Rendered("501 5.1.3 Bad address syntax: control characters or spaces are not allowed", 422, "bad-address")),
    ("address-non-ascii", _rule("j\u00f6rg@acme.test"),
     Rendered("501 5.1.3 Non-ASCII address requires SMTPUTF8", 422, "bad-address")),
    ("needs-smtputf8-mail", refusals.NEEDS_SMTPUTF8_MAIL,
     Rendered("550 5.6.7 Non-ASCII sender address requires the SMTPUTF8 parameter on MAIL", 422, "bad-address")),
    ("needs-smtputf8-rcpt", refusals.NEEDS_SMTPUTF8_RCPT,
     Rendered("553 5.6.7 Non-ASCII recipient address requires the SMTPUTF8 parameter on MAIL", 422, "bad-address")),
    ("address-syntax", _rule("no-at-sign"),
     Rendered("501 5.1.3 Bad address syntax: expected local-part@domain", 422, "bad-address")),
]  # fmt: skip


@pytest.mark.parametrize(("refusal", "rendered"), [r[1:] for r in RENDERED], ids=[r[0] for r in RENDERED])
def test_each_refusal_is_said_once_per_protocol(refusal: Refusal, rendered: Rendered) -> None:
    assert refusal.reply == rendered.reply
    p = problem(refusal, "to")
    body = {"status": p.status, "type": PROBLEM_TYPE + p.slug, "detail": p.detail, "smtp": p.smtp, **p.extra}
    assert body == {
        "status": rendered.status,
        "type": PROBLEM_TYPE + rendered.slug,
        "detail": rendered.reply.split(" ", 2)[2],  # the words, without the codes
        "smtp": rendered.reply,
        "field": "to",
    }
    assert p.headers.get("Retry-After") == rendered.retry_after
    assert "field" not in problem(refusal).extra


def test_the_table_holds_every_refusal_submit_makes() -> None:
    constants = {name for name, v in vars(refusals).items() if isinstance(v, Refusal)}
    functions = {
        name
        for name, v in vars(refusals).items()
        if inspect.isfunction(v) and v.__module__ == refusals.__name__ and not name.startswith("counted")
    }
    tabled = {r[1] for r in RENDERED}
    assert {name for name in constants if getattr(refusals, name) not in tabled} == set()
    made_by = {
        "daily_quota", "rate_limit", "too_many_recipients", "mail_loop", "bad_content", "bad_stream",
        "broadcast_too_big",
    }  # fmt: skip
    assert functions == made_by  # a new one: give it rows above


#: the HTTP answer of each reason (a temporary SMTP code where the reason names none: 503)
BY_REASON = {
    Reason.NOT_FOUND: (404, "not-found"),
    Reason.CONFLICT: (409, "conflict"),
    Reason.INVALID: (422, "invalid"),
    Reason.FORBIDDEN: (403, "forbidden"),
    Reason.AUTH_INVALID: (401, "login-failed"),
    Reason.AUTH_THROTTLED: (429, "rate-limit"),
    Reason.NULL_SENDER: (422, "refused"),
    Reason.BAD_ADDRESS: (422, "bad-address"),
    Reason.SENDER_DOMAIN: (403, "sender-domain"),
    Reason.DAILY_QUOTA: (429, "daily-quota"),
    Reason.RATE_LIMIT: (429, "rate-limit"),
    Reason.TOO_MANY_RECIPIENTS: (422, "refused"),
    Reason.SUPPRESSED: (422, "suppressed"),
    Reason.NO_FROM: (403, "sender-domain"),
    Reason.FROM_DOMAIN: (403, "sender-domain"),
    Reason.SPOOL_FAILED: (422, "refused"),
    Reason.TOO_BIG: (422, "refused"),
    Reason.BAD_CONTENT: (422, "refused"),
    Reason.SPOOL_LOW: (422, "refused"),
    Reason.MAIL_LOOP: (422, "refused"),
    Reason.BAD_STREAM: (422, "refused"),
    Reason.TENANT_DELETED: (403, "tenant-deleted"),
    Reason.BUSY: (422, "refused"),
    Reason.OTHER: (422, "refused"),
}


@pytest.mark.parametrize("reason", list(Reason), ids=[r.value for r in Reason])
def test_each_reason_as_a_problem(reason: Reason) -> None:
    permanent = problem(Refusal(reason, 550, "5.7.1", "words"))
    assert (permanent.status, permanent.slug) == BY_REASON[reason]
    temporary = problem(Refusal(reason, 451, "4.3.0", "words"))
    named = BY_REASON[reason][1] != "refused"
    assert (temporary.status, temporary.slug) == (BY_REASON[reason] if named else (503, "try-later"))
    # a tenancy command's refusal is no message's: it has no SMTP words
    commands = {Reason.NOT_FOUND, Reason.CONFLICT, Reason.INVALID, Reason.FORBIDDEN}
    assert permanent.smtp == ("" if reason in commands else "550 5.7.1 words")
    assert Refusal(reason, 550, "5.7.1", "words").reply == "550 5.7.1 words"


def test_the_metric_labels_are_the_message_reasons() -> None:
    reasons = list(Reason)
    message = reasons[reasons.index(Reason.NULL_SENDER) :]
    assert stats.REJECT_REASONS == tuple(r.value for r in message)
    for refusal in (r[1] for r in RENDERED):
        counted = stats.IntakeStats()
        counted.refused(refusal)
        label = refusal.reason.value if refusal.reason.value in stats.REJECT_REASONS else "other"
        assert counted.rejected[label] == 1


# -- SubmitService's checks, on a store and a spool in tmp_path ---------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class Intake:
    service: SubmitService
    sender: Sender
    clock: Clock


INFO = SessionInfo("192.0.2.7", "client.test", None, None)
BODY = b"From: alice@acme.test\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\nhello\r\n"


SMTP = {"listen": [], "listen_tls": [], "max_recipients": 3, "messages_per_day": 4, "max_hops": 5, "auth_fail_limit": 2}


@contextlib.asynccontextmanager
async def running(root: Path, **smtp: object) -> AsyncIterator[Intake]:
    """SubmitService on a store with tenant acme (domain acme.test, sender alice) and a spool under ROOT."""
    store = open_store(root / "cmcd.db", root / "data.key")
    tenant = store.tenant_add("acme")
    store.domain_add("acme", "acme.test")
    user = store.user_add("acme", "alice", "sender", crypto.hash_password("the right password"))
    astore = AsyncStore(store)
    spool = Spool(root / "spool", store.keys)
    spool.start()
    cfg = config.from_dict({"server": {"hostname": "mx.test"}, "smtp": SMTP | smtp, "spool": {"min_free": 0}})
    clock = Clock()
    service = SubmitService(cfg, astore, spool, clock)
    service.signer = None  # no DKIM keys here
    await service.start()
    try:
        yield Intake(service, Sender(user.id, tenant.id, "acme", "alice", "PLAIN"), clock)
    finally:
        await service.close()
        spool.stop()
        astore.close()


@pytest.fixture
async def intake(tmp_path: Path) -> AsyncIterator[Intake]:
    async with running(tmp_path) as it:
        yield it


async def test_mail_from(intake: Intake) -> None:
    service, sender = intake.service, intake.sender
    assert service.check_mail(sender, "", False) is refusals.NULL_SENDER
    assert service.check_mail(sender, "alice@other.test", False) is refusals.SENDER_DOMAIN
    assert service.check_mail(sender, "alice@[192.0.2.1]", False) is refusals.SENDER_DOMAIN
    assert service.check_mail(sender, "j\u00f6rg@acme.test", False) is refusals.NEEDS_SMTPUTF8_MAIL
    assert service.check_mail(sender, "al ice@acme.test", False) == _rule("al ice@acme.test")
    assert service.check_mail(sender, "alice@ACME.test", False) is None
    assert service.check_mail(sender, "j\u00f6rg@acme.test", True) is None  # RFC 6531: MAIL ... SMTPUTF8
    counted = {k: v for k, v in service.stats.rejected.items() if v}
    assert counted == {"null_sender": 1, "sender_domain": 2, "bad_address": 2}


async def test_rcpt_to(intake: Intake) -> None:
    service, sender = intake.service, intake.sender
    assert service.check_rcpt(sender, "bob@example.net", 2, False) is None
    assert service.check_rcpt(sender, "bob@example.net", 3, False) == refusals.too_many_recipients(3)
    assert service.check_rcpt(sender, "bob@[192.0.2.1]", 0, False) is refusals.ADDRESS_LITERAL
    assert service.check_rcpt(sender, "bob", 0, False) == _rule("bob")
    assert service.check_rcpt(sender, "b\u00f6b@example.net", 0, False) is refusals.NEEDS_SMTPUTF8_RCPT
    assert service.check_rcpt(sender, "b\u00f6b@b\u00fccher.example", 0, True) is None
    assert service.check_rcpt(sender, "bob@b\u00fc-.example", 0, True) == _rule("bob@b\u00fc-.example", True)
    store = service.astore.store
    store.suppression_add("acme", "gone@example.net", "550 5.1.1 no such user")
    await service.directory.refresh(force=True)
    assert service.check_rcpt(sender, "gone@example.net", 0, False) is None  # the tenant's setting: accept
    store.tenant_set("acme", suppressed_rcpt="refuse")
    await service.directory.refresh(force=True)
    assert service.check_rcpt(sender, "gone@example.net", 0, False) is refusals.SUPPRESSED
    counted = {k: v for k, v in service.stats.rejected.items() if v}
    assert counted == {"too_many_recipients": 1, "bad_address": 4, "suppressed": 1}


async def test_rate_and_daily_quota(intake: Intake) -> None:
    service, sender = intake.service, intake.sender
    assert service.check_batch(sender, 5) == refusals.daily_quota(4, would_exceed=True)
    assert service.check_batch(sender, 4) is None
    for _ in range(4):
        assert isinstance(await service.finish(sender, "alice@acme.test", ["bob@example.net"], BODY, INFO), Accepted)
    assert service.check_mail(sender, "alice@acme.test", False) == refusals.daily_quota(4)
    result = await service.finish(sender, "alice@acme.test", ["bob@example.net"], BODY, INFO)
    assert result == refusals.daily_quota(4)
    assert service.stats.rejected["daily_quota"] == 2  # check_batch is counted by the API as a request


async def test_rate_limit(tmp_path: Path) -> None:
    async with running(tmp_path, tenant_limits={"acme": {"messages_per_second": 1.0}}) as intake:
        service, sender = intake.service, intake.sender
        assert service.check_mail(sender, "alice@acme.test", False) is None
        assert service.check_mail(sender, "alice@acme.test", False) == refusals.rate_limit(1.0)
        intake.clock.now += 1
        assert service.check_mail(sender, "alice@acme.test", False) is None
        intake.clock.now += 1
        assert service.check_batch(sender, 3) is None  # a token is there: all three are charged
        intake.clock.now += 1  # one token back, two still owed
        assert service.check_batch(sender, 1) == refusals.rate_limit(1.0)
        assert service.stats.rejected["rate_limit"] == 1  # check_batch is counted by the API as a request


async def test_end_of_data(intake: Intake) -> None:
    service, sender = intake.service, intake.sender
    rcpts = ["bob@example.net"]
    accepted = await service.finish(sender, "alice@acme.test", rcpts, BODY, INFO)
    assert isinstance(accepted, Accepted) and accepted.reply == f"250 2.0.0 Ok: queued as {accepted.queue_id}"
    no_from = BODY.replace(b"From: alice@acme.test\r\n", b"")
    assert await service.finish(sender, "alice@acme.test", rcpts, no_from, INFO) is refusals.NO_FROM
    other = BODY.replace(b"acme.test", b"other.test")
    assert await service.finish(sender, "alice@acme.test", rcpts, other, INFO) is refusals.FROM_DOMAIN
    looped = b"Received: from a\r\n" * 5 + BODY
    assert await service.finish(sender, "alice@acme.test", rcpts, looped, INFO) == refusals.mail_loop(5)
    counted = {k: v for k, v in service.stats.rejected.items() if v}
    assert counted == {"no_from": 1, "from_domain": 1, "mail_loop": 1}
    assert service.stats.accepted == {"acme": 1}


async def test_a_closing_tenant_is_refused_everywhere(intake: Intake) -> None:
    service, sender = intake.service, intake.sender
    service.close_tenant(sender.tenant_id, ("alice",))
    assert service.check_mail(sender, "alice@acme.test", False) is refusals.TENANT_CLOSING
    assert service.check_rcpt(sender, "bob@example.net", 0, False) is refusals.TENANT_CLOSING
    result = await service.finish(sender, "alice@acme.test", ["bob@example.net"], BODY, INFO)
    assert result is refusals.TENANT_CLOSING
    assert service.stats.rejected["tenant_deleted"] == 3


async def test_failed_logins_then_throttled(intake: Intake) -> None:
    service = intake.service
    assert await service.authenticate("alice", "wrong password", "192.0.2.7", "PLAIN") is refusals.AUTH_INVALID
    assert await service.authenticate("nobody", "wrong password", "192.0.2.7", "PLAIN") is refusals.AUTH_INVALID
    assert await service.authenticate("alice", "wrong password", "192.0.2.7", "PLAIN") is refusals.AUTH_INVALID
    assert await service.authenticate("alice", "any password", "192.0.2.7", "PLAIN") is refusals.AUTH_THROTTLED
    assert service.stats.auth == {"ok": 0, "failed": 3, "throttled": 1}
    assert not any(service.stats.rejected.values())  # logins are no refused messages
