"""A misbehaving SMTP server on loopback for fault tests: it greets and answers like an MX, then
does one wrong thing on cue (a 421 or a garbled line right after EHLO, a 421 at MAIL, a reader
that stops or trickles during DATA, a relay that hands every message back to another server).

Plain threads and blocking sockets, one thread a connection: the server must be able to stop
reading on purpose, which an asyncio server makes awkward. Every socket has a timeout, and
stop() ends every session, so no test can leave a thread behind.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Self

from tests.peers import check_loopback, hostport

#: what the server does wrong
MODES = (
    "ehlo_then_421",  # 250 to EHLO, then 421 and a close before MAIL
    "ehlo_then_garbage",  # 250 to EHLO, then a line that is not SMTP
    "421_at_mail",  # a 421 in reply to MAIL, then a close
    "stall_in_data",  # 354, then never reads again
    "trickle_in_data",  # 354, then reads a few bytes a second
    "relay",  # takes the message and passes it to .forward() before its reply (which it returns)
)


class BadMx:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        mode: str,
        forward: Callable[[str, list[str], bytes], str] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.host = check_loopback(host)
        self.port = port
        self.mode = mode
        self.forward = forward
        self.connect_times: list[float] = []  # time.monotonic() of each accepted connection
        self.stalled = threading.Event()  # a session stopped reading in DATA
        self.messages = 0
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        return hostport(self.host, self.port)

    @property
    def connections(self) -> int:
        return len(self.connect_times)

    def connections_between(self, start: float, end: float) -> int:
        return sum(1 for t in list(self.connect_times) if start <= t < end)

    def start(self) -> Self:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.mode in ("stall_in_data", "trickle_in_data"):
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited: the client's writes fill fast
        listener.bind((self.host, self.port))
        listener.listen(512)
        listener.settimeout(0.2)
        self._listener = listener
        self.port = listener.getsockname()[1]
        thread = threading.Thread(target=self._accept, name=f"badmx-{self.port}", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connect_times.append(time.monotonic())
            with self._lock:
                self._conns.append(conn)
            thread = threading.Thread(target=self._session, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _session(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            with conn, conn.makefile("rb") as lines:
                conn.sendall(b"220 mx.bad.test ESMTP\r\n")
                sender, rcpts = "", []
                for line in lines:
                    verb = line[:4].upper()
                    if verb in (b"EHLO", b"HELO"):
                        ehlo = b"250-mx.bad.test\r\n250 SIZE 100000000\r\n"
                        # the wrong thing comes in the same segment as the EHLO reply: the client has
                        # it before it sends MAIL (the case that made cmcd reconnect in a loop)
                        if self.mode == "ehlo_then_421":
                            conn.sendall(ehlo + b"421 4.3.2 mx.bad.test shutting down for maintenance\r\n")
                            return
                        if self.mode == "ehlo_then_garbage":
                            conn.sendall(ehlo + b"\x00\x01 this is not SMTP\r\n")
                            lines.read()  # until the client closes
                            return
                        conn.sendall(ehlo)
                    elif verb == b"MAIL":
                        if self.mode == "421_at_mail":
                            conn.sendall(b"421 4.7.0 mx.bad.test too many connections from your network\r\n")
                            return
                        sender = line.decode().split(":", 1)[1].strip().split(">")[0].lstrip("<")
                        rcpts = []
                        conn.sendall(b"250 2.1.0 ok\r\n")
                    elif verb == b"RCPT":
                        rcpts.append(line.decode().split(":", 1)[1].strip().split(">")[0].lstrip("<"))
                        conn.sendall(b"250 2.1.5 ok\r\n")
                    elif verb == b"DATA":
                        conn.sendall(b"354 go ahead\r\n")
                        if self.mode == "stall_in_data":
                            self.stalled.set()
                            self._stop.wait(120)  # never reads again
                            return
                        if self.mode == "trickle_in_data":
                            self.stalled.set()
                            while not self._stop.wait(0.5):
                                if not conn.recv(2):
                                    return
                            return
                        body = bytearray()
                        for body_line in lines:
                            if body_line == b".\r\n":
                                break
                            body += body_line[1:] if body_line.startswith(b"..") else body_line
                        self.messages += 1
                        reply = "250 2.0.0 ok"
                        if self.forward is not None:
                            reply = self.forward(sender, rcpts, bytes(body))
                        conn.sendall(reply.encode() + b"\r\n")
                    elif verb == b"QUIT":
                        conn.sendall(b"221 2.0.0 bye\r\n")
                        return
                    else:
                        conn.sendall(b"250 2.0.0 ok\r\n")
        except OSError:
            return
        finally:
            with self._lock:
                if conn in self._conns:
                    self._conns.remove(conn)

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for thread in self._threads:
            thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
