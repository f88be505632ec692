"""RFC 9457 problem details for the tenant API, and the one HTTP rendering of a typed refusal; no I/O."""

from __future__ import annotations

import datetime
from typing import Any

from aiohttp import web

from cmcd.tenancy.refusals import Reason, Refusal

PROBLEM_TYPE = "urn:cmcd:problem:"


class Problem(Exception):
    """An error response: status, a short slug for the type URI, a title and a detail."""

    def __init__(
        self, status: int, slug: str, detail: str, *, smtp: str = "", extra: dict[str, Any] | None = None
    ) -> None:
        super().__init__(detail)
        self.status, self.slug, self.detail, self.smtp = status, slug, detail, smtp
        self.extra = extra or {}
        self.headers: dict[str, str] = {}

    def response(self) -> web.Response:
        body: dict[str, Any] = {
            "type": PROBLEM_TYPE + self.slug,
            "title": _TITLES.get(self.status, "Error"),
            "status": self.status,
            "detail": self.detail,
        }
        if self.smtp:
            body["smtp"] = self.smtp
        body.update(self.extra)
        return web.json_response(
            body, status=self.status, content_type="application/problem+json", headers=self.headers
        )


_TITLES = {
    400: "Bad request",
    401: "Not authenticated",
    403: "Forbidden",
    404: "Not found",
    409: "Conflict",
    413: "Request too large",
    405: "Method not allowed",
    415: "Unsupported media type",
    422: "Unprocessable request",
    429: "Too many requests",
    500: "Internal error",
    503: "Service unavailable",
}


#: the HTTP status and problem type of each reason; a temporary refusal not named here is 503
_BY_REASON: dict[Reason, tuple[int, str]] = {
    Reason.NOT_FOUND: (404, "not-found"),
    Reason.CONFLICT: (409, "conflict"),
    Reason.INVALID: (422, "invalid"),
    Reason.FORBIDDEN: (403, "forbidden"),
    Reason.AUTH_INVALID: (401, "login-failed"),
    Reason.AUTH_THROTTLED: (429, "rate-limit"),
    Reason.TENANT_DELETED: (403, "tenant-deleted"),
    Reason.SENDER_DOMAIN: (403, "sender-domain"),
    Reason.FROM_DOMAIN: (403, "sender-domain"),
    Reason.NO_FROM: (403, "sender-domain"),  # "it must name one of your domains"
    Reason.SUPPRESSED: (422, "suppressed"),
    Reason.DAILY_QUOTA: (429, "daily-quota"),
    Reason.RATE_LIMIT: (429, "rate-limit"),
    Reason.BAD_ADDRESS: (422, "bad-address"),
}


_COMMAND_REASONS = frozenset({Reason.NOT_FOUND, Reason.CONFLICT, Reason.INVALID, Reason.FORBIDDEN})


def problem(refusal: Refusal, field: str = "") -> Problem:
    """The one HTTP rendering of a typed refusal (tenancy commands and submit alike)."""
    status, slug = _BY_REASON.get(refusal.reason, (503, "try-later") if refusal.temporary else (422, "refused"))
    field = field or refusal.field
    smtp = "" if refusal.reason in _COMMAND_REASONS else refusal.reply  # a message's refusal says its SMTP words
    p = Problem(status, slug, refusal.text, smtp=smtp,
                extra={"field": field} if field else None)  # fmt: skip
    if status in (429, 503):
        p.headers["Retry-After"] = "3600" if refusal.reason is Reason.DAILY_QUOTA else "1"
    return p


def iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
