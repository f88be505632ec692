"""The in-memory directory: tenants, their domains, IP credentials, DKIM signing keys, settings
and suppressions, as every decision on the hot path reads them; never changes the store.

It is built from the store and kept current two ways:
- in this process, a tenancy command awaits `refresh()` before it returns, so the change is in
  every index here when the caller hears "done";
- for changes made by another process (a worker, a node), the store keeps a directory version
  that every command bumps in the transaction of its change (and a second one, `removals`, for
  suppressions removed; an added suppression, a command's or a hard bounce's, is seen by its
  newer row id). `refresh()` reads them in one cheap store call and reloads only what moved; a
  poller calls it every `poll_s`. A decision waits (`current()`) only while a reload runs.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cmcd.records import Sender
from cmcd.store import AsyncStore
from cmcd.tenancy.suppressions import Suppressions

log = logging.getLogger("cmcd.tenancy")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Snapshot:
    """One consistent cut of the directory; replaced whole, never changed in place."""

    version: int = 0
    tenant_names: dict[int, str] = field(default_factory=dict)
    tenant_domains: dict[int, frozenset[str]] = field(default_factory=dict)
    ipcreds: tuple[tuple[Network, Sender], ...] = ()
    dkim_keys: tuple[tuple[str, str, str, bytes], ...] = ()
    dsn_off: frozenset[int] = frozenset()  # tenants that asked for no bounces
    refuse_suppressed: frozenset[int] = frozenset()  # tenants whose suppressed recipients get 550 at RCPT
    broadcast_users: frozenset[int] = frozenset()  # users whose mail is broadcast unless it says otherwise
    #: tenants' own actions per bounce class, over the host's [bounces] actions (cmcd/bounces.py)
    block_actions: dict[int, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def from_rows(cls, rows: dict[str, Any]) -> Snapshot:
        domains: dict[int, set[str]] = {t.id: set() for t in rows["tenants"]}
        for d in rows["domains"]:
            domains.setdefault(d.tenant_id, set()).add(d.name)
        enabled = rows["enabled"]
        settings: dict[int, tuple[bool, str]] = rows["settings"]
        return cls(
            version=rows["version"],
            tenant_names={t.id: t.name for t in rows["tenants"]},
            tenant_domains={k: frozenset(v) for k, v in domains.items()},
            ipcreds=tuple(
                (ipaddress.ip_network(c.cidr), Sender(c.user_id, c.tenant_id, c.tenant, c.login, "IP"))
                for c in rows["ipcreds"]
                if c.user_id in enabled
            ),
            dkim_keys=tuple(rows["dkim"]),
            dsn_off=frozenset(t for t, (dsn, _) in settings.items() if not dsn),
            refuse_suppressed=frozenset(t for t, (_, mode) in settings.items() if mode == "refuse"),
            broadcast_users=frozenset(rows.get("broadcast_users", ())),
            block_actions={t: dict(a) for t, a in rows.get("block_actions", {}).items()},
        )


class Directory:
    """The current Snapshot plus the suppression set, and the version they were read at."""

    def __init__(self, astore: AsyncStore, *, poll_s: float = 0.25):
        self._astore = astore
        self.poll_s = poll_s
        self.snapshot = Snapshot()
        self.suppressions = Suppressions(astore.store.keys)
        self._suppression_top = 0
        self._removals = 0
        #: moves when a change begins (changing()) and when a reload lands: a decision that began
        #: before (a password check under way) compares it and starts over
        self.generation = 0
        self._listeners: list[Callable[[Snapshot], None]] = []
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None
        self.reloads = 0  # full reloads, read by /metrics and tests
        self.refresh_failures = 0  # polls that could not read the store (/metrics)

    def on_reload(self, listener: Callable[[Snapshot], None]) -> None:
        """LISTENER(snapshot) after every full reload (the DKIM signer loads its keys this way)."""
        self._listeners.append(listener)

    async def start(self) -> None:
        await self.refresh(force=True)
        if self.poll_s > 0:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)

    def changing(self) -> None:
        """A command is about to change the store: decisions under way start over after it."""
        self.generation += 1

    @property
    def reloading(self) -> bool:
        """True while a reload is under way (then await current()); a version check that finds
        everything current never makes anyone wait."""
        return self._lock.locked()

    async def current(self) -> None:
        """Wait for a reload under way, so no decision uses what it is replacing."""
        if self._lock.locked():
            async with self._lock:
                pass

    async def refresh(self, force: bool = False) -> None:
        """Make every index reflect the store as of now: one cheap read of the versions, and a
        reload only of what moved (the accounts snapshot, the whole suppression set after a
        removal, or just the suppressions added since the last read). Nothing waits on a check
        that finds everything current; a reload is serialised, and a caller that arrives during
        one waits and checks again after it, so what it changed before calling is always seen."""
        state = await self._astore.call(self._astore.store.directory_state)
        if not force and not self._stale(state):
            return
        async with self._lock:
            version, removals, top = await self._astore.call(self._astore.store.directory_state)
            if force or version != self.snapshot.version:
                await self._reload_accounts()
            if force or removals != self._removals:
                self._removals, self._suppression_top, entries = await self._astore.call(
                    self._astore.store.suppression_set
                )
                self.suppressions.load(entries)
            elif top > self._suppression_top:
                self._suppression_top, added = await self._astore.call(
                    self._astore.store.suppressions_after, self._suppression_top
                )
                self.suppressions.update(added)

    def _stale(self, state: tuple[int, int, int]) -> bool:
        version, removals, top = state
        return version != self.snapshot.version or removals != self._removals or top > self._suppression_top

    async def _reload_accounts(self) -> None:
        snap = Snapshot.from_rows(await self._astore.call(self._astore.store.directory_rows))
        self.snapshot = snap
        self.generation += 1
        self.reloads += 1
        for listener in self._listeners:
            try:
                listener(snap)
            except Exception:
                log.exception("event=directory_listener_failed")

    async def _poll(self) -> None:
        """Changes another process made reach this one within poll_s."""
        failing = False
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.refresh()
            except Exception:
                self.refresh_failures += 1
                if self.refresh_failures == 1 or not failing:  # one line when it starts, not one a poll
                    log.exception("event=directory_refresh_failed")
                failing = True
            else:
                if failing:
                    log.warning("event=directory_refresh_recovered failures=%d", self.refresh_failures)
                failing = False
