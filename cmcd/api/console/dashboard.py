"""The dashboard: the console's home page (a first version: the signed-in tenant's name)."""

from __future__ import annotations

from aiohttp import web

from cmcd.api.console import i18n
from cmcd.api.console.web import Console, Page


def register(c: Console) -> None:
    c.get("/", home)


async def home(page: Page) -> web.StreamResponse:
    return page.render("dashboard.html")


i18n.add({"en": {"dashboard.title": "Dashboard"}, "ja": {"dashboard.title": "ダッシュボード"}})
