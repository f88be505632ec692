"""Clients that stop reading: SMTP replies and API responses are bounded by a progress timer.

A client that pipelines commands (or requests) and never reads what comes back must not hold its
session, its slot in the connection caps or the daemon's memory for longer than write_timeout:
the daemon resets the connection, logs it and counts it, and serves everyone else meanwhile.

On loopback the kernel takes up to ~2 MB for a peer before a write waits (the send buffer grows
with the 64 KB loopback MSS), so these clients ask for a few MB of replies to make it wait.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import uvloop

from cmcd import writeguard
from tests.conftest import PASSWORD, Cmcd, message
from tests.e2e.test_metrics import scrape, scrape_until
from tests.peers import free_port

WRITE_TIMEOUT_S = 2.0
#: the timer checks four times per timeout; the rest is start-up of the stall and scheduling
CLOSE_WITHIN_S = WRITE_TIMEOUT_S * 1.25 + 3.0
TCP_ESTABLISHED = 1
#: replies that are never read: each 6-byte command gets a 34-byte "503 5.5.1 Error: send HELO first"
SMTP_FLOOD = b"MAIL\r\n" * 120_000


def _daemon(make_cmcd: Any, **overrides: Any) -> tuple[Cmcd, int]:
    port = free_port()
    d = make_cmcd(
        {
            "metrics": {"listen": f"127.0.0.1:{port}"},
            "smtp": {"write_timeout": f"{WRITE_TIMEOUT_S}s"},
            "api": {"listen": "127.0.0.1:0", "write_timeout": f"{WRITE_TIMEOUT_S}s"},
        }
        | overrides
    )
    return d, port


def _non_reader(source: str) -> socket.socket:
    """A TCP socket from SOURCE whose receive window is as small as the kernel allows (set before
    connecting, so the window it advertises is small from the start)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    s.bind((source, 0))
    return s


def _send_without_reading(s: socket.socket, data: bytes, timeout: float = 20) -> None:
    """Send DATA, never reading; the daemon may stop reading too once it is stuck (that is fine)."""
    s.settimeout(timeout)
    try:
        s.sendall(data)
    except (TimeoutError, ConnectionError):
        pass


def _established(s: socket.socket) -> bool:
    """The client side's TCP state, read without reading any data (Linux TCP_INFO, tcpi_state)."""
    return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == TCP_ESTABLISHED


def _wait_closed(s: socket.socket, t0: float, timeout: float) -> float:
    """Seconds from T0 until the daemon ended S's connection; fails after TIMEOUT seconds."""
    while _established(s):
        assert time.monotonic() - t0 < timeout, f"still connected after {timeout:.0f} s"
        time.sleep(0.05)
    return time.monotonic() - t0


def _stalled_seconds(line: str) -> float:
    m = re.search(r" stalled_s=([\d.]+)", line)
    assert m, line
    return float(m.group(1))


# -- the timer itself, on the daemon's event loop (uvloop), against clients in a thread -------


def _serve_one(
    client: Callable[[int], None], total: int, timeout_s: float, *, close_first: bool = False
) -> tuple[str, float]:
    """Write TOTAL bytes to the one client CLIENT(port) makes, under a Watch of TIMEOUT_S; with
    CLOSE_FIRST, close the transport right after writing (a QUIT behind unread replies) instead of
    waiting for a drain. Returns ("drained" | "closed" | "reset", seconds the server waited)."""

    async def main() -> tuple[str, float]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[str, float]] = loop.create_future()
        expired: list[float] = []

        async def serve(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            t0 = loop.time()
            w.write(b"x" * total)
            if close_first:
                watch = writeguard.Watch(w.transport, timeout_s, lambda stalled, _n: expired.append(stalled))
                w.close()
                try:
                    await w.wait_closed()
                except ConnectionError:
                    pass
                watch.cancel()
                done.set_result(("reset" if expired else "closed", loop.time() - t0))
                return
            try:  # a reset ends the drain normally (asyncio streams) or with ConnectionResetError
                with writeguard.write_deadline(w.transport, timeout_s, lambda stalled, _n: expired.append(stalled)):
                    await w.drain()
            except ConnectionError:
                pass
            done.set_result(("reset" if expired else "drained", loop.time() - t0))
            w.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        thread = threading.Thread(target=client, args=(port,), daemon=True)
        thread.start()
        try:
            return await asyncio.wait_for(done, 60)
        finally:
            server.close()
            await asyncio.to_thread(thread.join, 60)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def _reader(rcvbuf: int, chunk: int, pause_s: float | None) -> Callable[[int], None]:
    """A client with receive buffer RCVBUF that reads CHUNK bytes every PAUSE_S to the end, or
    (PAUSE_S None) never reads and waits to be reset."""

    def run(port: int) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        with s:
            s.connect(("127.0.0.1", port))
            t0 = time.monotonic()
            if pause_s is None:
                _wait_closed(s, t0, 30)
                return
            s.settimeout(30)
            try:
                while s.recv(chunk):
                    time.sleep(pause_s)  # the clock is the subject: a slow reader's pacing
            except ConnectionError:
                pass

    return run


def test_a_reader_that_stops_is_reset_after_the_timeout() -> None:
    outcome, waited = _serve_one(_reader(1024, 0, None), 8 * 1024**2, 1.0)
    assert outcome == "reset" and 1.0 <= waited <= 1.25 + 0.5, (outcome, waited)


def test_a_slow_reader_that_keeps_reading_is_not_cut_off() -> None:
    # the whole wait is several timeouts long, but what is buffered shrinks every few hundred ms
    outcome, waited = _serve_one(_reader(65536, 65536, 0.02), 10 * 1024**2, 1.0)
    print(f"\nslow reader: {outcome} after {waited:.2f} s")
    assert outcome == "drained" and waited > 2.0, (outcome, waited)


def test_a_close_behind_unread_bytes_is_reset_after_the_timeout() -> None:
    outcome, waited = _serve_one(_reader(1024, 0, None), 8 * 1024**2, 1.0, close_first=True)
    assert outcome == "reset" and 1.0 <= waited <= 1.25 + 0.5, (outcome, waited)


# -- SMTP ------------------------------------------------------------------------------------


def test_smtp_client_that_never_reads_replies_is_cut_off(make_cmcd: Any) -> None:
    d, metrics = _daemon(make_cmcd, smtp={"write_timeout": f"{WRITE_TIMEOUT_S}s", "max_connections_per_ip": 1})
    assert scrape(metrics).value("cmcd_smtp_write_timeouts_total") == 0
    stalled = _non_reader("127.0.0.7")
    try:
        stalled.connect(("127.0.0.1", d.smtp_port))
        t0 = time.monotonic()
        _send_without_reading(stalled, SMTP_FLOOD)
        # meanwhile: another client is served in full
        with d.smtp() as c:
            c.mail("alice@acme.test")
            c.rcpt("rcpt@dst.test")
            assert c.data(message())[0] == 250
        line = d.wait_log(r"event=smtp_write_timeout client_ip=127\.0\.0\.7 ", timeout=CLOSE_WITHIN_S + 20)
        took = _wait_closed(stalled, t0, CLOSE_WITHIN_S + 20)
    finally:
        stalled.close()
    print(f"\nSMTP non-reader: reset {took:.2f} s after its first command ({line})")
    assert WRITE_TIMEOUT_S <= _stalled_seconds(line) <= WRITE_TIMEOUT_S * 1.25 + 0.5
    # the session's slot in the per-IP cap (1) is free again: the address gets a new session
    again = socket.create_connection(("127.0.0.1", d.smtp_port), timeout=10, source_address=("127.0.0.7", 0))
    with again:
        assert again.recv(512).startswith(b"220 ")
    assert (
        scrape_until(metrics, lambda s: s.value("cmcd_smtp_write_timeouts_total") == 1).value(
            "cmcd_smtp_write_timeouts_total"
        )
        == 1
    )
    assert sum("event=smtp_write_timeout" in x for x in d.log) == 1


# -- HTTP API --------------------------------------------------------------------------------


def _mail_log_rows(d: Cmcd, n: int) -> None:
    """N "accepted" mail-log rows for acme (delivery is off in these tests), with long addresses
    so that each CSV row is a few hundred bytes."""
    local = "r" * 59  # 64 octets with the five digits: the longest local part (RFC 5321 4.5.3.1.1)
    with d.smtp() as c:
        for m in range(n // 100):
            rcpts = [f"{local}{m:02d}{i:03d}@{'d' * 50}.dst.test" for i in range(100)]
            c.sendmail("alice@acme.test", rcpts, message())
    d.wait_mail_log(lambda rows: len(rows) >= n, timeout=60)


def _request(path: str, token: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n").encode()


def test_api_client_that_never_reads_a_large_export_is_cut_off(make_cmcd: Any) -> None:
    d, metrics = _daemon(make_cmcd)
    d.admin("user.add", tenant="acme", login="auditor", role="viewer", password=PASSWORD)
    token = str(d.admin("apikey.add", tenant="acme", login="auditor")["token"])
    _mail_log_rows(d, 1000)
    status, _, text = d.http("GET", "/v1/deliveries?format=csv&limit=1000", token=token)
    assert status == 200
    page = len(text.encode())
    assert page > 200_000, page
    # pipelined exports, never read: a few MB, more than the kernel takes for one peer
    requests = 3_000_000 // page + 4
    raw = _non_reader("127.0.0.8")
    raw.connect(("127.0.0.1", d.api_port))
    raw.settimeout(10)
    stalled = d.client_context().wrap_socket(raw, server_hostname="127.0.0.1")
    try:
        t0 = time.monotonic()
        burst = b"".join(
            _request(f"/v1/deliveries?format={'csv' if i % 2 == 0 else 'json'}&limit=1000", token)
            for i in range(requests)
        )
        _send_without_reading(stalled, burst)
        # meanwhile: the API and SMTP serve others
        assert d.http("GET", "/v1/deliveries?format=csv&limit=10", token=token)[0] == 200
        with d.smtp() as c:
            c.mail("alice@acme.test")
            c.rcpt("rcpt@dst.test")
            assert c.data(message())[0] == 250
        line = d.wait_log(r"event=api_write_timeout client_ip=127\.0\.0\.8 ", timeout=CLOSE_WITHIN_S + 20)
        took = _wait_closed(stalled, t0, CLOSE_WITHIN_S + 20)
    finally:
        try:
            stalled.close()
        except (OSError, ssl.SSLError):
            pass
    print(f"\nAPI non-reader: {requests} pipelined exports of {page} bytes; reset after {took:.2f} s ({line})")
    assert WRITE_TIMEOUT_S <= _stalled_seconds(line) <= WRITE_TIMEOUT_S * 1.25 + 0.5
    assert d.http("GET", "/v1/deliveries?limit=1", token=token)[0] == 200
    assert (
        scrape_until(metrics, lambda s: s.value("cmcd_api_write_timeouts_total") == 1).value(
            "cmcd_api_write_timeouts_total"
        )
        == 1
    )
