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

    def load(self, entries: list[tuple[int, bytes]]) -> None:
        self._set = set(entries)

    def contains(self, tenant_id: int, address: str) -> bool:
        return bool(self._set) and (tenant_id, self.keys.index(address)) in self._set

    def update(self, entries: list[tuple[int, bytes]]) -> None:
        self._set.update(entries)

    def add(self, tenant_id: int, address: str) -> None:
        self._set.add((tenant_id, self.keys.index(address)))

    def discard(self, tenant_id: int, address: str) -> None:
        self._set.discard((tenant_id, self.keys.index(address)))

    def __len__(self) -> int:
        return len(self._set)
