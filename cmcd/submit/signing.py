"""DKIM signing at end of data: the keys of every tenant domain, loaded once, used from worker threads.

The signing keys come from the store (active, and not known to be missing from DNS) and are
parsed once per key; a reload swaps the whole table at once, so a message is signed with one
consistent set. A From: domain without a usable key is sent unsigned and logged once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from cmcd.config import DkimConfig
from cmcd.dkim import DkimError, DkimKey, sign

log = logging.getLogger("cmcd.dkim")


class DkimSigner:
    def __init__(self, config: DkimConfig, clock: Callable[[], float] = time.time):
        self.config = config
        self.clock = clock
        self._keys: dict[str, tuple[DkimKey, ...]] = {}
        self._parsed: dict[tuple[str, str, bytes], DkimKey] = {}
        self._unsigned_logged: set[str] = set()
        self.signed = 0

    def load(self, rows: list[tuple[str, str, str, bytes]]) -> None:
        """ROWS: (domain, selector, algorithm, private PEM), RSA before Ed25519 per domain."""
        parsed: dict[tuple[str, str, bytes], DkimKey] = {}
        table: dict[str, list[DkimKey]] = {}
        for domain, selector, _algorithm, pem in rows:
            key = self._parsed.get((domain, selector, pem))
            if key is None:
                try:
                    key = DkimKey.from_pem(domain, selector, pem)
                except ValueError as exc:
                    log.error("event=dkim_key_unusable domain=%s selector=%s error=%r", domain, selector, str(exc))
                    continue
            parsed[(domain, selector, pem)] = key
            table.setdefault(domain, []).append(key)
        self._parsed = parsed
        self._keys = {d: tuple(k) for d, k in table.items()}
        self._unsigned_logged.clear()

    def keys_for(self, domain: str) -> tuple[DkimKey, ...]:
        return self._keys.get(domain, ())

    def __call__(self, message: bytes, domain: str) -> bytes:
        """MESSAGE signed with DOMAIN's active keys (runs in a worker thread)."""
        keys = self._keys.get(domain)
        if not keys:
            if domain not in self._unsigned_logged:
                self._unsigned_logged.add(domain)
                log.warning("event=dkim_unsigned domain=%s reason=no_active_key", domain)
            return message
        expire = int(self.config.expire_after) or None
        try:
            signed = sign(message, keys, timestamp=int(self.clock()), expire_after=expire)
        except DkimError as exc:  # intake already requires a From: field; anything else is sent unsigned
            log.warning("event=dkim_unsigned domain=%s reason=%r", domain, str(exc))
            return message
        self.signed += 1
        return signed
