"""Queue ids: unique, sortable by time, safe as file names, naming the spool shard that holds the
message; never reads shared state but its own counter.

An id is 17 symbols: 11 of microseconds since the epoch, 2 naming the shard, 4 of a per-process
random-start counter. The shard's two symbols are 16 * 31 + shard, so their first symbol is in the
upper half of the alphabet; ids written before shards existed had the counter there, whose first
symbol started in the lower half (a random start below half the range): those belong to shard 0,
the spool every older process used.
"""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZ"  # 31 symbols: no vowels (no words), no ambiguous I/O/U
_BASE = len(_ALPHABET)
_INDEX = {c: i for i, c in enumerate(_ALPHABET)}
_SHARD_BASE = 16 * _BASE  # the shard field's first symbol is 16 or more: not an older id's counter
MAX_SHARDS = _BASE * _BASE - _SHARD_BASE  # 465
LENGTH = 17


def _encode(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, _BASE)
        out.append(_ALPHABET[r])
    return "".join(reversed(out))


def shard_of(queue_id: str) -> int | None:
    """The shard a queue id names (0 for an id older than shards); None for text that is no queue id."""
    if len(queue_id) != LENGTH or any(c not in _INDEX for c in queue_id):
        return None
    field = _INDEX[queue_id[11]] * _BASE + _INDEX[queue_id[12]]
    return field - _SHARD_BASE if field >= _SHARD_BASE else 0


class QueueIdGenerator:
    """Ids of one shard: strictly increasing within a process; across processes unique by the
    shard and the random counter start, and sorted by time to the microsecond."""

    def __init__(self, shard: int = 0) -> None:
        if not 0 <= shard < MAX_SHARDS:
            raise ValueError(f"shard {shard} is outside 0..{MAX_SHARDS - 1}")
        self._shard = _encode(_SHARD_BASE + shard, 2)
        self._lock = threading.Lock()
        self._last_us = 0
        self._seq = int.from_bytes(os.urandom(4), "big") % (_BASE**4 // 2)

    def next(self, now_s: float | None = None) -> str:
        us = int((time.time() if now_s is None else now_s) * 1_000_000)
        with self._lock:
            if us <= self._last_us:
                us = self._last_us
            self._seq += 1
            if self._seq == _BASE**4:  # the counter wraps: the next microsecond keeps ids increasing
                self._seq = 0
                us += 1
            self._last_us = us
            seq = self._seq
        return _encode(us, 11) + self._shard + _encode(seq, 4)
