"""The console's plumbing: its routes, who a request signs in (the session cookie), the CSRF check
on every form, the headers every page carries, and rendering a page (Jinja2, every value escaped)
in the reader's language and the tenant's time zone.

A page handler is `async def view(page: Page) -> web.StreamResponse`, registered with the role it
needs ("read": viewer or admin; "manage": admin; None: no sign-in, the sign-in pages themselves).
The tenant is always the session's, never the URL's or a form's: a handler reads
`page.caller.tenant` and nothing else names one. Role checks happen here, on the server, before
the handler runs; a page only hides what a role cannot use. Never imports cmcd.api.server: the
server passes itself as an ApiContext.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import logging
import secrets
import urllib.parse
import zoneinfo
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web
from multidict import MultiDict, MultiDictProxy

from cmcd.api.console import i18n
from cmcd.api.context import ApiContext, client_ip
from cmcd.api.problems import Problem
from cmcd.store.api_store import ApiCaller
from cmcd.store.console_store import STAGE_CODE, STAGE_ENROL, ConsoleSession
from cmcd.tenancy import Op

log = logging.getLogger("cmcd.api.console")

HERE = Path(__file__).parent
#: the session cookie: __Host- means Secure, Path=/ and no Domain, so no other host can set it
SESSION_COOKIE = "__Host-cmcd_session"
#: before sign-in: a random value the sign-in form's CSRF token is bound to
PRE_COOKIE = "__Host-cmcd_pre"
LANG_COOKIE = "__Host-cmcd_lang"
#: a form body is small: a bigger one gets 413 before it is read
FORM_MAX_BYTES = 64 * 1024
#: what a role may do in the console; a sender does not sign in at all
CONSOLE_PERMISSIONS = {"viewer": {"read"}, "admin": {"read", "manage"}}
#: every console response: no script or style from anywhere but this origin, no inline ones, no framing
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make browsers send "Origin: null" on our own forms
    "Strict-Transport-Security": "max-age=31536000",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}
#: the last route: every GET no other route matched (metrics count it as "unmatched")
CATCH_ALL = "/{tail:.*}"
CATCH_ALL_CANONICAL = "/{tail}"  # how aiohttp names it (resource.canonical)
STATIC_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml", ".ico": "image/x-icon"}

View = Callable[["Page"], Awaitable[web.StreamResponse]]


class ConsoleError(Exception):
    """A page that cannot be shown: STATUS and the text (already translated) that says why."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def csrf_token(secret: str) -> str:
    """The CSRF token of every form of the session (or pre-sign-in cookie) SECRET: bound to it, so
    a token from another session, an ended one or none at all is refused."""
    return hmac.new(secret.encode(), b"cmcd console csrf", hashlib.sha256).hexdigest()


def safe_next(target: str | None, default: str = "/") -> str:
    """TARGET if it is a path on this site (a redirect never leaves it), else DEFAULT."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in target):  # urlsplit drops CR/LF/TAB: refuse them here
        return default
    parts = urllib.parse.urlsplit(target)
    if parts.scheme or parts.netloc:
        return default
    return target


@dataclass
class Page:
    """One console request, as a view sees it."""

    console: Console
    request: web.Request
    session: ConsoleSession | None
    token: str  # the session cookie's value ("" before sign-in)
    lang: str
    tz: zoneinfo.ZoneInfo
    form: MultiDictProxy[str] = field(default_factory=lambda: MultiDictProxy(MultiDict()))
    #: cookies to set on the response (name -> value; "" deletes)
    cookies: dict[str, str] = field(default_factory=dict)

    @property
    def api(self) -> ApiContext:
        return self.console.api

    @property
    def caller(self) -> ApiCaller:
        """The signed-in user (views registered with a role only)."""
        assert self.session is not None
        return self.session.caller

    @property
    def csrf(self) -> str:
        pre = self.cookies.get(PRE_COOKIE) or self.request.cookies.get(PRE_COOKIE, "")
        return csrf_token(self.token or pre)

    def can(self, need: str) -> bool:
        return self.session is not None and need in CONSOLE_PERMISSIONS.get(self.session.caller.role, set())

    def t(self, key: str, **values: Any) -> str:
        return i18n.text(self.lang, key, **values)

    def when(self, ts: float | None, seconds: bool = True) -> str:
        """TS (epoch seconds) as the tenant's local time."""
        if ts is None:
            return ""
        local = datetime.datetime.fromtimestamp(ts, self.tz)
        return local.strftime("%Y-%m-%d %H:%M:%S %Z" if seconds else "%Y-%m-%d %H:%M %Z")

    def local_time(self, value: str, name: str) -> float | None:
        """A time typed in a form ("2026-12-03T10:00", ISO 8601, read in the tenant's zone when it
        has no offset) as epoch seconds; "" is None; anything else a 400 naming the field."""
        value = value.strip()
        if not value:
            return None
        try:
            t = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ConsoleError(400, self.t("error.bad_time", field=name)) from None
        if t.tzinfo is None:
            t = t.replace(tzinfo=self.tz)
        return t.timestamp()

    def op(self, action: str, target: str, detail: str = "", **kw: Any) -> Op:
        """The tenancy Op for a change the signed-in user asks for: the operation log names them
        as `console:<login> (<session id>)`."""
        caller = self.caller
        return Op(actor=console_actor(caller), action=action, target=target, detail=detail, **kw)

    def render(self, template: str, status: int = 200, **values: Any) -> web.Response:
        html = self.console.templates.get_template(template).render(page=self, t=self.t, **values)
        return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")

    def redirect(self, path: str, done: str | None = None) -> web.Response:
        """303 to PATH (after a change: the next page says DONE, a key of i18n's "done." texts)."""
        if done is not None:
            path += ("&" if "?" in path else "?") + urllib.parse.urlencode({"done": done})
        return web.Response(status=303, headers={"Location": path})

    @property
    def done(self) -> str:
        """The text of ?done=KEY when KEY is one of ours ("" otherwise: no text from a URL is shown)."""
        key = self.request.query.get("done", "")
        return self.t(f"done.{key}") if i18n.has(f"done.{key}") else ""


def console_actor(caller: ApiCaller) -> str:
    """How the operation log names a console user: `console:<login> (<session id>)`."""
    return f"console:{caller.login} ({caller.credential.removeprefix('console:')})"


def templates() -> jinja2.Environment:
    """The console's templates as every page of the API listener renders them (the unsubscribe page too)."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


class Console:
    """The console's routes on one API server."""

    def __init__(self, api: ApiContext) -> None:
        self.api = api
        self.templates = templates()
        self.templates.globals["nav"] = NAV
        #: the static files, read once (a few KiB): name -> (bytes, content type)
        self._static = {
            p.name: (p.read_bytes(), STATIC_TYPES[p.suffix])
            for p in (HERE / "static").iterdir()
            if p.suffix in STATIC_TYPES
        }
        self.router: web.UrlDispatcher | None = None
        #: every view's (method, path, the role it needs): what the authorisation tests walk
        self.routes: list[tuple[str, str, str | None]] = []

    def add_routes(self, router: web.UrlDispatcher) -> None:
        from cmcd.api.console import pages  # the views register themselves on this console

        self.router = router
        router.add_get("/static/{name}", self._get_static)
        router.add_get("/lang", self._set_lang)
        pages.register(self)
        self.get(CATCH_ALL, self._not_found, need=None)  # last: what no route above matched

    def get(self, path: str, view: View, need: str | None = "read") -> None:
        assert self.router is not None
        self.router.add_get(path, self._handler(view, need, post=False), allow_head=False)
        self.routes.append(("GET", path, need))

    def post(self, path: str, view: View, need: str | None = "manage") -> None:
        assert self.router is not None
        self.router.add_post(path, self._handler(view, need, post=True))
        self.routes.append(("POST", path, need))

    # -- one request ---------------------------------------------------------------------------

    def _handler(self, view: View, need: str | None, post: bool) -> Callable[[web.Request], Awaitable[Any]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            page = await self._page(request)
            try:
                response = await self._run(page, view, need, post)
            except ConsoleError as exc:
                response = self.error_page(page, exc.status, exc.text)
            except Problem as problem:  # the body's limits (413, 408, 503): said as a page
                response = self.error_page(page, problem.status, problem.detail)
            for name, value in page.cookies.items():
                set_cookie(response, name, value, self.api.config.api.console_session_ttl)
            secure_headers(response)
            return response

        return handle

    async def _run(self, page: Page, view: View, need: str | None, post: bool) -> web.StreamResponse:
        session = page.session
        if need is not None:
            if session is None:
                back = page.request.path_qs if not post else "/"
                return page.redirect("/login?" + urllib.parse.urlencode({"next": back}))
            if session.stage == STAGE_CODE:
                return page.redirect("/login/code")
            if session.stage == STAGE_ENROL and not page.request.path.startswith("/enrol"):
                return page.redirect("/enrol")
            if not page.can(need):
                raise ConsoleError(403, page.t("error.forbidden"))
        if post:
            await self._read_form(page)
        return await view(page)

    async def _page(self, request: web.Request) -> Page:
        token = request.cookies.get(SESSION_COOKIE, "")
        session = None
        api = self.api
        if token:
            session = await api.astore.call(
                api.store.console_session, token, api.clock(), float(api.config.api.console_idle_timeout)
            )
        lang = i18n.choose(request.query.get("lang") or request.cookies.get(LANG_COOKIE, ""),
                           request.headers.get("Accept-Language", ""))  # fmt: skip
        tz_name = (session.timezone if session is not None else "") or api.config.server.timezone
        try:
            tz = zoneinfo.ZoneInfo(tz_name)
        except (ValueError, zoneinfo.ZoneInfoNotFoundError):
            tz = zoneinfo.ZoneInfo("UTC")
        page = Page(self, request, session, token if session is not None else "", lang, tz)
        if token and session is None:
            page.cookies[SESSION_COOKIE] = ""  # ended, expired or unknown: forget it
        return page

    async def _read_form(self, page: Page) -> None:
        """The form of a POST, once its CSRF token (and Origin, when the browser sent one) proves it
        came from one of our pages in this session; else 403 and nothing changes."""
        request = page.request
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"https://{request.host}":
            log.warning("event=console_csrf_refused reason=origin client_ip=%s path=%s origin=%r host=%r",
                        client_ip(request), request.path, origin[:200], request.host[:200])  # fmt: skip
            raise ConsoleError(403, page.t("error.csrf"))
        if request.content_type not in ("application/x-www-form-urlencoded", "multipart/form-data"):
            raise ConsoleError(415, page.t("error.form_type"))
        if request.content_type == "multipart/form-data":
            raise ConsoleError(415, page.t("error.form_type"))
        raw = await self.api.read_body(request, FORM_MAX_BYTES, float(self.api.config.api.body_timeout))
        try:
            fields = urllib.parse.parse_qsl(bytes(raw).decode(), keep_blank_values=True, strict_parsing=False,
                                            max_num_fields=200)  # fmt: skip
        except (UnicodeDecodeError, ValueError):
            raise ConsoleError(400, page.t("error.form_encoding")) from None
        form: MultiDict[str] = MultiDict(fields)
        secret = page.token or request.cookies.get(PRE_COOKIE, "")
        sent = form.get("csrf", "")
        if not secret or not hmac.compare_digest(sent.encode(), csrf_token(secret).encode()):
            log.warning(
                "event=console_csrf_refused reason=token client_ip=%s path=%s", client_ip(request), request.path
            )
            raise ConsoleError(403, page.t("error.csrf"))
        page.form = MultiDictProxy(form)

    async def _not_found(self, page: Page) -> web.StreamResponse:
        """A page the console does not have: the console's 404 page (under /v1/, the API's problem)."""
        if page.request.path.startswith("/v1/"):
            raise web.HTTPNotFound()
        raise ConsoleError(404, page.t("error.not_found"))

    def error_page(self, page: Page, status: int, text: str) -> web.Response:
        return page.render("error.html", status=status, message=text)

    # -- documents -----------------------------------------------------------------------------

    async def _get_static(self, request: web.Request) -> web.Response:
        found = self._static.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound()
        response = web.Response(body=found[0], content_type=found[1])
        response.headers["Cache-Control"] = "public, max-age=3600"
        secure_headers(response)
        return response

    async def _set_lang(self, request: web.Request) -> web.Response:
        """The language switch: ?to=ja|en, back to ?next (a path on this site)."""
        lang = request.query.get("to", "")
        response = web.Response(status=303, headers={"Location": safe_next(request.query.get("next"))})
        if lang in i18n.LANGUAGES:
            set_cookie(response, LANG_COOKIE, lang, 365 * 86400)
        secure_headers(response)
        return response


def new_token() -> str:
    return secrets.token_urlsafe(32)


def set_cookie(response: web.StreamResponse, name: str, value: str, max_age: float) -> None:
    """A cookie only this site's pages over HTTPS ever send back, never to a script."""
    if value:
        response.set_cookie(name, value, max_age=int(max_age), path="/", secure=True, httponly=True, samesite="Strict")
    else:
        response.del_cookie(name, path="/", secure=True, httponly=True, samesite="Strict")


def secure_headers(response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if response.content_type == "text/html" or response.status in (303, 302):
        response.headers.setdefault("Cache-Control", "no-store")


@dataclass(frozen=True)
class NavItem:
    path: str
    key: str  # i18n key of its label
    need: str


#: the menu, in order; an item shows only to a role that may open it
NAV: tuple[NavItem, ...] = (
    NavItem("/", "nav.dashboard", "read"),
    NavItem("/mail", "nav.mail", "read"),
    NavItem("/users", "nav.users", "manage"),
    NavItem("/keys", "nav.keys", "manage"),
    NavItem("/domains", "nav.domains", "read"),
    NavItem("/blocks", "nav.blocks", "read"),
    NavItem("/webhooks", "nav.webhooks", "manage"),
    NavItem("/logins", "nav.logins", "read"),
    NavItem("/ops", "nav.ops", "read"),
    NavItem("/account", "nav.account", "read"),
    NavItem("/contact", "nav.contact", "read"),
)


def choices(pairs: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
    """Options for a <select>: value and label."""
    return [{"value": v, "label": label} for v, label in pairs]
