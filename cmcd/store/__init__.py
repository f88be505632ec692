"""The store: the records in SQLite (tenants, users, API keys, domains and their DKIM keys,
suppression, webhooks, the mail, login and operation logs, backups); blocking calls run on one
thread (AsyncStore).

It holds rows, not rules: validation and the in-memory directory are tenancy/'s, and it knows
nothing of the queue.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from cmcd.stats import STORE_BUCKETS_S, Histogram
from cmcd.store.log_store import LoginRecord
from cmcd.store.store import Store, open_store

T = TypeVar("T")

__all__ = ["AsyncStore", "LoginRecord", "Store", "open_store"]


class AsyncStore:
    """Runs Store methods on the store's own thread so the event loop never blocks on SQLite."""

    def __init__(self, store: Store):
        self.store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self.call_seconds = Histogram(STORE_BUCKETS_S)  # each call on the store thread, read by /metrics

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self.call_seconds.timed, functools.partial(fn, *args, **kwargs)
        )

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.store.close()
