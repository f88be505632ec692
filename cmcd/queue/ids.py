"""Queue ids: unique, sortable by time, safe as file names; never reads shared state but its own counter."""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZ"  # 31 symbols: no vowels (no words), no ambiguous I/O/U
_BASE = len(_ALPHABET)


def _encode(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, _BASE)
        out.append(_ALPHABET[r])
    return "".join(reversed(out))


class QueueIdGenerator:
    """11 symbols of microseconds since the epoch, then 6 of a per-process random-start counter.

    Ids from one process are strictly increasing; across processes they stay unique by the
    random counter start and sort by time to the microsecond.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_us = 0
        self._seq = int.from_bytes(os.urandom(4), "big") % (_BASE**6 // 2)

    def next(self, now_s: float | None = None) -> str:
        us = int((time.time() if now_s is None else now_s) * 1_000_000)
        with self._lock:
            if us <= self._last_us:
                us = self._last_us
            self._last_us = us
            self._seq = (self._seq + 1) % (_BASE**6)
            seq = self._seq
        return _encode(us, 11) + _encode(seq, 6)
