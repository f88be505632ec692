"""The store: the records in SQLite (tenants, users, API keys, domains and their DKIM keys,
suppression, webhooks, the mail, login and operation logs, backups); blocking calls run on one
thread (AsyncStore).

It holds rows, not rules: validation and the in-memory directory are tenancy/'s, and it knows
nothing of the queue.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from cmcd.db import STORE_BUSY_MS
from cmcd.stats import STORE_BUCKETS_S, Histogram
from cmcd.store.log_store import LoginRecord
from cmcd.store.store import Store, open_store

T = TypeVar("T")

__all__ = ["AsyncStore", "LoginRecord", "Store", "open_store"]


class AsyncStore:
    """Runs Store methods on the store's own thread so the event loop never blocks on SQLite.

    Long reads for people (the console's dashboard aggregates) run on a thread of their own with
    a read-only connection (report()), so a slow one never holds up logins, sending or the API
    behind it on the store thread; they wait only for each other."""

    def __init__(self, store: Store):
        self.store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self.call_seconds = Histogram(STORE_BUCKETS_S)  # each call on the store thread, read by /metrics
        self._reports = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-report")
        self._report_conn: sqlite3.Connection | None = None  # used only on the report thread

    async def report(self, fn: Callable[..., T], *args: Any) -> T:
        """FN(a read-only connection to the store, *ARGS) on the report thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reports, functools.partial(self._run_report, fn, *args))

    def _run_report(self, fn: Callable[..., T], *args: Any) -> T:
        if self._report_conn is None:
            conn = sqlite3.connect(f"file:{self.store.path}?mode=ro", uri=True, check_same_thread=True)
            conn.execute(f"PRAGMA busy_timeout = {STORE_BUSY_MS}")
            conn.execute("PRAGMA query_only = ON")
            self._report_conn = conn
        return fn(self._report_conn, *args)

    def _close_report(self) -> None:
        if self._report_conn is not None:
            self._report_conn.close()
            self._report_conn = None

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self.call_seconds.timed, functools.partial(fn, *args, **kwargs)
        )

    def close(self) -> None:
        self._reports.submit(self._close_report)
        self._reports.shutdown(wait=True)
        self._executor.shutdown(wait=True)
        self.store.close()
