"""Progress timers for writes to a peer that may stop reading; never writes or reads itself.

A wait for a peer to take what was written (a drain) gets a timeout measured as progress, like
Postfix's smtpd_timeout for a reply or smtp_data_xfer_timeout: the transport's write buffer must
shrink (or empty) within TIMEOUT_S of the last time it did, however long the whole write takes.
When it does not, the connection is reset: SO_LINGER 0 makes the kernel drop what it still holds
for the peer and send an RST (a plain close would keep the unsent bytes, and the socket, for as
long as the peer keeps its window shut), the transport is aborted, and ON_EXPIRE is told once.

Used by smtp/ (replies, [smtp] write_timeout) and api/ (responses, [api] write_timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

#: checks per timeout: a stall is caught between TIMEOUT_S and TIMEOUT_S x (1 + 1/CHECKS) after it began
CHECKS = 4
_LINGER_RESET = struct.pack("ii", 1, 0)


def reset(transport: Any) -> None:
    """End TRANSPORT's connection at once with an RST, dropping what is buffered for the peer."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


class Watch:
    """Resets TRANSPORT when its write buffer has not shrunk for TIMEOUT_S, until cancelled;
    ON_EXPIRE(seconds stalled, bytes still buffered) is called after the reset. One timer, re-armed
    every TIMEOUT_S / CHECKS; an empty buffer counts as progress."""

    def __init__(self, transport: Any, timeout_s: float, on_expire: Callable[[float, int], None]):
        self.loop = asyncio.get_running_loop()
        self.transport = transport
        self.timeout_s = timeout_s
        self.on_expire = on_expire
        self.size = transport.get_write_buffer_size()
        self.progress_at = self.loop.time()
        self.handle: asyncio.TimerHandle | None = self.loop.call_later(timeout_s / CHECKS, self._check)

    def _check(self) -> None:
        self.handle = None
        transport = self.transport
        now = self.loop.time()
        size = transport.get_write_buffer_size()
        if size < self.size or size == 0:
            self.progress_at = now
        self.size = size
        stalled_s = now - self.progress_at
        if stalled_s >= self.timeout_s * (1 - 1e-3):  # a timer may fire a hair early
            reset(transport)
            self.on_expire(stalled_s, size)
            return
        self.handle = self.loop.call_later(self.timeout_s / CHECKS, self._check)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


@contextlib.contextmanager
def write_deadline(transport: Any, timeout_s: float, on_expire: Callable[[float, int], None]) -> Iterator[None]:
    """Inside the block, reset TRANSPORT when its write buffer has not shrunk for TIMEOUT_S;
    ON_EXPIRE(seconds stalled, bytes still buffered) is called after the reset. The wait in the
    block then ends, normally (asyncio streams, aiohttp) or with a ConnectionError."""
    watch = Watch(transport, timeout_s, on_expire)
    try:
        yield
    finally:
        watch.cancel()
