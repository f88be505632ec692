"""Suppressed recipients per tenant, in memory: checked for every recipient at RCPT and before delivery.

Holds only the keyed HMAC of each address (never the address), loaded from the store at
start and kept current by cmcd.tenancy.directory (the delivery engine adds a hard bounce at once). The store remains the record.
An entry is scoped: '' holds the address back from every stream (a bounce, an operator's or a
tenant's entry), a stream's name from that stream only (a recipient's one-click unsubscribe
holds back broadcast mail, never transactional mail: cmcd/unsubscribe.py).
"""

from __future__ import annotations

from cmcd.crypto import DataKeys

#: (tenant id, address HMAC, stream scope)
Entry = tuple[int, bytes, str]


class Suppressions:
    def __init__(self, keys: DataKeys):
        self.keys = keys
        self._set: set[Entry] = set()
        #: added here (a hard bounce) and not yet seen in the store: its row is shipped later,
        #: and a reload in between must not forget it
        self._local: set[Entry] = set()

    def load(self, entries: set[Entry] | list[Entry]) -> None:
        """The whole index from the store, plus what was added here and has not reached it yet."""
        fresh = entries if isinstance(entries, set) else set(entries)
        self._local -= fresh
        self._set = fresh | self._local

    def contains(self, tenant_id: int, address: str, stream: str = "") -> bool:
        """Whether mail of STREAM to ADDRESS is held back for TENANT_ID ('' STREAM: held back from
        every stream, the check at RCPT before the stream is known)."""
        if not self._set:
            return False
        h = self.keys.index(address)
        return (tenant_id, h, "") in self._set or (bool(stream) and (tenant_id, h, stream) in self._set)

    def update(self, entries: list[Entry]) -> None:
        """Rows added to the store since the last read."""
        self._set.update(entries)
        self._local.difference_update(entries)

    def add(self, tenant_id: int, address: str, stream: str = "") -> None:
        """At once, before the store has the row (the delivery engine, on a hard bounce)."""
        entry = (tenant_id, self.keys.index(address), stream)
        self._set.add(entry)
        self._local.add(entry)

    def discard(self, tenant_id: int, address: str) -> None:
        """Every scope of ADDRESS (the store's delete removes them all)."""
        h = self.keys.index(address)
        for entry in [e for e in self._set if e[0] == tenant_id and e[1] == h]:
            self._set.discard(entry)
        self._local = {e for e in self._local if not (e[0] == tenant_id and e[1] == h)}

    def __len__(self) -> int:
        return len(self._set)
