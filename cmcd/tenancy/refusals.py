"""Typed refusals: why a command, a login or a message was not taken; never does I/O.

A refusal is made once, where the decision is taken (tenancy commands, submit), and rendered
once per protocol: `Refusal.reply` for SMTP, `cmcd.api.problems.problem` for HTTP (RFC 9457),
`str(Refused)` for the admin socket and cmcctl. Nothing reads a refusal back from its text.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cmcd.errors import StoreError


class Reason(enum.Enum):
    """Every reason there is; the value is the fixed label metrics and logs use."""

    # tenancy commands
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    INVALID = "invalid"
    FORBIDDEN = "forbidden"
    # logins
    AUTH_INVALID = "auth_invalid"
    AUTH_THROTTLED = "auth_throttled"
    # a message coming in (submit), in the order the metrics have always listed them
    NULL_SENDER = "null_sender"
    BAD_ADDRESS = "bad_address"
    SENDER_DOMAIN = "sender_domain"
    DAILY_QUOTA = "daily_quota"
    RATE_LIMIT = "rate_limit"
    TOO_MANY_RECIPIENTS = "too_many_recipients"
    SUPPRESSED = "suppressed"
    NO_FROM = "no_from"
    FROM_DOMAIN = "from_domain"
    SPOOL_FAILED = "spool_failed"
    TOO_BIG = "too_big"
    BAD_CONTENT = "bad_content"
    SPOOL_LOW = "spool_low"
    MAIL_LOOP = "mail_loop"
    BAD_STREAM = "bad_stream"
    TENANT_DELETED = "tenant_deleted"
    BUSY = "busy"
    OTHER = "other"


@dataclass(frozen=True)
class Refusal:
    """One refusal: its reason, the SMTP reply code and enhanced status code (RFC 3463) that say
    it in SMTP, the words a person reads, and the request field at fault (if one is)."""

    reason: Reason
    code: int
    enhanced: str
    text: str
    field: str = ""

    @property
    def reply(self) -> str:
        """The SMTP reply line: `550 5.7.1 text`."""
        return f"{self.code} {self.enhanced} {self.text}"

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500


class Refused(StoreError):
    """Raised by a tenancy command that changed nothing; .refusal says why, str() is the text.

    A StoreError, so every door that already reports a store's refusal reports this one."""

    def __init__(self, refusal: Refusal):
        super().__init__(refusal.text)
        self.refusal = refusal


def not_found(text: str, field: str = "") -> Refused:
    return Refused(Refusal(Reason.NOT_FOUND, 550, "5.1.1", text, field))


def conflict(text: str, field: str = "") -> Refused:
    return Refused(Refusal(Reason.CONFLICT, 550, "5.7.1", text, field))


def invalid(text: str, field: str = "") -> Refused:
    return Refused(Refusal(Reason.INVALID, 501, "5.5.4", text, field))


def forbidden(text: str, field: str = "") -> Refused:
    return Refused(Refusal(Reason.FORBIDDEN, 550, "5.7.1", text, field))
