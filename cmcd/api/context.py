"""What an API handler module (users.py, hooks.py, blocks.py, records.py, sessions.py) needs from
the server, as a Protocol, how the API names a change for the operation log, and whose address a
request came from; no I/O here.

cmcd.api.server owns the routes and passes its ApiServer, which is an ApiContext; the handler
modules import this module, never the server, so there is no import circle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import dns.asyncresolver
from aiohttp import web

from cmcd.config import Config
from cmcd.store import AsyncStore
from cmcd.store.api_store import ApiCaller
from cmcd.store.store import Store
from cmcd.submit.service import SubmitService
from cmcd.tenancy import Op, Tenancy


class ApiContext(Protocol):
    """The server as its handlers see it."""

    config: Config
    astore: AsyncStore
    store: Store
    tenancy: Tenancy
    #: the way in for messages, and its logins (service.auth: password checks, throttle, login log)
    service: SubmitService
    #: the daemon's resolver (dns.nameservers): webhook URLs are checked with it
    resolver: dns.asyncresolver.Resolver
    clock: Callable[[], float]

    async def caller(self, request: web.Request, need: str | None) -> ApiCaller:
        """The authenticated caller, allowed NEED (None: any role); else a Problem."""
        ...

    async def read_json(
        self, request: web.Request, limit: int | None = None, within_s: float | None = None
    ) -> tuple[Any, bytearray]:
        """The request's JSON body, read under the API's limits; else a Problem."""
        ...

    async def read_body(
        self, request: web.Request, limit: int | None = None, within_s: float | None = None
    ) -> bytearray:
        """The request's body, read under the API's limits; else a Problem."""
        ...

    async def log_op(self, caller: ApiCaller, action: str, target: str, error: str | None, detail: str = "") -> None:
        """An operation-log row for what CALLER did that is no tenancy command (ok, or refused: ERROR)."""
        ...


def client_ip(request: web.Request) -> str:
    """The address REQUEST came from ("?" once its connection is gone)."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return str(peer[0]) if peer else "?"


def api_actor(caller: ApiCaller) -> str:
    """How the operation log names an API caller: `api:<login> (<credential>)`."""
    return f"api:{caller.login} ({caller.credential})"


def api_op(
    caller: ApiCaller,
    action: str,
    target: str,
    detail: str = "",
    ok_row: Callable[[Any], tuple[str, str]] | None = None,
) -> Op:
    """The tenancy Op for a change CALLER asks for (ACTION like `api.users.add`)."""
    return Op(actor=api_actor(caller), action=action, target=target, actor_uid=None, detail=detail, ok_row=ok_row)
