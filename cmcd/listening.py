"""Listening sockets a supervisor binds once and hands to its workers; never accepts a connection.

With [server] workers = N, the supervisor binds every SMTP and API address N times with
SO_REUSEPORT (so the kernel spreads new connections over the workers' sockets) and keeps them
open, so an address named with port 0 gets one port for all workers and a restarted worker takes
over the very socket its predecessor had (connections that queued meanwhile are not refused).
Worker K inherits its sockets as descriptors named in the environment (LISTEN_ENV, JSON
{"KIND ADDRESS": fd}); a listener finds its socket with `Inherited.take(kind, address)` and binds
on its own when there is none (workers = 1).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable

from cmcd.config_sections import split_hostport

LISTEN_ENV = "CMCD_LISTEN_FDS"


def key(kind: str, address: str) -> str:
    return f"{kind} {address}"


def bind_shared(address: str, copies: int, backlog: int) -> list[socket.socket]:
    """COPIES listening sockets on ADDRESS ("host:port", "[v6]:port"), all on one port with
    SO_REUSEPORT (port 0: the port the first one got)."""
    host, port = split_hostport(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    out: list[socket.socket] = []
    try:
        for _ in range(copies):
            sock = socket.socket(family, socket.SOCK_STREAM)
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            sock.listen(backlog)
    except OSError:
        for sock in out:
            sock.close()
        raise
    return out


def bound_name(sock: socket.socket) -> str:
    name = sock.getsockname()
    return f"[{name[0]}]:{name[1]}" if ":" in name[0] else f"{name[0]}:{name[1]}"


def environment(sockets: dict[str, socket.socket]) -> str:
    """LISTEN_ENV's value for a worker that inherits SOCKETS (key -> socket)."""
    return json.dumps({k: s.fileno() for k, s in sockets.items()})


class Inherited:
    """The listening sockets this process inherited (none unless it is a worker)."""

    def __init__(self, value: str | None = None):
        raw = json.loads(value if value is not None else os.environ.get(LISTEN_ENV, "") or "{}")
        self._fds: dict[str, int] = {str(k): int(v) for k, v in raw.items()}

    def take(self, kind: str, address: str) -> socket.socket | None:
        fd = self._fds.pop(key(kind, address), None)
        if fd is None:
            return None
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        return sock

    def keys(self) -> Iterable[str]:
        return self._fds.keys()
