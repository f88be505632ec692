"""Suppressed recipients per tenant, in memory: checked for every recipient at RCPT and before delivery.

Holds only the keyed HMAC of each address (never the address), loaded from the store at
start and kept current by cmcd.tenancy.directory (the delivery engine adds a hard bounce at once). The store remains the record.
"""

from __future__ import annotations

from cmcd.crypto import DataKeys


class Suppressions:
    def __init__(self, keys: DataKeys):
        self.keys = keys
        self._set: set[tuple[int, bytes]] = set()
        #: added here (a hard bounce) and not yet seen in the store: its row is shipped later,
        #: and a reload in between must not forget it
        self._local: set[tuple[int, bytes]] = set()

    def load(self, entries: set[tuple[int, bytes]] | list[tuple[int, bytes]]) -> None:
        """The whole index from the store, plus what was added here and has not reached it yet."""
        fresh = entries if isinstance(entries, set) else set(entries)
        self._local -= fresh
        self._set = fresh | self._local

    def contains(self, tenant_id: int, address: str) -> bool:
        return bool(self._set) and (tenant_id, self.keys.index(address)) in self._set

    def update(self, entries: list[tuple[int, bytes]]) -> None:
        """Rows added to the store since the last read."""
        self._set.update(entries)
        self._local.difference_update(entries)

    def add(self, tenant_id: int, address: str) -> None:
        """At once, before the store has the row (the delivery engine, on a hard bounce)."""
        entry = (tenant_id, self.keys.index(address))
        self._set.add(entry)
        self._local.add(entry)

    def discard(self, tenant_id: int, address: str) -> None:
        entry = (tenant_id, self.keys.index(address))
        self._set.discard(entry)
        self._local.discard(entry)

    def __len__(self) -> int:
        return len(self._set)
