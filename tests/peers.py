"""Real peers for delivery tests, all on loopback: a scriptable DNS server and SMTP sink (in-process), a
silent TCP server, and Debian's smtp-sink, Postfix and nsd as subprocesses.

Nothing here binds anything but 127.0.0.x or ::1, and nothing asks the machine's resolver: the in-process
peers pass explicit host names to aiosmtpd (whose default would call socket.getfqdn()), and Postfix is
configured with DNS and reverse lookups off and an error transport for everything it does not hold itself.
Peers that need a Debian program call tests.conftest.need() first (skip, or fail under CMCD_REQUIRE_PEERS=1).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import json
import os
import re
import selectors
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.conftest import need

# -- helpers ---------------------------------------------------------------------------------------


def check_loopback(host: str) -> str:
    """HOST itself if it is a loopback IP literal (127.0.0.0/8 or ::1); ValueError otherwise."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP literal; peers bind loopback addresses only") from None
    if not ip.is_loopback:
        raise ValueError(f"{host!r} is not a loopback address; peers bind loopback addresses only")
    return host


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def hostport(host: str, port: int) -> str:
    """'127.0.0.1:53' or '[::1]:53'."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def free_port(host: str = "127.0.0.1", *, udp_too: bool = False) -> int:
    """A TCP port (and, with udp_too, the same UDP port) that is free on HOST right now."""
    check_loopback(host)
    for _ in range(50):
        with socket.socket(_family(host), socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port: int = s.getsockname()[1]
        if not udp_too:
            return port
        try:
            with socket.socket(_family(host), socket.SOCK_DGRAM) as u:
                u.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no free port on {host}")


def closed_port(host: str = "127.0.0.1") -> int:
    """A port on HOST with nothing listening: connecting to it is refused."""
    return free_port(host)


def wait_port(host: str, port: int, timeout: float = 10.0, proc: subprocess.Popen[Any] | None = None) -> None:
    """Block until something accepts TCP connections on HOST:PORT (or PROC exits, or TIMEOUT passes)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with status {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {hostport(host, port)} after {timeout}s") from None
            time.sleep(0.02)


def txt_rdata(value: str) -> str:
    """TXT rdata text for VALUE: kept as is when already quoted, else split into quoted strings of <= 255 bytes
    (a DKIM key is longer than one TXT string may be)."""
    if value.startswith('"'):
        return value
    raw = value.encode()
    chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
    quoted = []
    for chunk in chunks:
        text = chunk.decode("utf-8", "surrogateescape").replace("\\", "\\\\").replace('"', '\\"')
        quoted.append(f'"{text}"')
    return " ".join(quoted)


def _absolute(name: str | dns.name.Name) -> dns.name.Name:
    if isinstance(name, dns.name.Name):
        return name if name.is_absolute() else name.concatenate(dns.name.root)
    return dns.name.from_text(name, origin=dns.name.root)


def _rdtype(rdtype: str | int) -> dns.rdatatype.RdataType:
    return dns.rdatatype.RdataType.make(rdtype)


# -- DNS -------------------------------------------------------------------------------------------


class DnsServer:
    """An authoritative DNS server on HOST:PORT (UDP and TCP, same port) in a background thread.

    Names that hold the queried type are answered; names that exist (or have descendants) without it get
    NODATA, others NXDOMAIN, both with a synthesized SOA in the authority section. CNAMEs are followed
    within the server's data. Faults per name: servfail(), blackhole() (never answers), truncate() (TC over
    UDP, so the client retries over TCP). Every query is appended to .queries as (name, TYPE), the name
    lower-case without the final dot. All methods are thread-safe while the server runs.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, negative_ttl: int = 60) -> None:
        self.host = check_loopback(host)
        self.port = port
        self.negative_ttl = negative_ttl
        self.queries: list[tuple[str, str]] = []
        self.tcp_queries = 0
        self._lock = threading.Lock()
        self._records: dict[dns.name.Name, dict[int, dns.rrset.RRset]] = {}
        self._servfail: dict[dns.name.Name, int | None] = {}
        self._blackhole: set[dns.name.Name] = set()
        self._truncate: set[dns.name.Name] = set()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None

    # data -----------------------------------------------------------------------------------------

    def add(self, name: str, rdtype: str, *rdata: str, ttl: int = 60) -> Self:
        """Add records, e.g. add("dst.test", "MX", "10 mx1.dst.test.") or add("a.test", "A", "127.0.0.2",
        "127.0.0.3"). Names in rdata without a final dot are taken as absolute. TXT rdata that is not quoted is
        quoted (and split) for you."""
        owner = _absolute(name)
        kind = _rdtype(rdtype)
        texts = [txt_rdata(t) if kind in (dns.rdatatype.TXT, dns.rdatatype.SPF) else t for t in rdata]
        rrset = dns.rrset.from_text_list(
            owner, ttl, dns.rdataclass.IN, kind, texts, origin=dns.name.root, relativize=False
        )
        with self._lock:
            node = self._records.setdefault(owner, {})
            if kind in node:
                node[kind].update(rrset)
                node[kind].update_ttl(ttl)
            else:
                node[kind] = rrset
        return self

    def remove(self, name: str, rdtype: str | None = None) -> None:
        """Remove NAME's records of RDTYPE, or all of NAME's records."""
        owner = _absolute(name)
        with self._lock:
            node = self._records.get(owner)
            if node is None:
                return
            if rdtype is None:
                node.clear()
            else:
                node.pop(_rdtype(rdtype), None)
            if not node:
                del self._records[owner]

    def servfail(self, name: str, times: int | None = None) -> None:
        """Answer SERVFAIL for NAME (any type): the next TIMES queries, or until clear_faults() when None."""
        with self._lock:
            self._servfail[_absolute(name)] = times

    def blackhole(self, name: str) -> None:
        """Never answer queries for NAME (UDP or TCP) until clear_faults(): the client times out."""
        with self._lock:
            self._blackhole.add(_absolute(name))

    def truncate(self, name: str) -> None:
        """Answer queries for NAME over UDP with an empty, truncated (TC) response until clear_faults()."""
        with self._lock:
            self._truncate.add(_absolute(name))

    def clear_faults(self) -> None:
        with self._lock:
            self._servfail.clear()
            self._blackhole.clear()
            self._truncate.clear()

    def clear_queries(self) -> None:
        with self._lock:
            self.queries.clear()
            self.tcp_queries = 0

    def queried(self, name: str, rdtype: str | None = None) -> int:
        """How many queries for NAME (and RDTYPE) arrived."""
        key = str(_absolute(name)).rstrip(".").lower() or "."
        with self._lock:
            return sum(1 for n, t in self.queries if n == key and (rdtype is None or t == rdtype.upper()))

    @property
    def address(self) -> str:
        """'127.0.0.1:PORT', as cmcd's [dns] nameservers setting spells it."""
        return hostport(self.host, self.port)

    def resolver(self, *, lifetime: float = 2.0) -> dns.asyncresolver.Resolver:
        """A dnspython async resolver that asks this server only."""
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [self.host]
        resolver.port = self.port
        resolver.lifetime = lifetime
        resolver.timeout = lifetime
        return resolver

    # answering ------------------------------------------------------------------------------------

    def _soa(self, name: dns.name.Name) -> dns.rrset.RRset:
        for depth in range(len(name), 0, -1):
            ancestor = dns.name.Name(name.labels[-depth:])
            node = self._records.get(ancestor)
            if node and dns.rdatatype.SOA in node:
                return node[dns.rdatatype.SOA]
        zone = dns.name.Name(name.labels[-3:]) if len(name) > 3 else name
        text = f"ns.{zone} hostmaster.{zone} 1 3600 600 86400 {self.negative_ttl}"
        return dns.rrset.from_text(zone, self.negative_ttl, dns.rdataclass.IN, dns.rdatatype.SOA, text)

    def _exists(self, name: dns.name.Name) -> bool:
        return name in self._records or any(owner.is_subdomain(name) for owner in self._records)

    def _resolve(self, query: dns.message.Message, tcp: bool) -> dns.message.Message | None:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        response.flags &= ~dns.flags.RA
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            response.set_rcode(dns.rcode.NOTIMP if query.opcode() != dns.opcode.QUERY else dns.rcode.FORMERR)
            return response
        qname, qtype = query.question[0].name, query.question[0].rdtype
        with self._lock:
            self.queries.append((str(qname).rstrip(".").lower() or ".", dns.rdatatype.to_text(qtype)))
            self.tcp_queries += tcp
            if qname in self._blackhole:
                return None
            if qname in self._servfail:
                left = self._servfail[qname]
                if left is not None:
                    if left <= 1:
                        del self._servfail[qname]
                    else:
                        self._servfail[qname] = left - 1
                response.set_rcode(dns.rcode.SERVFAIL)
                return response
            if qname in self._truncate and not tcp:
                response.flags |= dns.flags.TC
                return response
            name = qname
            for _ in range(16):
                node = self._records.get(name, {})
                if qtype == dns.rdatatype.ANY and node:
                    response.answer.extend(node.values())
                    break
                if qtype in node:
                    response.answer.append(node[qtype])
                    break
                cname = node.get(dns.rdatatype.CNAME)
                if cname is not None:
                    response.answer.append(cname)
                    name = cname[0].target
                    continue
                if not self._exists(name):
                    response.set_rcode(dns.rcode.NXDOMAIN)
                response.authority.append(self._soa(name))
                break
        return response

    def _answer(self, wire: bytes, tcp: bool) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        response = self._resolve(query, tcp)
        if response is None:
            return None
        limit = 65535 if tcp else max(512, query.payload if query.edns >= 0 else 512)
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            short = dns.message.make_response(query)
            short.flags |= dns.flags.AA | dns.flags.TC
            return short.to_wire(max_size=limit)

    # serving --------------------------------------------------------------------------------------

    def start(self) -> Self:
        family = _family(self.host)
        for _ in range(20):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            tcp = socket.socket(family, socket.SOCK_STREAM)
            try:
                udp.bind((self.host, self.port))
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((self.host, udp.getsockname()[1]))
            except OSError as e:
                udp.close()
                tcp.close()
                if self.port or e.errno != errno.EADDRINUSE:
                    raise
                continue
            break
        else:
            raise RuntimeError(f"no port free for both UDP and TCP on {self.host}")
        tcp.listen(64)
        udp.setblocking(False)
        tcp.setblocking(False)
        self._udp, self._tcp = udp, tcp
        self.port = udp.getsockname()[1]
        self._wake = socket.socketpair()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name=f"dns-{self.port}", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        assert self._udp is not None and self._tcp is not None and self._wake is not None
        buffers: dict[socket.socket, bytearray] = {}
        with selectors.DefaultSelector() as sel:
            sel.register(self._udp, selectors.EVENT_READ, "udp")
            sel.register(self._tcp, selectors.EVENT_READ, "accept")
            sel.register(self._wake[0], selectors.EVENT_READ, "wake")
            try:
                while not self._stopping:
                    for key, _ in sel.select():
                        sock = key.fileobj
                        assert isinstance(sock, socket.socket)
                        if key.data == "udp":
                            try:
                                wire, peer = sock.recvfrom(65535)
                            except OSError:
                                continue
                            reply = self._answer(wire, tcp=False)
                            if reply is not None:
                                with contextlib.suppress(OSError):
                                    sock.sendto(reply, peer)
                        elif key.data == "accept":
                            try:
                                conn, _ = sock.accept()
                            except OSError:
                                continue
                            conn.settimeout(5)
                            buffers[conn] = bytearray()
                            sel.register(conn, selectors.EVENT_READ, "tcp")
                        elif key.data == "tcp":
                            if not self._tcp_readable(sock, buffers[sock]):
                                sel.unregister(sock)
                                del buffers[sock]
                                sock.close()
            finally:
                for conn in buffers:
                    conn.close()

    def _tcp_readable(self, conn: socket.socket, buffer: bytearray) -> bool:
        try:
            chunk = conn.recv(65535)
        except OSError:
            return False
        if not chunk:
            return False
        buffer += chunk
        while len(buffer) >= 2 and len(buffer) >= 2 + int.from_bytes(buffer[:2], "big"):
            size = int.from_bytes(buffer[:2], "big")
            wire = bytes(buffer[2 : 2 + size])
            del buffer[: 2 + size]
            reply = self._answer(wire, tcp=True)
            if reply is not None:
                try:
                    conn.sendall(len(reply).to_bytes(2, "big") + reply)
                except OSError:
                    return False
        return True

    def stop(self) -> None:
        if self._thread is None:
            return
        assert self._wake is not None
        self._stopping = True
        self._wake[1].send(b"x")
        self._thread.join(10)
        self._thread = None
        for sock in (self._udp, self._tcp, *self._wake):
            if sock is not None:
                sock.close()
        self._udp = self._tcp = self._wake = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- SMTP sink (aiosmtpd) --------------------------------------------------------------------------


@dataclass
class Received:
    """One message a Sink accepted."""

    mail_from: str  # "" for the null reverse-path
    rcpt_tos: list[str]
    data: bytes  # exactly as received, after un-dot-stuffing
    tls: bool  # the session had done STARTTLS
    peer: Any  # (host, port) of the client
    helo: str | None = None
    mail_options: list[str] = field(default_factory=list)
    rcpt_options: list[str] = field(default_factory=list)
    smtputf8: bool = False


class _SinkProtocol(SMTP):
    def __init__(self, sink: Sink, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._sink = sink
        self._raw_transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None  # connection_made runs again after STARTTLS, on the TLS transport
        super().connection_made(transport)
        if first:
            assert isinstance(transport, asyncio.Transport)
            self._raw_transport = transport
            self._sink._opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        try:
            super().connection_lost(error)
        finally:
            self._sink._closed(self)

    def abort(self) -> None:
        if self._raw_transport is not None:
            self._raw_transport.abort()


class _SinkHandler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        sink = self.sink
        with sink._lock:
            sink.transactions += 1
        # aiosmtpd keeps the null reverse-path as "<>" (and needs it truthy); scripts and Received see ""
        reply = sink.mail_reply("" if address == "<>" else address) if sink.mail_reply else None
        if reply:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.sink.rcpt_reply(address) if self.sink.rcpt_reply else None
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        sink = self.sink
        if sink.data_delay:
            await asyncio.sleep(sink.data_delay)
        with sink._lock:
            reply = sink.data_replies.pop(0) if sink.data_replies else None
        if reply is not None and not reply.startswith("2"):
            return reply
        content = envelope.original_content if envelope.original_content is not None else envelope.content
        data = content if isinstance(content, bytes) else (content or "").encode("utf-8", "surrogateescape")
        message = Received(
            mail_from="" if envelope.mail_from in (None, "<>") else str(envelope.mail_from),
            rcpt_tos=list(envelope.rcpt_tos),
            data=data,
            tls=session.ssl is not None,
            peer=session.peer,
            helo=session.host_name,
            mail_options=list(envelope.mail_options),
            rcpt_options=list(envelope.rcpt_options),
            smtputf8=envelope.smtp_utf8,
        )
        with sink._cond:
            sink.messages.append(message)
            number = len(sink.messages)
            sink._cond.notify_all()
        return reply or f"250 2.0.0 OK queued as SINK{number}"


class Sink:
    """An SMTP server (aiosmtpd, in its own event loop thread) that records what it accepts.

    Script it with: rcpt_reply(address) -> reply or None (accept), mail_reply likewise, data_replies (replies
    to DATA taken in order, then the default 250; a 2xx entry still records the message), data_delay (seconds
    before answering DATA), tls_context (offers STARTTLS), require_tls (refuse commands before STARTTLS).
    Extra keyword arguments go to aiosmtpd's SMTP (e.g. data_size_limit, timeout).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        rcpt_reply: Callable[[str], str | None] | None = None,
        mail_reply: Callable[[str], str | None] | None = None,
        data_replies: Iterable[str] = (),
        data_delay: float = 0.0,
        tls_context: ssl.SSLContext | None = None,
        require_tls: bool = False,
        hostname: str = "sink.test",
        smtputf8: bool = True,
        **smtp_kwargs: Any,
    ) -> None:
        if require_tls and tls_context is None:
            raise ValueError("require_tls needs a tls_context")
        self.host = check_loopback(host)
        self.port = port
        self.rcpt_reply = rcpt_reply
        self.mail_reply = mail_reply
        self.data_replies = list(data_replies)
        self.data_delay = data_delay
        self.tls_context = tls_context
        self.require_tls = require_tls
        self.hostname = hostname
        self.smtputf8 = smtputf8
        self.smtp_kwargs = smtp_kwargs
        self.messages: list[Received] = []
        self.connections = 0  # connections accepted so far
        self.active = 0  # connections open now
        self.peak = 0  # the most connections open at once
        self.transactions = 0  # MAIL commands seen
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._protocols: set[_SinkProtocol] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None

    def _opened(self, protocol: _SinkProtocol) -> None:
        self._protocols.add(protocol)
        with self._lock:
            self.connections += 1
            self.active += 1
            self.peak = max(self.peak, self.active)

    def _closed(self, protocol: _SinkProtocol) -> None:
        if protocol in self._protocols:
            self._protocols.discard(protocol)
            with self._lock:
                self.active -= 1

    def _protocol(self) -> _SinkProtocol:
        return _SinkProtocol(
            self,
            _SinkHandler(self),
            hostname=self.hostname,
            ident="cmcd test sink",
            decode_data=False,
            enable_SMTPUTF8=self.smtputf8,
            tls_context=self.tls_context,
            require_starttls=self.require_tls,
            loop=self._loop,
            **self.smtp_kwargs,
        )

    @property
    def address(self) -> str:
        return hostport(self.host, self.port)

    def start(self) -> Self:
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, args=(loop,), name=f"sink-{self.host}", daemon=True)
        self._thread.start()
        try:
            self._server = asyncio.run_coroutine_threadsafe(self._open(), loop).result(10)
        except BaseException:
            self.stop()
            raise
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _open(self) -> asyncio.Server:
        assert self._loop is not None
        return await self._loop.create_server(self._protocol, self.host, self.port, reuse_address=True)

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for protocol in list(self._protocols):
            protocol.abort()
        deadline = time.monotonic() + 5
        while self._protocols and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._server is not None:
            await self._server.wait_closed()

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._loop = self._thread = self._server = None

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Received]:
        """Block until at least N messages were accepted; the messages so far. TimeoutError otherwise."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.messages) >= n, timeout):
                raise TimeoutError(f"sink {self.address}: {len(self.messages)} messages after {timeout}s, not {n}")
            return list(self.messages)

    async def wait_for_async(self, n: int, timeout: float = 10.0) -> list[Received]:
        """wait_for() for async tests: waits in a worker thread, so the test's event loop keeps running."""
        return await asyncio.to_thread(self.wait_for, n, timeout)

    def clear(self) -> None:
        with self._lock:
            self.messages.clear()
            self.connections = self.transactions = 0

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- silent TCP server -----------------------------------------------------------------------------


class BlackHole:
    """A TCP server that accepts connections and never answers (after GREETING, if given): for timeouts.
    What clients send is read and discarded; .connections counts accepted connections."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, greeting: bytes = b"") -> None:
        self.host = check_loopback(host)
        self.port = port
        self.greeting = greeting
        self.connections = 0
        self.received = 0  # bytes
        self._listener: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def address(self) -> str:
        return hostport(self.host, self.port)

    def start(self) -> Self:
        listener = socket.socket(_family(self.host), socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self.host, self.port))
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._wake = socket.socketpair()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name=f"blackhole-{self.port}", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        assert self._listener is not None and self._wake is not None
        conns: list[socket.socket] = []
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ, None)
            sel.register(self._wake[0], selectors.EVENT_READ, None)
            try:
                while not self._stopping:
                    for key, _ in sel.select():
                        sock = key.fileobj
                        assert isinstance(sock, socket.socket)
                        if sock is self._listener:
                            try:
                                conn, _ = sock.accept()
                            except OSError:
                                continue
                            self.connections += 1
                            conns.append(conn)
                            if self.greeting:
                                with contextlib.suppress(OSError):
                                    conn.sendall(self.greeting)
                            conn.setblocking(False)
                            sel.register(conn, selectors.EVENT_READ, None)
                        elif sock is not self._wake[0]:
                            try:
                                chunk = sock.recv(65536)
                            except OSError:
                                chunk = b""
                            self.received += len(chunk)
                            if not chunk:
                                sel.unregister(sock)
                                conns.remove(sock)
                                sock.close()
            finally:
                for conn in conns:
                    conn.close()

    def stop(self) -> None:
        if self._thread is None:
            return
        assert self._wake is not None
        self._stopping = True
        self._wake[1].send(b"x")
        self._thread.join(10)
        self._thread = None
        for sock in (self._listener, *self._wake):
            if sock is not None:
                sock.close()
        self._listener = self._wake = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- Postfix's smtp-sink ---------------------------------------------------------------------------


class SmtpSinkProcess:
    """Postfix's smtp-sink on HOST:PORT (a free port when 0), as `smtp-sink -u nobody -c HOST:PORT BACKLOG`.

    .count is the number of messages it reports (from its -c counter). With dump=True it writes each
    message into its own directory (-d), and messages() returns those files (its headers X-Client-Addr,
    X-Mail-Args, X-Rcpt-Args..., a Received line, then the message with LF line ends)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        backlog: int = 1000,
        dump: bool = False,
        extra_args: Iterable[str] = (),
    ) -> None:
        self.host = check_loopback(host)
        self.port = port
        self.backlog = backlog
        self.dump = dump
        self.extra_args = list(extra_args)
        self.dump_dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.sessions = 0
        self.count = 0
        self._dumped: list[bytes] | None = None
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._stderr = b""

    @property
    def address(self) -> str:
        return hostport(self.host, self.port)

    def start(self, timeout: float = 10.0) -> Self:
        program = need("smtp-sink")
        if not self.port:
            self.port = free_port(self.host)
        args = [program, "-u", "nobody", "-c"]
        if self.dump:
            self.dump_dir = Path(tempfile.mkdtemp(prefix="cmcd-smtp-sink-"))
            self.dump_dir.chmod(0o777)  # smtp-sink writes as nobody
            args += ["-d", f"{self.dump_dir}/"]
        args += [*self.extra_args, hostport(self.host, self.port), str(self.backlog)]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        try:
            wait_port(self.host, self.port, timeout, self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        pending = b""
        while chunk := os.read(proc.stdout.fileno(), 4096):
            pending += chunk
            *lines, pending = re.split(rb"[\r\n]", pending)
            for line in lines:
                m = re.search(rb"sess=(\d+).*mesg=(\d+)", line)
                if m:
                    with self._cond:
                        self.sessions, self.count = int(m.group(1)), int(m.group(2))
                        self._cond.notify_all()

    def wait_for(self, n: int, timeout: float = 10.0) -> int:
        """Block until smtp-sink counted at least N messages; the count. TimeoutError otherwise."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.count >= n, timeout):
                raise TimeoutError(f"smtp-sink {self.address}: {self.count} messages after {timeout}s, not {n}")
            return self.count

    async def wait_for_async(self, n: int, timeout: float = 10.0) -> int:
        """wait_for() for async tests: waits in a worker thread, so the test's event loop keeps running."""
        return await asyncio.to_thread(self.wait_for, n, timeout)

    def messages(self) -> list[bytes]:
        """The dumped messages (dump=True), oldest first; still available after stop()."""
        if self._dumped is not None:
            return list(self._dumped)
        if self.dump_dir is None:
            raise RuntimeError("SmtpSinkProcess(dump=True) keeps messages; this one does not")
        files = sorted(self.dump_dir.iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [p.read_bytes() for p in files if p.is_file()]

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join(5)
        assert proc.stdout is not None and proc.stderr is not None
        self._stderr = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
        self.proc = None
        if self.dump_dir is not None:
            self._dumped = self.messages()
            shutil.rmtree(self.dump_dir, ignore_errors=True)
            self.dump_dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the system Postfix as a receiving MX ----------------------------------------------------------

POSTFIX_DIR = Path("/etc/postfix")
_POSTFIX_BACKUP = POSTFIX_DIR / "cmcd-peers-backup.json"
POSTFIX_LOCK = Path("/run/lock/cmcd-system-postfix.lock")
_POSTFIX_LOG = Path("/var/log/postfix.log")
_POSTFIX_PID = Path("/var/spool/postfix/pid/master.pid")


def _postfix_running() -> bool:
    """Whether the system Postfix's master runs (from its pid file: `postfix status` needs a main.cf, and every
    Postfix program that dies with a fatal error sleeps a second first)."""
    try:
        pid = int(_POSTFIX_PID.read_text().split()[0])
        return Path(f"/proc/{pid}/comm").read_text().strip() == "master"
    except (OSError, ValueError, IndexError):
        return False


def _wait_postfix_gone(timeout: float = 10.0) -> None:
    """`postfix stop` returns once the master gave up its lock, which can be a moment before it is gone."""
    deadline = time.monotonic() + timeout
    while _postfix_running():
        if time.monotonic() > deadline:
            raise RuntimeError("the system Postfix did not stop")
        time.sleep(0.02)


def _write_config(path: Path, text: str, mtime: float | None = None) -> None:
    """Write a Postfix configuration file with an mtime in the past: Postfix programs wait (in steps of
    0.3 s) while main.cf is not older than the current second."""
    tmp = path.with_name(path.name + ".cmcd-tmp")
    tmp.write_text(text)
    stamp = time.time() - 2 if mtime is None else mtime
    os.utime(tmp, (stamp, stamp))
    tmp.replace(path)


def _postfix_restore() -> None:
    """Put back main.cf and master.cf from the backup a PostfixMx took (if there is one), then drop it."""
    if not _POSTFIX_BACKUP.exists():
        return
    saved = json.loads(_POSTFIX_BACKUP.read_text())
    for name in ("main.cf", "master.cf"):
        path = POSTFIX_DIR / name
        if saved[name] is None:
            path.unlink(missing_ok=True)
        else:
            _write_config(path, saved[name]["text"], saved[name]["mtime"])
    _POSTFIX_BACKUP.unlink()


def _master_cf(original: str, listen: str) -> str:
    """ORIGINAL master.cf without comments and inet services, every chroot column set to n, and one smtpd
    on LISTEN."""
    entries: list[list[str]] = []
    for line in original.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace():
            if entries:
                entries[-1].append(line)
            continue
        entries.append([line])
    out = []
    for entry in entries:
        fields = entry[0].split()
        if len(fields) < 8 or fields[1] == "inet":
            continue
        fields[4] = "n"
        out.append(" ".join(fields))
        out.extend(entry[1:])
    out.append(f"{listen} inet n - n - - smtpd")
    return "\n".join(out) + "\n"


class PostfixMx:
    """The system Postfix as the receiving MX for DOMAINS on HOST:PORT, delivering every recipient into one
    maildir (messages land in .maildir/new). Holds a lock so that only one PostfixMx on the machine uses the
    system instance at a time, and restores /etc/postfix/main.cf and master.cf at stop() (also after a
    crashed run, at the next start). The mail queue is emptied at start and at stop.

    tls_cert/tls_key (PEM paths) make smtpd offer STARTTLS; require_tls makes it insist. settings adds or
    overrides main.cf parameters."""

    def __init__(
        self,
        domains: Iterable[str] = ("dst.test",),
        host: str = "127.0.0.2",
        port: int = 0,
        *,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        require_tls: bool = False,
        settings: Mapping[str, str] | None = None,
        lock_timeout: float = 120.0,
    ) -> None:
        self.domains = list(domains)
        self.host = check_loopback(host)
        if ":" in host:
            raise ValueError("PostfixMx listens on IPv4 loopback only (inet_protocols = ipv4)")
        self.port = port
        self.tls_cert, self.tls_key, self.require_tls = tls_cert, tls_key, require_tls
        if (tls_cert is None) != (tls_key is None) or (require_tls and tls_cert is None):
            raise ValueError("tls_cert and tls_key go together, and require_tls needs them")
        self.settings = dict(settings or {})
        self.lock_timeout = lock_timeout
        self.base: Path | None = None
        self._lock_fd: int | None = None
        self._log_offset = 0
        self._started = False

    @property
    def address(self) -> str:
        return hostport(self.host, self.port)

    @property
    def maildir(self) -> Path:
        assert self.base is not None, "not started"
        return self.base / "catchall"

    def main_cf(self, *, log_file: bool = True) -> str:
        assert self.base is not None
        error = "error:cmcd PostfixMx delivers to its own domains only"
        params = {
            "compatibility_level": "3.6",
            "myhostname": f"mx.{self.domains[0] if self.domains else 'postfix.test'}",
            "mydomain": self.domains[0] if self.domains else "postfix.test",
            "myorigin": "$myhostname",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mydestination": "",
            "mynetworks": "127.0.0.0/8",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "virtual_mailbox_domains": " ".join(self.domains),
            "virtual_mailbox_base": str(self.base),
            "virtual_mailbox_maps": "static:catchall/",
            "virtual_uid_maps": "static:65534",
            "virtual_gid_maps": "static:65534",
            "virtual_minimum_uid": "100",
            # Never ask the system resolver: no reverse lookups, no DNS, and anything not for our own
            # domains (bounces included) goes to the error transport instead of to getaddrinfo().
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "lmtp_dns_support_level": "disabled",
            "default_transport": error,
            "relay_transport": error,
            "relayhost": "",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "biff": "no",
            "maillog_file": str(_POSTFIX_LOG),
            "smtpd_banner": "$myhostname ESMTP",
            # Like an MX on the Internet: leave our clients' headers alone (no Date, Message-ID, From added,
            # no addresses rewritten), so what arrives is what was sent plus Return-Path/Delivered-To/Received.
            "local_header_rewrite_clients": "",
        }
        if self.tls_cert is not None:
            params |= {
                "smtpd_tls_cert_file": str(self.tls_cert),
                "smtpd_tls_key_file": str(self.tls_key),
                "smtpd_tls_security_level": "encrypt" if self.require_tls else "may",
                "smtpd_tls_received_header": "yes",
            }
        params |= self.settings
        if not log_file:
            del params["maillog_file"]
        return "".join(f"{k} = {v}\n" for k, v in params.items())

    def _take_lock(self) -> None:
        POSTFIX_LOCK.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(POSTFIX_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise TimeoutError(f"another PostfixMx holds {POSTFIX_LOCK}") from None
                time.sleep(0.1)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([need("postfix"), *args], capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"postfix {' '.join(args)} failed:\n{result.stdout}{result.stderr}\n{self.log()}")
        return result

    def _purge_queue(self) -> None:
        """Delete every queued message. Run it while Postfix runs, or with a main.cf without maillog_file:
        postsuper runs as the postfix user and cannot open the log file itself when postlogd does not run."""
        result = subprocess.run([need("postsuper"), "-d", "ALL"], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"postsuper -d ALL failed: {result.stderr}")

    def start(self, timeout: float = 20.0) -> Self:
        need("postfix")
        need("postsuper")
        self._take_lock()
        try:
            if _POSTFIX_BACKUP.exists():  # a PostfixMx that did not get to stop(): its Postfix, its config
                if _postfix_running():
                    subprocess.run([need("postfix"), "stop"], capture_output=True, timeout=60)
                    _wait_postfix_gone()
                old_main = POSTFIX_DIR / "main.cf"
                stale = old_main.exists() and re.search(r"^virtual_mailbox_base = (/\S+)$", old_main.read_text(), re.M)
                if stale and Path(stale.group(1)).name.startswith("cmcd-postfix-mx-"):
                    shutil.rmtree(stale.group(1), ignore_errors=True)
                _postfix_restore()
            if _postfix_running():
                raise RuntimeError("the system Postfix is already running (a benchmark?); `postfix stop` it first")
            if not self.port:
                self.port = free_port(self.host)
            self.base = Path(tempfile.mkdtemp(prefix="cmcd-postfix-mx-"))
            self.base.chmod(0o755)
            os.chown(self.base, 65534, 65534)
            main, master = POSTFIX_DIR / "main.cf", POSTFIX_DIR / "master.cf"
            backup = {
                p.name: {"text": p.read_text(), "mtime": p.stat().st_mtime} if p.exists() else None
                for p in (main, master)
            }
            master_source = master.read_text() if master.exists() else (POSTFIX_DIR / "master.cf.proto").read_text()
            _write_config(_POSTFIX_BACKUP, json.dumps(backup))
            self._started = True
            _write_config(main, self.main_cf(log_file=False))
            # On a machine where Postfix never ran, its queue directories (hold, trace, ...) do not exist
            # yet and postsuper dies on them: `postfix check` creates whatever is missing, as a first start would.
            self._postfix("check")
            self._purge_queue()  # what an earlier run left must not land in this run's maildir
            _write_config(main, self.main_cf())
            _write_config(master, _master_cf(master_source, f"{self.host}:{self.port}"))
            self._log_offset = _POSTFIX_LOG.stat().st_size if _POSTFIX_LOG.exists() else 0
            self._postfix("start")
            wait_port(self.host, self.port, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def log(self) -> str:
        """What Postfix logged since start()."""
        try:
            with _POSTFIX_LOG.open("rb") as f:
                f.seek(self._log_offset)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def messages(self) -> list[bytes]:
        """The delivered messages (with Postfix's Return-Path, Delivered-To and Received; LF line ends), oldest
        first."""
        files: list[Path] = []
        for sub in ("new", "cur"):
            d = self.maildir / sub
            if d.is_dir():
                files.extend(p for p in d.iterdir() if p.is_file())
        files.sort(key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [p.read_bytes() for p in files]

    def wait_for(self, n: int, timeout: float = 10.0) -> list[bytes]:
        """Block until at least N messages were delivered into the maildir; TimeoutError (with the log) otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages()
            if len(found) >= n:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(found)} messages in {self.maildir} after {timeout}s, not {n}:\n{self.log()}")
            time.sleep(0.05)

    async def wait_for_async(self, n: int, timeout: float = 10.0) -> list[bytes]:
        """wait_for() for async tests: waits in a worker thread, so the test's event loop keeps running."""
        return await asyncio.to_thread(self.wait_for, n, timeout)

    def queue(self) -> list[dict[str, Any]]:
        """Postfix's queue (postqueue -j), one dict per message."""
        out = subprocess.run([need("postqueue"), "-j"], capture_output=True, text=True, timeout=30).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def stop(self) -> None:
        try:
            if self._started:
                if _postfix_running():
                    with contextlib.suppress(RuntimeError):
                        self._purge_queue()  # nothing this MX queued (a bounce, say) outlives it
                    self._postfix("stop", check=False)
                    _wait_postfix_gone()
                _postfix_restore()
                self._started = False
            if self.base is not None:
                shutil.rmtree(self.base, ignore_errors=True)
                self.base = None
        finally:
            self._release_lock()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- nsd -------------------------------------------------------------------------------------------

ZoneRecord = tuple[str, str, str] | tuple[str, str, str, int]


class Nsd:
    """Debian's nsd on HOST:PORT (a free port when 0), authoritative for ZONES, run in the foreground.

    ZONES maps a zone name to records (owner, TYPE, rdata[, ttl]); owner "@", relative to the zone, or absolute
    with a final dot. SOA and NS (ns.ZONE, with an A record pointing at HOST unless given) are written for you;
    unquoted TXT rdata is quoted and split. nsd answers REFUSED for names outside its zones."""

    def __init__(
        self,
        zones: Mapping[str, Iterable[ZoneRecord]],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        directory: str | Path | None = None,
    ) -> None:
        self.zones = {zone.rstrip(".").lower(): list(records) for zone, records in zones.items()}
        self.host = check_loopback(host)
        self.port = port
        self._own_dir = directory is None
        self.directory = Path(directory) if directory is not None else None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return hostport(self.host, self.port)

    def zone_text(self, zone: str) -> str:
        lines = [
            f"$ORIGIN {zone}.",
            "$TTL 60",
            f"@ IN SOA ns.{zone}. hostmaster.{zone}. 1 3600 600 86400 60",
            f"@ IN NS ns.{zone}.",
        ]
        records = self.zones[zone]
        if not any(r[0] in ("ns", f"ns.{zone}.") for r in records):
            lines.append(f"ns IN {'AAAA' if ':' in self.host else 'A'} {self.host}")
        for record in records:
            owner, rdtype, rdata = record[0], record[1].upper(), record[2]
            ttl = f"{record[3]} " if len(record) > 3 else ""  # type: ignore[misc]
            if rdtype in ("TXT", "SPF"):
                rdata = txt_rdata(rdata)
            lines.append(f"{owner} {ttl}IN {rdtype} {rdata}")
        return "\n".join(lines) + "\n"

    def config_text(self) -> str:
        assert self.directory is not None
        d = self.directory
        v6 = ":" in self.host
        out = [
            "server:",
            f"  ip-address: {self.host}",
            f"  port: {self.port}",
            f"  do-ip4: {'no' if v6 else 'yes'}",
            f"  do-ip6: {'yes' if v6 else 'no'}",
            '  username: ""',
            '  chroot: ""',
            f'  zonesdir: "{d}"',
            '  database: ""',
            f'  pidfile: "{d}/nsd.pid"',
            f'  xfrdfile: "{d}/xfrd.state"',
            f'  xfrdir: "{d}"',
            f'  zonelistfile: "{d}/zone.list"',
            f'  logfile: "{d}/nsd.log"',
            "  server-count: 1",
            "  hide-version: yes",
            "  verbosity: 1",
            "remote-control:",
            "  control-enable: no",
        ]
        for zone in self.zones:
            out += ["zone:", f'  name: "{zone}"', f'  zonefile: "{zone}.zone"']
        return "\n".join(out) + "\n"

    def start(self, timeout: float = 10.0) -> Self:
        program = need("nsd")
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="cmcd-nsd-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port(self.host, udp_too=True)
        for zone in self.zones:
            (self.directory / f"{zone}.zone").write_text(self.zone_text(zone))
        conf = self.directory / "nsd.conf"
        conf.write_text(self.config_text())
        with (self.directory / "nsd.out").open("wb") as out:
            self.proc = subprocess.Popen(
                [program, "-d", "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None and self.directory is not None
        zone = next(iter(self.zones), ".")
        query = dns.message.make_query(zone, "SOA")
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nsd exited with status {self.proc.returncode}:\n{self.log()}")
            try:
                reply = dns.query.udp(query, self.host, port=self.port, timeout=0.2)
                if reply.rcode() == dns.rcode.NOERROR:
                    return
            except (dns.exception.Timeout, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"nsd on {self.address} did not answer within {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        if self.directory is None:
            return ""
        paths = (self.directory / name for name in ("nsd.out", "nsd.log"))
        return "".join(p.read_text(errors="replace") for p in paths if p.exists())

    def resolver(self, *, lifetime: float = 2.0) -> dns.asyncresolver.Resolver:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [self.host]
        resolver.port = self.port
        resolver.lifetime = lifetime
        resolver.timeout = lifetime
        return resolver

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        if self._own_dir and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
