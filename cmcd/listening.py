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


def bind_shared(address: str, copies: int, backlog: int) -> list[list[socket.socket]]:
    """COPIES sets of listening sockets on ADDRESS ("host:port", "[v6]:port"; a host name binds
    every address it resolves to, as asyncio does), all on one port with SO_REUSEPORT (port 0: the
    port the first one got). Set K is worker K's."""
    host, port = split_hostport(address)
    resolved = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    families = list(dict.fromkeys((family, sockaddr[0]) for family, _, _, _, sockaddr in resolved))
    out: list[list[socket.socket]] = [[] for _ in range(copies)]
    try:
        for family, ip in families:
            for k in range(copies):
                sock = socket.socket(family, socket.SOCK_STREAM)
                out[k].append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((ip, port))
                port = sock.getsockname()[1]
                sock.listen(backlog)
    except OSError:
        for socks in out:
            for sock in socks:
                sock.close()
        raise
    return out


def bound_name(sock: socket.socket) -> str:
    name = sock.getsockname()
    return f"[{name[0]}]:{name[1]}" if ":" in name[0] else f"{name[0]}:{name[1]}"


def environment(sockets: dict[str, list[socket.socket]]) -> str:
    """LISTEN_ENV's value for a worker that inherits SOCKETS (key -> its sockets)."""
    return json.dumps({k: [s.fileno() for s in socks] for k, socks in sockets.items()})


class Inherited:
    """The listening sockets this process inherited (none unless it is a worker)."""

    def __init__(self, value: str | None = None):
        raw = json.loads(value if value is not None else os.environ.get(LISTEN_ENV, "") or "{}")
        self._fds: dict[str, list[int]] = {str(k): [int(fd) for fd in v] for k, v in raw.items()}

    def take(self, kind: str, address: str) -> list[socket.socket]:
        """The sockets bound for KIND on ADDRESS (none: bind them yourself)."""
        out = []
        for fd in self._fds.pop(key(kind, address), []):
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            out.append(sock)
        return out

    def keys(self) -> Iterable[str]:
        return self._fds.keys()
