"""The one client of the admin socket, for cmcctl, the tests and the benches: connect (with a
timer), send one request, read one reply or a stream of rows, every read and write with a timer.
Blocking; never retries, never interprets a result.

The protocol (cmcd/admin/server.py): one JSON object a line. A request is {"verb", "args"}; a
reply is {"ok": true, "result": ...} or {"ok": false, "error": "..."}; a streamed result is
{"ok": true, "stream": true}, one row a line, then {"end": true, "rows": N} (with "error" when
the listing broke off).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

#: seconds to connect (a live daemon accepts at once; a full backlog is a daemon in trouble)
CONNECT_TIMEOUT_S = 10.0
#: seconds any one read or write may wait (password hashing and large queue listings take a moment)
REPLY_TIMEOUT_S = 120.0


class AdminClientError(Exception):
    """The request got no usable answer: the socket cannot be reached, the reply did not come or
    was not the protocol's. The message says which and what to check."""


class RequestRefused(AdminClientError):
    """cmcd answered and refused the request; the message is cmcd's, as it gave it."""


class AdminClient:
    def __init__(
        self,
        socket_path: str | Path,
        *,
        timeout_s: float = REPLY_TIMEOUT_S,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ):
        self.socket_path = str(socket_path)
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s

    def call(self, verb: str, **args: Any) -> Any:
        """Send VERB with ARGS (as given) and return its result; RequestRefused with cmcd's message."""
        with self._send(verb, args) as sock, sock.makefile("rb") as replies:
            line = self._readline(replies)
        if not line:
            raise AdminClientError("cmcd closed the connection without replying; see the daemon log")
        reply = self._decode(line)
        if not reply.get("ok"):
            raise RequestRefused(str(reply.get("error") or "request refused (no reason given)"))
        return reply.get("result")

    def stream(self, verb: str, **args: Any) -> Iterator[dict[str, Any]]:
        """The rows of a streamed result as they arrive; RequestRefused on refusal or an error
        at the end, AdminClientError when the stream breaks off."""
        with self._send(verb, args) as sock, sock.makefile("rb") as lines:
            head = self._decode(self._readline(lines) or b"{}")
            if not head.get("ok"):
                if "error" in head:
                    raise RequestRefused(str(head["error"]))
                raise AdminClientError("cmcd closed the connection without replying; see the daemon log")
            while line := self._readline(lines):
                row = self._decode(line)
                if row.get("end") is True and set(row) <= {"end", "rows", "error"}:
                    if row.get("error"):
                        raise RequestRefused(str(row["error"]))
                    return
                yield row
        raise AdminClientError("the listing was cut off before its end; see the daemon log")

    def _send(self, verb: str, args: dict[str, Any]) -> socket.socket:
        """A connected socket that has sent one request."""
        request = json.dumps({"verb": verb, "args": args}).encode("utf-8") + b"\n"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.connect_timeout_s)
            sock.connect(self.socket_path)
            sock.settimeout(self.timeout_s)
            sock.sendall(request)
        except TimeoutError:
            sock.close()
            raise AdminClientError(
                f"cmcd at {self.socket_path} did not take the request within {self.connect_timeout_s:.0f}s"
            ) from None
        except OSError as exc:
            sock.close()
            raise AdminClientError(
                f"cannot reach cmcd at {self.socket_path}: {exc.strerror or exc} (is the daemon running?)"
            ) from None
        return sock

    def _readline(self, replies: BinaryIO) -> bytes:
        try:
            return replies.readline()
        except TimeoutError:
            raise AdminClientError(f"no reply from cmcd at {self.socket_path} within {self.timeout_s:.0f}s") from None
        except OSError as exc:
            raise AdminClientError(f"lost the connection to cmcd at {self.socket_path}: {exc}") from None

    @staticmethod
    def _decode(line: bytes) -> dict[str, Any]:
        try:
            reply = json.loads(line)
        except ValueError:
            raise AdminClientError("cmcd sent a reply that is not JSON; is the socket path right?") from None
        if not isinstance(reply, dict):
            raise AdminClientError("cmcd sent a reply that is not a JSON object; is the socket path right?")
        return reply
