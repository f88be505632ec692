"""One-click unsubscribe over HTTPS (RFC 8058): GET and POST /u/{token} on the API listener.

The token (cmcd/unsubscribe.py) names the tenant, the stream and the recipient; nobody signs in,
no cookie is set or read, and the console's CSRF and Origin checks do not apply: the POST comes
from a mailbox provider or from the page below, never with a session. A POST whose body is
`List-Unsubscribe=One-Click` (form-urlencoded or multipart/form-data, RFC 8058 section 3.1)
holds the address back from the tenant's broadcast mail at once: one tenancy command puts the
suppression, the mail-log row "unsubscribed" (which the tenant's webhooks post) and the
operation-log row (the actor is the recipient; the address is in no row in clear) in one store
transaction, and this process's directory is current when it returns (other workers within their
poll). A repeated POST answers 200 again and changes nothing.

A GET never unsubscribes (mailbox scanners follow links): it shows the address masked and a
button that POSTs the one-click body to the same URL. Every answer is a small HTML page in English
or Japanese (?lang=, else Accept-Language), without script, with the console's stylesheet; a token
that does not open, or whose tenant is gone, is a 404 page and changes nothing; another body gets
400 (415 for another media type). Never shows an address whole, never names one in a log line.
"""

from __future__ import annotations

import email.parser
import email.policy
import functools
import logging
import sqlite3
import urllib.parse
from typing import Any

from aiohttp import web

from cmcd.api.console import i18n
from cmcd.api.console.web import templates
from cmcd.api.context import ApiContext
from cmcd.api.problems import Problem
from cmcd.errors import StoreError
from cmcd.tenancy import Op
from cmcd.tenancy.refusals import Reason, Refused
from cmcd.unsubscribe import ONE_CLICK, PATH, Subscription, Tokens

log = logging.getLogger("cmcd.api.unsubscribe")

ROUTE = PATH + "{token}"
#: the one-click body is 26 bytes, a multipart one a few hundred: anything near this is not one
FORM_MAX_BYTES = 4096
#: the one field RFC 8058 section 3.1 has the POST carry
ONE_CLICK_FIELD = tuple(ONE_CLICK.split("=", 1))
#: Retry-After of a 503 (the store cannot take the change now)
RETRY_AFTER_S = "60"
#: how the operation log names who asked (the recipient, through the link in their message)
ACTOR = "recipient (one-click unsubscribe)"
#: every answer: nothing runs, nothing loads but our stylesheet, no framing, no Referer leaves
#: (the URL holds the token), nothing is kept by a cache or indexed
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Robots-Tag": "noindex, nofollow",
    "Strict-Transport-Security": "max-age=31536000",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def mask(address: str) -> str:
    """ADDRESS as the page shows it: the local part's first character, then *** ("a***@example.com")."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address[:1] + "***"
    return f"{local[:1]}***@{domain}"


def one_click(content_type: str, header: str, raw: bytes) -> bool | None:
    """Whether RAW (a body of CONTENT_TYPE, its whole Content-Type HEADER given for multipart's
    boundary) is exactly the one-click field; None when the media type is neither RFC 8058 allows."""
    if content_type == "application/x-www-form-urlencoded":
        try:
            fields = urllib.parse.parse_qsl(raw.decode("ascii").strip(), strict_parsing=True, max_num_fields=4)
        except (UnicodeDecodeError, ValueError):
            return False
        return fields == [ONE_CLICK_FIELD]
    if content_type == "multipart/form-data":
        return _multipart(header, raw) == [ONE_CLICK_FIELD]
    return None


def _multipart(header: str, raw: bytes) -> list[tuple[str, str]]:
    """The form-data fields of a multipart body (values as ASCII text, stripped); [] when it is not one."""
    try:
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + header.encode("ascii") + b"\r\n\r\n" + raw
        )
    except (UnicodeEncodeError, ValueError):
        return []
    if not message.is_multipart() or message.defects:
        return []
    fields: list[tuple[str, str]] = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if part.get_content_disposition() != "form-data" or not isinstance(name, str) or not isinstance(payload, bytes):
            return []
        try:
            fields.append((name, payload.decode("ascii").strip()))
        except UnicodeDecodeError:
            return []
    return fields


class Unsubscribe:
    """The two routes on one API server."""

    def __init__(self, api: ApiContext) -> None:
        self.api = api
        self.templates = templates()

    @functools.cached_property
    def tokens(self) -> Tokens:
        """Made at the first request: a route table can be built without a store (tests/e2e/test_openapi.py)."""
        return Tokens(self.api.store.keys)

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """Before the console's: its catch-all would take /u/ for a page of its own."""
        router.add_get(ROUTE, self.get, allow_head=False)
        router.add_post(ROUTE, self.post)

    async def get(self, request: web.Request) -> web.Response:
        lang = _lang(request)
        sub = self.tokens.read(request.match_info["token"])
        try:
            found = None if sub is None else await self.api.astore.call(self.api.store.unsubscribed, *_key(sub))
        except (sqlite3.Error, StoreError) as exc:
            return self._unavailable(lang, exc)
        if sub is None or found is None:
            return self._page(lang, 404, "not_found")
        tenant, already = found
        return self._page(lang, 200, "already" if already else "ask", tenant=tenant, address=mask(sub.address))

    async def post(self, request: web.Request) -> web.Response:
        lang = _lang(request)
        stats = self.api.service.stats.unsubscribes
        sub = self.tokens.read(request.match_info["token"])
        if sub is None:
            stats["not_found"] += 1
            return self._page(lang, 404, "not_found")
        try:
            raw = await self.api.read_body(request, FORM_MAX_BYTES, float(self.api.config.api.body_timeout))
        except Problem as problem:  # too large (413), too slow (408), no room now (503): said as a page
            stats["bad_request"] += 1
            page = self._page(lang, problem.status, "unavailable" if problem.status == 503 else "bad_body")
            page.headers.update(problem.headers)
            return page
        said = one_click(request.content_type, request.headers.get("Content-Type", ""), bytes(raw))
        if not said:
            stats["bad_request"] += 1
            return self._page(lang, 415 if said is None else 400, "bad_body")
        try:
            found = await self._unsubscribe(sub)
        except (sqlite3.Error, StoreError) as exc:
            stats["failed"] += 1
            return self._unavailable(lang, exc)
        if found is None:
            stats["not_found"] += 1
            return self._page(lang, 404, "not_found")
        tenant, already = found
        stats["repeated" if already else "done"] += 1
        if not already:  # a repeat is counted, not logged: anyone holding a link could fill the log
            log.info("event=unsubscribed tenant=%s stream=%s", tenant, sub.stream)
        return self._page(lang, 200, "done", tenant=tenant, address=mask(sub.address))

    async def _unsubscribe(self, sub: Subscription) -> tuple[str, bool] | None:
        """Unsubscribe SUB: (the tenant's name, whether it was already), or None when the tenant is gone."""
        found = await self.api.astore.call(self.api.store.unsubscribed, *_key(sub))
        if found is None or found[1]:  # a repeat (a provider's retry, a second click) writes no row of any log
            return found
        tenant = found[0]
        op = Op(actor=ACTOR, action="unsubscribe.one_click", target="1 address")
        try:
            added = await self.api.tenancy.accounts.unsubscribe(
                op, tenant, sub.tenant_id, sub.address, sub.stream, self.api.clock()
            )
        except Refused as exc:
            if exc.refusal.reason is Reason.NOT_FOUND:  # the tenant was deleted meanwhile
                return None
            raise
        return tenant, not added

    def _unavailable(self, lang: str, exc: Exception) -> web.Response:
        """The store cannot be read or written now: 503, nothing changed, try again (a provider does)."""
        log.warning("event=unsubscribe_failed error=%r", str(exc)[:300])
        page = self._page(lang, 503, "unavailable")
        page.headers["Retry-After"] = RETRY_AFTER_S
        return page

    def _page(self, lang: str, status: int, state: str, **values: Any) -> web.Response:
        def t(key: str, **kw: Any) -> str:
            return i18n.text(lang, key, **kw)

        html = self.templates.get_template("unsubscribe.html").render(lang=lang, t=t, state=state, **values)
        response = web.Response(text=html, status=status, content_type="text/html", charset="utf-8")
        response.headers.update(HEADERS)
        return response


def _key(sub: Subscription) -> tuple[int, str, str]:
    return sub.tenant_id, sub.address, sub.stream


def _lang(request: web.Request) -> str:
    return i18n.choose(request.query.get("lang", ""), request.headers.get("Accept-Language", ""))
