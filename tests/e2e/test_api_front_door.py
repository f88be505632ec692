"""The API's front door under attack (issue 21, items 1 and 2), with a real daemon and real TLS clients
on loopback: a slowloris from many source addresses against a daemon with few descriptors, and many
large bodies at once against a small memory budget.

What must hold: SMTP greets and the admin socket answers whatever the API is sent; every slow
connection is closed within [api] header_timeout; the API serves normally afterwards; the RSS of
the daemon's processes together stays within smtp.max_data_in_flight plus a stated overhead; a
huge declared Content-Length gets 413 before any body byte is sent.

With [server] workers > 1 the caps and the budget are the host's, each worker holding its share
(cmcd/shares.py): the tests count what the host holds (every worker's descriptor caps added up,
every process's RSS added up) and each process's descriptors against its own RLIMIT_NOFILE.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import TEST_WORKERS, Cmcd, message
from tests.e2e.test_metrics import scrape, scrape_until
from tests.peers import free_port

HEADER_TIMEOUT_S = 2.0
#: cmcd's timers are checked on its event loop; a client sees the close a little later
CLOSE_MARGIN_S = 1.5
NOFILE = 256
#: slow connections kept open at once: more than the daemon's descriptor limit allows
SLOW_CONNECTIONS = 400
SOURCES = [f"127.0.0.{n}" for n in range(2, 51)]
ATTACK_S = 3 * HEADER_TIMEOUT_S + 2
TRICKLE_S = 0.4

#: the daemon's worker processes: cmcd's default (one per CPU) unless CMCD_TEST_WORKERS says otherwise
WORKERS = int(TEST_WORKERS) if TEST_WORKERS else (os.cpu_count() or 1)
REQUEST_LIMIT = 4 * 1024**2
#: one worker's share of the data budget: one body of REQUEST_LIMIT (12 MiB as the budget weighs
#: it, JSON_BODY_WEIGHT) fits, two do not
BUDGET_SHARE = 16 * 1024**2
#: smtp.max_data_in_flight, the host's: a share for each worker (a host budget smaller than that
#: cannot be split: each share would be raised to what one such body needs, above the host's number)
BUDGET = BUDGET_SHARE * WORKERS
BODIES = 30
#: RSS the daemon's processes together may grow by, beyond the budget, while serving those bodies
#: (etc/cmcd.toml: about 1 MiB per open API connection, 18 MiB more here for the rest of each
#: worker): the TLS buffers and aiohttp state of BODIES connections; in each worker, the
#: allocator's slack and at most one body's working copies (raw, parsed JSON, message) beyond
#: what the budget counts
RSS_OVERHEAD = (BODIES + 18 * WORKERS) * 1024**2


# -- what the daemon holds --------------------------------------------------------------------------


def daemon_pids(d: Cmcd) -> list[int]:
    """The daemon's processes: the supervisor and its workers (the one process when workers = 1)."""
    status = d.admin("status")
    pids = [int(status["pid"])] + [int(w["pid"]) for w in status.get("workers") or []]
    assert len(pids) == (1 if WORKERS == 1 else 1 + WORKERS), status
    return pids


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pids: list[int]) -> int:
    """The RSS of PIDS together."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
                break
        else:
            raise AssertionError(f"no VmRSS for {pid}")
    return total


class Sampler:
    """Samples the daemon's processes every few milliseconds in a thread; keeps the most
    descriptors one process held (each has its own RLIMIT_NOFILE) and the most RSS they held together."""

    def __init__(self, pids: list[int], every_s: float = 0.02):
        self.pids, self.every_s = pids, every_s
        self.max_fds = self.max_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.max_fds = max(self.max_fds, *(open_fds(pid) for pid in self.pids))
                self.max_rss = max(self.max_rss, rss_bytes(self.pids))
            except (FileNotFoundError, ProcessLookupError):
                return
            self._stop.wait(self.every_s)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- the slowloris ------------------------------------------------------------------------------------


@dataclass
class AttackReport:
    admitted: int = 0  # TLS handshakes that completed
    refused: int = 0  # connections closed before or during the handshake
    closed_after_s: list[float] = field(default_factory=list)  # handshake to cmcd's close, per admitted one
    overdue: int = 0  # admitted connections still open past header timeout + margin


async def _slow_client(port: int, ctx: ssl.SSLContext, source: str, deadline: float, report: AttackReport) -> None:
    """Connect again and again until DEADLINE; each connection trickles a header that never ends."""
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, ssl=ctx, local_addr=(source, 0)), 10
            )
        except (OSError, ssl.SSLError, TimeoutError):
            report.refused += 1
            await asyncio.sleep(0.05)  # pacing of the attacker, not synchronisation
            continue
        report.admitted += 1
        start = loop.time()
        header = b"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100_000
        try:
            for i in range(len(header)):
                writer.write(header[i : i + 1])
                try:
                    if await asyncio.wait_for(reader.read(1024), TRICKLE_S) == b"":
                        break  # closed by cmcd
                except TimeoutError:
                    pass
                if loop.time() - start > HEADER_TIMEOUT_S + CLOSE_MARGIN_S:
                    report.overdue += 1
                    break
                if loop.time() >= deadline:
                    return
        except (OSError, ssl.SSLError):
            pass  # reset by cmcd
        finally:
            writer.transport.abort()
        report.closed_after_s.append(loop.time() - start)


def slowloris(port: int, ctx: ssl.SSLContext, connections: int, duration_s: float) -> AttackReport:
    """CONNECTIONS slow clients from SOURCES at once for DURATION_S (run in this thread)."""
    report = AttackReport()

    async def main() -> None:
        deadline = asyncio.get_running_loop().time() + duration_s
        await asyncio.gather(
            *(_slow_client(port, ctx, SOURCES[i % len(SOURCES)], deadline, report) for i in range(connections))
        )

    asyncio.run(main())
    return report


def smtp_greeting_s(port: int, timeout: float = 1.0) -> float:
    """Seconds until a new SMTP client reads cmcd's 220 greeting; fails past TIMEOUT."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = s.recv(512)
            assert chunk, "SMTP closed the connection without a greeting"
            data += chunk
    assert data.startswith(b"220 "), data
    return time.monotonic() - start


def while_running(attack: Callable[[], Any], probe: Callable[[], None], every_s: float = 0.25) -> Any:
    """Run ATTACK in a thread; call PROBE over and over (at most every EVERY_S) until it ends."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(attack()), daemon=True)
    thread.start()
    while thread.is_alive():
        probe()
        thread.join(every_s)
    assert result, "the attack failed"
    return result[0]


def front_door_daemon(root: Path, ca: Any, overrides: dict[str, Any], nofile: int | None = None) -> Cmcd:
    d = Cmcd(root, ca, overrides)
    d.start(nofile=nofile)
    return d.provision()


def metrics_port(d: Cmcd) -> int:
    return int(re.search(r"event=metrics_listening listen=\S+:(\d+)", d.wait_log("event=metrics_listening")).group(1))  # type: ignore[union-attr]


# -- tests --------------------------------------------------------------------------------------------


def test_slowloris_leaves_smtp_and_admin_working(tmp_path: Path, ca: Any) -> None:
    d = front_door_daemon(
        tmp_path / "d",
        ca,
        {
            # 1 per address: the ~8 slow clients of each source also meet the per-IP cap
            "api": {
                "listen": "127.0.0.1:0",
                "header_timeout": f"{HEADER_TIMEOUT_S}s",
                "handshake_timeout": "2s",
                "max_connections_per_ip": 1,
            },
            "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        },
        nofile=NOFILE,
    )
    try:
        assert d.proc is not None
        pid = d.proc.pid
        pids = daemon_pids(d)
        # each worker cuts its API cap to its own descriptors (the limit is per process); the host's
        # cap is theirs added up
        caps = [ln for ln in d.log if "event=descriptor_caps" in ln]
        assert len(caps) == WORKERS, caps
        worker_caps = [int(re.search(r"api_max_connections=(\d+)", ln).group(1)) for ln in caps]  # type: ignore[union-attr]
        assert max(worker_caps) < NOFILE // 4, caps
        api_cap = sum(worker_caps)
        before = max(open_fds(p) for p in pids)
        greetings: list[float] = []

        def probe() -> None:
            greetings.append(smtp_greeting_s(d.smtp_port))
            assert d.admin("status")["pid"] == pid

        with Sampler(pids) as sampled:
            report = while_running(lambda: slowloris(d.api_port, d.client_context(), SLOW_CONNECTIONS, ATTACK_S), probe)
        print(
            f"\nslowloris: descriptors of a process before={before} max during={sampled.max_fds} "
            f"(limit {NOFILE}, API cap {api_cap} = {worker_caps}); "
            f"admitted={report.admitted} refused={report.refused} slowest close={max(report.closed_after_s):.2f}s; "
            f"SMTP greeting max={max(greetings):.3f}s over {len(greetings)} probes"
        )
        assert report.admitted > api_cap and report.refused > SLOW_CONNECTIONS - api_cap
        assert report.overdue == 0 and max(report.closed_after_s) <= HEADER_TIMEOUT_S + CLOSE_MARGIN_S
        assert len(greetings) >= ATTACK_S / 1.5 and max(greetings) < 1.0
        assert sampled.max_fds < NOFILE

        # afterwards the API serves as before (once cmcd has seen the attackers' connections go)
        deadline = time.monotonic() + 10
        while True:
            try:
                status, _, doc = d.http("GET", "/v1/openapi.json")
                break
            except OSError:
                assert time.monotonic() < deadline, "the API did not come back after the attack"
        assert status == 200 and doc["openapi"] == "3.1.0"
        got = scrape(metrics_port(d))
        # every slow connection the attack did not drop itself at its end was closed by cmcd's header timer
        assert got.value("cmcd_listener_timeouts_total", listener="api", phase="headers") >= len(report.closed_after_s)
        assert got.value("cmcd_listener_connections_refused_total", listener="api", reason="max_connections") > 0
        assert got.value("cmcd_listener_connections_refused_total", listener="api", reason="max_connections_per_ip") > 0
        assert got.value("cmcd_listener_max_connections", listener="api") == api_cap
    finally:
        d.stop()


def _closed_within(s: socket.socket, seconds: float) -> None:
    """S is closed (FIN or RST) by cmcd within SECONDS (+ margin) from now."""
    start = time.monotonic()
    try:
        assert s.recv(1) == b""
    except ConnectionResetError:
        pass
    assert time.monotonic() - start <= seconds + CLOSE_MARGIN_S


def test_idle_keepalive_handshake_and_metrics_header_timeouts(tmp_path: Path, ca: Any) -> None:
    """An idle keep-alive connection is closed after keepalive_timeout, a client that never starts
    its TLS handshake after handshake_timeout, a scrape whose headers do not come within
    metrics.header_timeout is cut off; each is counted."""
    port = free_port()
    d = front_door_daemon(
        tmp_path / "d",
        ca,
        {
            "api": {
                "listen": "127.0.0.1:0",
                "keepalive_timeout": "1s",
                "header_timeout": "30s",
                "handshake_timeout": "1s",
            },
            "metrics": {"listen": f"127.0.0.1:{port}", "header_timeout": "1s"},
        },
    )
    try:
        conn = http.client.HTTPSConnection("127.0.0.1", d.api_port, context=d.client_context(), timeout=10)
        conn.request("GET", "/v1/openapi.json")
        assert conn.getresponse().read() and conn.sock is not None
        start = time.monotonic()
        assert conn.sock.recv(1) == b""  # cmcd closes the idle connection
        assert 0.9 <= time.monotonic() - start <= 1 + CLOSE_MARGIN_S
        conn.close()

        with socket.create_connection(("127.0.0.1", d.api_port), timeout=10) as s:
            _closed_within(s, 1)  # no ClientHello
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\n")
            _closed_within(s, 1)
        got = scrape(port)
        assert got.value("cmcd_listener_timeouts_total", listener="api", phase="handshake") == 1
        assert got.value("cmcd_listener_timeouts_total", listener="api", phase="idle") == 1
        assert got.value("cmcd_listener_timeouts_total", listener="metrics", phase="headers") == 1
    finally:
        d.stop()


def _post(port: int, ctx: ssl.SSLContext, token: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=60)
    try:
        conn.request(
            "POST", "/v1/emails", body, {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        )
        resp = conn.getresponse()
        return resp.status, dict(resp.headers), resp.read()
    finally:
        conn.close()


def _raw_tls(d: Cmcd) -> ssl.SSLSocket:
    s = socket.create_connection(("127.0.0.1", d.api_port), timeout=10)
    return d.client_context().wrap_socket(s, server_hostname="127.0.0.1")


def test_large_bodies_stay_within_the_memory_budget(tmp_path: Path, ca: Any) -> None:
    d = front_door_daemon(
        tmp_path / "d",
        ca,
        {
            "api": {"listen": "127.0.0.1:0", "max_request_size": REQUEST_LIMIT},
            "smtp": {"max_data_in_flight": BUDGET, "max_message_size": "2MB"},
        },
    )
    try:
        pids = daemon_pids(d)
        token = str(d.admin("apikey.add", tenant="acme", login="alice")["token"])
        envelope = {"from": "alice@acme.test", "to": ["x@dst.test"], "subject": "big"}
        body = json.dumps(envelope | {"text": "a" * (REQUEST_LIMIT - 200)}).encode()
        assert len(body) <= REQUEST_LIMIT
        small = json.dumps(envelope | {"text": "a" * 1000}).encode()
        for _ in range(2 * WORKERS):  # warm the workers (the kernel picks one per connection): TLS, store, DKIM
            assert _post(d.api_port, d.client_context(), token, small)[0] == 202
        baseline = rss_bytes(pids)

        results: list[tuple[int, dict[str, str], bytes]] = []

        def one() -> None:
            results.append(_post(d.api_port, d.client_context(), token, body))

        with Sampler(pids, every_s=0.005) as sampled:
            threads = [threading.Thread(target=one) for _ in range(BODIES)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        statuses = sorted(r[0] for r in results)
        grown = sampled.max_rss - baseline
        print(
            f"\n{BODIES} bodies of {len(body)} bytes at once: RSS baseline={baseline >> 20} MiB, "
            f"peak={sampled.max_rss >> 20} MiB (+{grown >> 20} MiB; budget {BUDGET >> 20} MiB + "
            f"overhead {RSS_OVERHEAD >> 20} MiB); after={rss_bytes(pids) >> 20} MiB; statuses={statuses}; "
            f"{len(pids)} processes"
        )
        assert set(statuses) <= {422, 503} and 422 in statuses and 503 in statuses, statuses
        busy = next(r for r in results if r[0] == 503)
        assert busy[1]["Retry-After"].isdigit() and json.loads(busy[2])["type"] == "urn:cmcd:problem:try-later"
        assert grown <= BUDGET + RSS_OVERHEAD, f"RSS grew by {grown >> 20} MiB"
        assert _post(d.api_port, d.client_context(), token, small)[0] == 202  # the budget was given back

        # a huge declared Content-Length: 413 before any body byte is sent
        with _raw_tls(d) as s:
            s.sendall(
                b"POST /v1/emails HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer " + token.encode() + b"\r\nContent-Length: 100000000000\r\n\r\n"
            )
            start = time.monotonic()
            reply = s.recv(65536)
            assert reply.startswith(b"HTTP/1.1 413 ") and time.monotonic() - start < 1.0, reply

        # a chunked body is counted as it arrives and cut off at the limit
        with _raw_tls(d) as s:
            s.sendall(
                b"POST /v1/emails HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer " + token.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
            sent = 0
            try:
                while sent <= 2 * REQUEST_LIMIT:
                    s.sendall(chunk)
                    sent += 65536
            except OSError:
                pass  # cmcd answered and closed
            reply = s.recv(65536)
            assert reply.startswith(b"HTTP/1.1 413 "), reply
    finally:
        d.stop()


# -- review of issue 21: JSON that expands, trickled bodies, unauthenticated slow bodies ------------


def test_expanding_json_is_counted_before_it_is_parsed(tmp_path: Path, ca: Any) -> None:
    """JSON that expands ("{}," is 3 bytes on the wire, a 72-byte dict once parsed) cannot take
    memory the budget does not count: past the node cap 413 before parsing, under it the parsed
    size is held in the budget (503 when it does not fit), and RSS stays within budget + overhead."""
    d = front_door_daemon(
        tmp_path / "d",
        ca,
        {
            "api": {"listen": "127.0.0.1:0", "max_request_size": REQUEST_LIMIT},
            "smtp": {"max_data_in_flight": BUDGET, "max_message_size": "2MB"},
        },
    )
    try:
        pids = daemon_pids(d)
        token = str(d.admin("apikey.add", tenant="acme", login="alice")["token"])
        head = b'{"from":"alice@acme.test","subject":"x","text":"y","to":['

        def body(item: bytes, n: int) -> bytes:
            return head + b",".join([item] * n) + b"]}"

        small = {"from": "alice@acme.test", "to": ["x@dst.test"], "subject": "w", "text": "w"}
        for _ in range(2 * WORKERS):  # warm the workers (the kernel picks one per connection): TLS, store, DKIM
            assert d.http("POST", "/v1/emails", small, token=token)[0] == 202
        baseline = rss_bytes(pids)
        fill = REQUEST_LIMIT - len(head) - 2
        cases = [  # (what, body, status, problem type)
            ("empty objects", body(b"{}", fill // 3), 413, "too-many-values"),
            ("empty arrays", body(b"[]", fill // 3), 413, "too-many-values"),
            ("small numbers", body(b"0", fill // 2), 413, "too-many-values"),
            ("short strings", body(b'"ab"', fill // 5), 413, "too-many-values"),
            # under the node cap (317,024), but 300,000 x 128 bytes parsed is more than a worker's budget
            ("under the cap, over the budget", body(b"0", 300_000), 503, "try-later"),
            # within both: parsed, then refused by the composer (recipients must be strings)
            ("within the budget", body(b"{}", 20_000), 422, "invalid"),
        ]
        for what, raw, want, kind in cases:
            with Sampler(pids, every_s=0.005) as sampled:
                status, _, doc = d.http("POST", "/v1/emails", raw=raw, token=token)
            grown = sampled.max_rss - baseline
            print(f"\n{what}: {len(raw)} bytes -> {status}; RSS +{grown >> 20} MiB (budget {BUDGET >> 20} MiB + "
                  f"overhead {RSS_OVERHEAD >> 20} MiB)")  # fmt: skip
            assert (status, doc["type"]) == (want, f"urn:cmcd:problem:{kind}"), (what, doc)
            assert grown <= BUDGET + RSS_OVERHEAD, f"{what}: RSS grew by {grown >> 20} MiB"
        assert d.http("POST", "/v1/emails", small, token=token)[0] == 202  # the budget was given back
    finally:
        d.stop()


async def _trickle(
    port: int, ctx: ssl.SSLContext, source: str, head: bytes, every_s: float, give_up_s: float, sent: list[int]
) -> float:
    """Send HEAD, then one body byte every EVERY_S; seconds until cmcd closed the connection (or
    GIVE_UP_S if it did not). Counts itself in SENT once HEAD is written."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, local_addr=(source, 0))
    start = loop.time()
    try:
        writer.write(head)
        await writer.drain()
        sent.append(1)
        while loop.time() - start < give_up_s:
            try:
                if await asyncio.wait_for(reader.read(65536), every_s) == b"":
                    break  # closed by cmcd
            except TimeoutError:
                writer.write(b" ")  # the attacker's pace
    except (OSError, ssl.SSLError):
        pass  # reset by cmcd
    finally:
        writer.transport.abort()
    return loop.time() - start


def trickle_bodies(
    port: int, ctx: ssl.SSLContext, heads: list[tuple[str, bytes]], give_up_s: float, sent: list[int]
) -> list[float]:
    """One _trickle per (source, head) at once; the seconds until each was closed."""

    async def main() -> list[float]:
        trickles = (_trickle(port, ctx, src, head, 0.5, give_up_s, sent) for src, head in heads)
        return list(await asyncio.gather(*trickles))

    return asyncio.run(main())


def test_trickled_bodies_hold_no_budget_and_are_cut_off(tmp_path: Path, ca: Any) -> None:
    """Ten bodies that each declare the request limit (3 x it is most of a worker's budget) and then come a
    byte at a time: SMTP DATA and the API are served meanwhile, and each is reset once it falls
    below api.min_body_rate after its grace, although each byte comes well within body_timeout."""
    grace_s = 2.0
    d = front_door_daemon(
        tmp_path / "d",
        ca,
        {
            "api": {
                "listen": "127.0.0.1:0",
                "max_request_size": REQUEST_LIMIT,
                "body_timeout": "30s",
                "min_body_rate": 1024,
                "min_body_rate_grace": f"{grace_s}s",
            },
            # room for each declared body (3 x 4 MiB) while ten trickle: a reservation of what they
            # declared would be 120 MiB, and SMTP would get 452
            "smtp": {"max_data_in_flight": BUDGET, "max_message_size": "2MB"},
            "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        },
    )
    try:
        token = str(d.admin("apikey.add", tenant="acme", login="alice")["token"])
        head = (
            b"POST /v1/emails HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer "
            + token.encode()
            + b"\r\nContent-Length: %d\r\n\r\n{" % REQUEST_LIMIT
        )
        served: list[str] = []

        def probe() -> None:
            with d.smtp() as c:
                c.sendmail("alice@acme.test", ["x@dst.test"], message("alice@acme.test", "x@dst.test"))
            served.append("smtp 250")
            small = {"from": "alice@acme.test", "to": ["x@dst.test"], "subject": "w", "text": "w"}
            status, _, _ = d.http("POST", "/v1/emails", small, token=token)
            served.append(f"api {status}")

        heads = [(SOURCES[i], head) for i in range(10)]
        sent: list[int] = []
        attack = lambda: trickle_bodies(d.api_port, d.client_context(), heads, 30, sent)  # noqa: E731
        closed = while_running(attack, lambda: probe() if len(sent) == len(heads) else None, 0.1)
        print(f"\n10 trickled 4 MiB bodies: closed after {min(closed):.2f}..{max(closed):.2f}s "
              f"(grace {grace_s}s); meanwhile {len(served)} probes: {sorted(set(served))}")  # fmt: skip
        assert served and set(served) == {"smtp 250", "api 202"}
        assert max(closed) <= grace_s + CLOSE_MARGIN_S
        got = scrape(metrics_port(d))
        assert got.value("cmcd_listener_timeouts_total", listener="api", phase="body") == 10
        assert d.wait_log("event=api_timeout phase=body reason=too_slow")
    finally:
        d.stop()


def _get_openapi(d: Cmcd, source: str) -> bytes | None:
    """The start of the reply to GET /v1/openapi.json from SOURCE; None if the connection was refused.
    (asyncio's TLS: ssl.SSLSocket leaks its descriptor when the peer resets during wrap_socket.)"""

    async def get() -> bytes | None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", d.api_port, ssl=d.client_context(), local_addr=(source, 0)), 5
            )
        except (OSError, ssl.SSLError, TimeoutError):
            return None
        try:
            writer.write(b"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
            return await asyncio.wait_for(reader.read(64), 5) or None
        except (OSError, ssl.SSLError, TimeoutError):
            return None
        finally:
            writer.transport.abort()

    return asyncio.run(get())


def test_unauthenticated_slow_login_bodies_are_cut_off(tmp_path: Path, ca: Any) -> None:
    """POST /v1/sessions needs no account: four slow bodies fill the caps (max_connections 4,
    one per address) only until the login body's deadline (header_timeout here, 2 s), then a
    normal client is served. (The caps holding for the host with workers: test_api_caps_hold_for_the_host.)"""
    d = front_door_daemon(
        tmp_path / "d",
        ca,
        {
            # one process: the full caps are one Door's (with N workers the kernel spreads the slow
            # bodies over N doors, and a cap of 1 per address cannot be split)
            "server": {"workers": 1},
            "api": {
                "listen": "127.0.0.1:0",
                "max_connections": 4,
                "max_connections_per_ip": 1,
                "header_timeout": f"{HEADER_TIMEOUT_S}s",
                "body_timeout": "30s",
                "min_body_rate_grace": "30s",
            },
        },
    )
    try:
        head = (
            b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 4096\r\n\r\n{"
        )
        refusals: list[str] = []

        def probe() -> None:  # while they hold the caps: another address, and a second from theirs
            for source in ("127.0.0.1", SOURCES[0]):
                reply = _get_openapi(d, source)
                refusals.append(f"{source} {'refused' if reply is None else 'served'}")

        heads = [(SOURCES[i], head) for i in range(4)]
        sent: list[int] = []
        attack = lambda: trickle_bodies(d.api_port, d.client_context(), heads, 30, sent)  # noqa: E731
        closed = while_running(attack, lambda: probe() if len(sent) == len(heads) else None, 0.1)
        print(f"\n4 slow login bodies: closed after {min(closed):.2f}..{max(closed):.2f}s; probes meanwhile: "
              f"{sorted(set(refusals))}")  # fmt: skip
        assert max(closed) <= HEADER_TIMEOUT_S + CLOSE_MARGIN_S
        assert "127.0.0.1 refused" in refusals and f"{SOURCES[0]} refused" in refusals  # the caps were full
        deadline = time.monotonic() + 10
        while (reply := _get_openapi(d, "127.0.0.1")) is None:  # once cmcd has seen the slow connections go
            assert time.monotonic() < deadline, "the API did not come back"
        assert reply.startswith(b"HTTP/1.1 200 ")
        assert d.wait_log("event=api_timeout phase=body reason=deadline")
    finally:
        d.stop()


async def _handshakes(port: int, ctx: ssl.SSLContext, sources: list[str]) -> int:
    """One TLS connection from each of SOURCES at once, all held until every one is admitted or
    refused: how many were admitted (their handshake done)."""

    async def one(source: str) -> asyncio.StreamWriter | None:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, ssl=ctx, local_addr=(source, 0)), 5
            )
        except (OSError, ssl.SSLError, TimeoutError):
            return None  # reset by cmcd: refused
        return writer

    writers = await asyncio.gather(*(one(s) for s in sources))
    for w in writers:
        if w is not None:
            w.transport.abort()
    return sum(w is not None for w in writers)


def test_api_caps_hold_for_the_host(tmp_path: Path, ca: Any) -> None:
    """api.max_connections and max_connections_per_ip are the host's, whatever the worker count:
    many connections at once, and exactly the caps are admitted (each worker holds its share)."""
    port = free_port()
    d = front_door_daemon(
        tmp_path / "d",
        ca,
        {
            "api": {"listen": "127.0.0.1:0", "max_connections": 2 * WORKERS, "max_connections_per_ip": WORKERS},
            "metrics": {"listen": f"127.0.0.1:{port}"},
        },
    )
    try:
        # one connection from each of 49 addresses at once: the whole cap (the kernel spreads them over
        # the workers, so each is all but sure to be offered more than its share of 2)
        assert asyncio.run(_handshakes(d.api_port, d.client_context(), SOURCES)) == 2 * WORKERS
        gone = scrape_until(port, lambda s: s.value("cmcd_listener_connections", listener="api") == 0)
        assert gone.value("cmcd_listener_connections", listener="api") == 0
        # 49 from one address at once: its cap
        assert asyncio.run(_handshakes(d.api_port, d.client_context(), [SOURCES[0]] * 49)) == WORKERS
        got = scrape(port)
        refused = {
            reason: got.value("cmcd_listener_connections_refused_total", listener="api", reason=reason)
            for reason in ("max_connections", "max_connections_per_ip")
        }
        assert refused == {"max_connections": 49 - 2 * WORKERS, "max_connections_per_ip": 49 - WORKERS}
        assert got.value("cmcd_listener_max_connections", listener="api") == 2 * WORKERS
    finally:
        d.stop()


def test_malformed_requests_log_one_line_not_tracebacks(tmp_path: Path, ca: Any) -> None:
    """aiohttp's traceback per malformed request becomes one rate-limited event=api_bad_request
    (each worker limits its own lines: at most one a worker here)."""
    d = front_door_daemon(tmp_path / "d", ca, {"api": {"listen": "127.0.0.1:0", "handshake_timeout": "1s"}})
    try:
        probes = [
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\r\n\r\n",  # a bad request line (not the first)
            b"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 9000 + b"\r\n\r\n",
            b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",  # a bad chunk size
        ] * 3
        for raw in probes:
            with _raw_tls(d) as s:
                s.sendall(raw)
                reply = b""
                while chunk := s.recv(65536):
                    reply += chunk
                assert b"HTTP/1.1 400 " in reply or b"HTTP/1.0 400 " in reply, reply[:100]
        with socket.create_connection(("127.0.0.1", d.api_port), timeout=10) as s:  # a line logged after theirs
            _closed_within(s, 1)
        d.wait_log("event=api_timeout phase=handshake")
        assert 1 <= sum("event=api_bad_request" in ln for ln in d.log) <= WORKERS
        assert not [ln for ln in d.log if "Traceback" in ln or "Error handling request" in ln]
    finally:
        d.stop()
