"""Every refusal a message coming in can meet, as typed values, and the one acceptance; never does I/O.

SubmitService (and the SMTP session, for what it refuses while reading DATA) decides with these:
fixed refusals are constants, those with a number in them are functions. Each is rendered once
per protocol: `.reply` for SMTP, `cmcd.api.problems.problem` for HTTP; the intake metrics count
them by `reason.value` (`counted`, `counted_async`). Nothing reads a refusal back from its text.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Concatenate, ParamSpec, Protocol, TypeVar

from cmcd.stats import IntakeStats
from cmcd.tenancy.refusals import Reason, Refusal


@dataclass(frozen=True)
class Accepted:
    """The end of data went well: the message is on stable storage under QUEUE_ID."""

    queue_id: str
    copies: int = 1  # a broadcast to N recipients is N messages, each with its recipient's unsubscribe link

    @property
    def reply(self) -> str:
        more = f" and {self.copies - 1} more, one message per recipient" if self.copies > 1 else ""
        return f"250 2.0.0 Ok: queued as {self.queue_id}{more}"


# -- AUTH (counted in cmcd_smtp_auth_total, not as rejected messages) --------------------------

AUTH_INVALID = Refusal(Reason.AUTH_INVALID, 535, "5.7.8", "Authentication credentials invalid")
AUTH_THROTTLED = Refusal(
    Reason.AUTH_THROTTLED, 421, "4.7.0", "Too many failed logins from your address; try again later"
)
#: a login of a tenant being purged (tenant.delete --purge)
AUTH_CLOSING = Refusal(
    Reason.AUTH_INVALID, 535, "5.7.8", "Authentication credentials invalid: the account is being deleted"
)

# -- envelope ----------------------------------------------------------------------------------

NULL_SENDER = Refusal(Reason.NULL_SENDER, 550, "5.7.1", "A null sender is not allowed for submission")
SENDER_DOMAIN = Refusal(
    Reason.SENDER_DOMAIN, 553, "5.7.1", "Sender address rejected: its domain is not one of your tenant's domains"
)
#: an address literal names a host, not a mail domain (see SubmitService.check_rcpt)
ADDRESS_LITERAL = Refusal(Reason.BAD_ADDRESS, 550, "5.1.2", "Address literals are not accepted as recipients")
SUPPRESSED = Refusal(
    Reason.SUPPRESSED, 550, "5.7.1", "Recipient address is on your suppression list (it bounced before)"
)
#: every refusal while (and after) the sender's tenant is purged: MAIL, RCPT, end of data, API sends
TENANT_CLOSING = Refusal(
    Reason.TENANT_DELETED, 550, "5.7.1", "Your tenant is being deleted; nothing more is accepted for it"
)
#: spool.min_free: the queue's file system is nearly full
SPOOL_LOW = Refusal(
    Reason.SPOOL_LOW, 452, "4.3.1", "Insufficient system storage: the queue's disk is nearly full; try again later"
)


def daily_quota(messages_per_day: int, *, would_exceed: bool = False) -> Refusal:
    """The tenant's messages_per_day is used up (or, for a batch, would be)."""
    what = "would be exceeded" if would_exceed else "reached"
    return Refusal(
        Reason.DAILY_QUOTA, 550, "5.7.1", f"Daily quota of {messages_per_day} messages {what} for this tenant"
    )


def rate_limit(messages_per_second: float) -> Refusal:
    return Refusal(
        Reason.RATE_LIMIT,
        451,
        "4.7.1",
        f"Rate limit of {messages_per_second:g} messages per second reached; try again later",
    )


def too_many_recipients(max_recipients: int) -> Refusal:
    return Refusal(
        Reason.TOO_MANY_RECIPIENTS, 452, "4.5.3", f"Too many recipients (limit {max_recipients} per message)"
    )


#: RFC 6531 §3.5: a non-ASCII address in MAIL (550) or RCPT (553) of a transaction that did not ask
#: for SMTPUTF8 ("Non-ASCII addresses not permitted for that sender/recipient")
NEEDS_SMTPUTF8_MAIL = Refusal(
    Reason.BAD_ADDRESS, 550, "5.6.7", "Non-ASCII sender address requires the SMTPUTF8 parameter on MAIL"
)
NEEDS_SMTPUTF8_RCPT = Refusal(
    Reason.BAD_ADDRESS, 553, "5.6.7", "Non-ASCII recipient address requires the SMTPUTF8 parameter on MAIL"
)


# -- the message -------------------------------------------------------------------------------

NO_FROM = Refusal(Reason.NO_FROM, 550, "5.7.1", "Message has no From: header; it must name one of your domains")
FROM_DOMAIN = Refusal(
    Reason.FROM_DOMAIN, 550, "5.7.1", "From: header rejected: its domain is not one of your tenant's domains"
)
SPOOL_FAILED = Refusal(Reason.SPOOL_FAILED, 451, "4.3.0", "Could not write the message to the queue; try again later")
#: the tenant's daily quota lease ran out and the store could not be asked for more (submit/leases.py)
QUOTA_UNCHECKED = Refusal(Reason.BUSY, 451, "4.3.0", "Could not check the daily quota; try again later")
#: smtp.max_message_size (the SMTP session, while reading DATA)
TOO_BIG = Refusal(Reason.TOO_BIG, 552, "5.3.4", "Message size exceeds fixed maximum message size")
#: smtp.max_data_in_flight: message bytes in memory from every session (the SMTP session, in DATA)
DATA_BUSY = Refusal(Reason.BUSY, 452, "4.3.1", "Insufficient system storage; try again later")


def broadcast_too_big(copies: int, size_bytes: int, max_bytes: int) -> Refusal:
    """A broadcast is one message per recipient: COPIES of SIZE_BYTES would pass api.max_bulk_bytes."""
    return Refusal(
        Reason.TOO_BIG, 552, "5.3.4",
        f"A broadcast is one message per recipient: {copies} copies of {size_bytes} bytes pass the limit of "
        f"{max_bytes} bytes; send it to fewer recipients at a time",
    )  # fmt: skip


def bad_stream(value: str) -> Refusal:
    shown = value if value.isprintable() and len(value) <= 40 else value[:40].encode("unicode_escape").decode()
    return Refusal(Reason.BAD_STREAM, 550, "5.6.0", f"X-Cmcd-Stream: must be transactional or broadcast, not '{shown}'")


def mail_loop(received_fields: int) -> Refusal:
    return Refusal(
        Reason.MAIL_LOOP,
        554,
        "5.4.6",
        f"Too many hops: the message already has {received_fields} Received: fields (mail loop?)",
    )


def bad_content(reply: str) -> Refusal:
    """The refusal of a message's bytes (a NUL, a bare CR or LF) from REPLY, the `code enhanced
    text` that policy.check_data gives (policy sits below tenancy, so it speaks strings)."""
    code, enhanced, text = reply.split(" ", 2)
    return Refusal(Reason.BAD_CONTENT, int(code), enhanced, text)


# -- counting ----------------------------------------------------------------------------------


class _Counted(Protocol):
    stats: IntakeStats


S = TypeVar("S", bound=_Counted)
P = ParamSpec("P")
T = TypeVar("T")


def counted(fn: Callable[Concatenate[S, P], T]) -> Callable[Concatenate[S, P], T]:
    """Decorates a check: each Refusal it returns is counted in self.stats."""

    @functools.wraps(fn)
    def check(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        result = fn(self, *args, **kwargs)
        if isinstance(result, Refusal):
            self.stats.refused(result)
        return result

    return check


def counted_async(fn: Callable[Concatenate[S, P], Awaitable[T]]) -> Callable[Concatenate[S, P], Awaitable[T]]:
    """counted, for a coroutine."""

    @functools.wraps(fn)
    async def check(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        result = await fn(self, *args, **kwargs)
        if isinstance(result, Refusal):
            self.stats.refused(result)
        return result

    return check
