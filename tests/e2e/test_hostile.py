"""Hostile clients over real sockets: open-relay probes, credential attacks, greedy and oversized clients.

Slow clients (a byte a second, idle sessions) are covered elsewhere; AUTH basics in test_submission.
The daemon runs its default worker count (2 here): failed logins are counted in the store, so the
AUTH limits are exact for the host whichever worker takes a connection (some tests choose the
worker of every guess); the connection caps are split into per-worker shares, so their exact order
of refusals is one process's (pinned to workers = 1) and the host-level caps are tested beside it.
"""

from __future__ import annotations

import base64
import resource
import shutil
import smtplib
import socket
import sqlite3
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.conftest import PASSWORD, Cmcd, message, queue_id
from tests.e2e.test_metrics import scrape
from tests.peers import free_port

DOMAIN = "relay.test"  # stands in for nmap.scanme.org
IP = "127.0.0.1"  # the server's own address literal
SRV = "mx.cmcd.test"  # the name in the server's banner (server.hostname)

#: nmap smtp-open-relay's sixteen MAIL FROM / RCPT TO pairs (from "antispam", to "relaytest").
NMAP_RELAY_TESTS = [
    ("", f"relaytest@{DOMAIN}"),
    (f"antispam@{DOMAIN}", f"relaytest@{DOMAIN}"),
    (f"antispam@{SRV}", f"relaytest@{DOMAIN}"),
    (f"antispam@[{IP}]", f"relaytest@{DOMAIN}"),
    (f"antispam@[{IP}]", f"relaytest%{DOMAIN}@[{IP}]"),
    (f"antispam@[{IP}]", f"relaytest%{DOMAIN}@{SRV}"),
    (f"antispam@[{IP}]", f'"relaytest@{DOMAIN}"'),
    (f"antispam@[{IP}]", f'"relaytest%{DOMAIN}"'),
    (f"antispam@[{IP}]", f"relaytest@{DOMAIN}@[{IP}]"),
    (f"antispam@[{IP}]", f'"relaytest@{DOMAIN}"@[{IP}]'),
    (f"antispam@[{IP}]", f"relaytest@{DOMAIN}@{SRV}"),
    (f"antispam@[{IP}]", f"@[{IP}]:relaytest@{DOMAIN}"),
    (f"antispam@[{IP}]", f"@{SRV}:relaytest@{DOMAIN}"),
    (f"antispam@[{IP}]", f"{DOMAIN}!relaytest"),
    (f"antispam@[{IP}]", f"{DOMAIN}!relaytest@[{IP}]"),
    (f"antispam@[{IP}]", f"{DOMAIN}!relaytest@{SRV}"),
]

BAD_SYNTAX = "501 5.1.3"
NO_LITERAL = "550 5.1.2"  # a recipient at an address literal ([127.0.0.1]) is refused

#: What cmcd does with each relay-probe recipient form from an authenticated sender: refuse it
#: (501 5.1.3 bad syntax, 550 5.1.2 address literal), or queue it as one plain address, the one given (a source route is dropped, RFC
#: 5321 C; a percent hack or bang path is never rewritten into another address).
AUTHENTICATED_RCPT = [
    (f"relaytest@{DOMAIN}", f"relaytest@{DOMAIN}"),
    (f"relaytest%{DOMAIN}@[{IP}]", NO_LITERAL),
    (f"relaytest%{DOMAIN}@{SRV}", f"relaytest%{DOMAIN}@{SRV}"),
    (f'"relaytest@{DOMAIN}"', BAD_SYNTAX),
    (f'"relaytest%{DOMAIN}"', BAD_SYNTAX),
    (f"relaytest@{DOMAIN}@[{IP}]", BAD_SYNTAX),
    (f'"relaytest@{DOMAIN}"@[{IP}]', NO_LITERAL),
    (f"relaytest@{DOMAIN}@{SRV}", BAD_SYNTAX),
    (f"@[{IP}]:relaytest@{DOMAIN}", f"relaytest@{DOMAIN}"),
    (f"@{SRV}:relaytest@{DOMAIN}", f"relaytest@{DOMAIN}"),
    (f"@a.test,@b.test:relaytest@{DOMAIN}", f"relaytest@{DOMAIN}"),
    (f"{DOMAIN}!relaytest", BAD_SYNTAX),
    (f"{DOMAIN}!relaytest@[{IP}]", NO_LITERAL),
    (f"{DOMAIN}!relaytest@{SRV}", f"{DOMAIN}!relaytest@{SRV}"),
]


def _client(d: Cmcd, source: str = "127.0.0.1", *, starttls: bool = True) -> smtplib.SMTP:
    """An EHLO'd (and STARTTLS'd) client connecting from SOURCE (any 127.0.0.x), not authenticated."""
    c = smtplib.SMTP("127.0.0.1", d.smtp_port, local_hostname="client.test", timeout=30, source_address=(source, 0))
    c.ehlo()
    if starttls:
        c.starttls(context=d.client_context())
        c.ehlo()
    return c


def _plain(login: str, password: str) -> str:
    return "PLAIN " + base64.b64encode(f"\0{login}\0{password}".encode()).decode()


def _login_rows(d: Cmcd, client_ip: str) -> list[dict[str, Any]]:
    """CLIENT_IP's login-log rows in the order of the events: each worker ships its rows in its own
    batches, so the row ids of two workers' rows need not follow the events."""
    conn = sqlite3.connect(f"file:{d.root / 'cmcd.db'}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [
            dict(r) for r in conn.execute("SELECT * FROM login_log WHERE client_ip = ? ORDER BY ts, id", (client_ip,))
        ]
    finally:
        conn.close()


def _wait_rows(d: Cmcd, client_ip: str, n: int, timeout: float = 10) -> list[dict[str, Any]]:
    """The login-log rows for CLIENT_IP once there are at least N (rows are written in batches)."""
    deadline = time.monotonic() + timeout
    rows = _login_rows(d, client_ip)
    while len(rows) < n and time.monotonic() < deadline:
        time.sleep(0.1)
        rows = _login_rows(d, client_ip)
    return rows


def _live_sessions(d: Cmcd) -> list[int]:
    """Each worker's open SMTP sessions (one number with workers = 1)."""
    status = d.admin("status")
    return [int(w["sessions"]) for w in status.get("workers") or [status]]


def _sessions_on_each_worker(d: Cmcd, source: str, each: int) -> list[list[smtplib.SMTP]]:
    """EACH open, STARTTLS'd sessions from SOURCE held by every worker, by worker: which worker took
    a connection is the one whose open sessions rose (the kernel spreads them; spares are closed)."""
    by_worker: list[list[smtplib.SMTP]] = [[] for _ in _live_sessions(d)]
    spare: list[smtplib.SMTP] = []
    try:
        for _ in range(100 * len(by_worker) * each):
            if all(len(held) >= each for held in by_worker):
                break
            before = _live_sessions(d)
            c = _client(d, source)
            rose = [i for i, (a, b) in enumerate(zip(before, _live_sessions(d), strict=True)) if b > a]
            assert len(rose) == 1, (before, rose)
            (by_worker[rose[0]] if len(by_worker[rose[0]]) < each else spare).append(c)
        assert all(len(held) == each for held in by_worker), [len(held) for held in by_worker]
    finally:
        for c in spare:
            c.close()
    return by_worker


# -- open relay ------------------------------------------------------------------------------


@pytest.mark.parametrize(("sender", "rcpt"), NMAP_RELAY_TESTS, ids=[f"nmap{i + 1}" for i in range(16)])
def test_unauthenticated_relay_probe_gets_no_250(cmcd: Cmcd, sender: str, rcpt: str) -> None:
    before = len(cmcd.spooled())
    for starttls in (False, True):
        with _client(cmcd, starttls=starttls) as c:
            code, text = c.docmd("MAIL", f"FROM:<{sender}>")
            assert (code, text[:5]) == (530, b"5.7.0"), (starttls, text)
            code, text = c.docmd("RCPT", f"TO:<{rcpt}>")
            assert code != 250 and code >= 500, (starttls, code, text)
            code, _ = c.docmd("DATA")
            assert code >= 500
    assert len(cmcd.spooled()) == before


@pytest.mark.parametrize("sender", sorted({s for s, _ in NMAP_RELAY_TESTS if s}))
def test_authenticated_user_cannot_use_relay_probe_senders(cmcd: Cmcd, sender: str) -> None:
    with cmcd.smtp() as c:
        code, text = c.docmd("MAIL", f"FROM:<{sender}>")
        assert (code, text[:5]) == (553, b"5.7.1")


@pytest.mark.parametrize(("rcpt", "outcome"), AUTHENTICATED_RCPT, ids=[r for r, _ in AUTHENTICATED_RCPT])
def test_authenticated_relay_forms_are_refused_or_queued_verbatim(cmcd: Cmcd, rcpt: str, outcome: str) -> None:
    with cmcd.smtp() as c:
        assert c.docmd("MAIL", "FROM:<alice@acme.test>")[0] == 250
        code, text = c.docmd("RCPT", f"TO:<{rcpt}>")
        if outcome in (BAD_SYNTAX, NO_LITERAL):
            assert f"{code} {text[:5].decode()}" == outcome, text
            return
        assert code == 250, text
        reply = c.data(message(subject=f"relay form {rcpt}"))
    assert reply[0] == 250
    assert cmcd.spooled()[queue_id(reply)]["recipients"] == [(outcome, "queued")]


def test_nmap_smtp_open_relay_script(cmcd: Cmcd) -> None:
    nmap = shutil.which("nmap")
    if nmap is None:
        pytest.skip("nmap is not installed")
    before = len(cmcd.spooled())
    out = subprocess.run(
        [nmap, "-n", "-Pn", "-p", str(cmcd.smtp_port), "--script", "+smtp-open-relay",
         "--script-args", f"smtp-open-relay.domain={DOMAIN}", "127.0.0.1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    print(out.stdout)  # "+" runs the script although nmap does not know the port as SMTP
    assert out.returncode == 0, out.stdout + out.stderr
    assert "smtp-open-relay:" in out.stdout, out.stdout
    assert "is an open relay" not in out.stdout
    assert "doesn't seem to be an open relay" in out.stdout or "isn't an open relay" in out.stdout, out.stdout
    assert len(cmcd.spooled()) == before


# -- credential attacks ----------------------------------------------------------------------


def test_fifty_bad_auths_in_one_session_are_throttled_and_logged(make_cmcd) -> None:
    d = make_cmcd({"smtp": {"auth_fail_limit": 10}})
    codes: list[tuple[int, bytes]] = []
    with _client(d) as c:
        for i in range(50):
            try:
                codes.append(c.docmd("AUTH", _plain("alice", f"guess{i}")))
            except smtplib.SMTPServerDisconnected:
                break
    # ten failures, then 421 and the connection is closed: the other 39 guesses never reach a check
    assert [code for code, _ in codes] == [535] * 10 + [421], codes
    assert all(text.startswith(b"5.7.8") for _, text in codes[:10])
    assert codes[10][1].startswith(b"4.7.0")
    # the address stays throttled, even for the right password, on a new session
    with _client(d) as c:
        code, text = c.docmd("AUTH", _plain("alice", PASSWORD))
        assert (code, text[:5]) == (421, b"4.7.0")
    rows = _wait_rows(d, "127.0.0.1", 12)
    assert [r["result"] for r in rows] == ["fail"] * 10 + ["throttled"] * 2
    assert all(r["login"] == "alice" and r["mechanism"] == "PLAIN" for r in rows)
    assert all(r["detail"] == "bad password" for r in rows[:10])
    # another address is not affected
    with _client(d, "127.0.0.2") as c:
        assert c.docmd("AUTH", _plain("alice", PASSWORD))[0] == 235


def test_fifty_sessions_of_bad_auth_from_one_address(make_cmcd) -> None:
    """Each login from an address has its own limit (10 here); the address as a whole the much higher
    per-address ceiling (30 here): alice and bob stop at their 10th failure, and every login stops
    once the address has 30."""
    d = make_cmcd({"smtp": {"auth_fail_limit": 10, "auth_fail_limit_per_address": 30}})
    codes = []
    t0 = time.monotonic()
    for i in range(50):
        with _client(d, "127.0.0.2") as c:
            login = ("alice", "bob", f"nobody{i}")[i % 3]
            code, text = c.docmd("AUTH", _plain(login, f"guess{i}"))
            codes.append(code)
            if code == 421:
                with pytest.raises(smtplib.SMTPServerDisconnected):
                    c.noop()
            else:
                assert text.startswith(b"5.7.8")
    print(f"\n50 bad-AUTH sessions: {time.monotonic() - t0:.2f} s")
    assert codes == [535] * 30 + [421] * 20
    rows = _wait_rows(d, "127.0.0.2", 50)
    assert len(rows) == 50
    assert [r["result"] for r in rows] == ["fail"] * 30 + ["throttled"] * 20
    assert [r["login"] for r in rows] == [("alice", "bob", f"nobody{i}")[i % 3] for i in range(50)]
    assert {r["detail"] for r in rows[:30]} == {"bad password", "unknown login"}
    assert {r["detail"] for r in rows[30:]} == {"address limit: 30 failures in 600 s"}
    with _client(d, "127.0.0.3") as c:
        assert c.docmd("AUTH", _plain("alice", PASSWORD))[0] == 235


def test_one_logins_bad_client_does_not_lock_out_another_login_behind_the_same_address(make_cmcd) -> None:
    """A shared NAT: beta's misconfigured client fails bob's logins; acme's alice, from the same
    address, still signs in with her right password until the address as a whole passes its ceiling."""
    d = make_cmcd({"smtp": {"auth_fail_limit": 3, "auth_fail_limit_per_address": 8}})
    codes = []
    for i in range(4):
        with _client(d, "127.0.0.4") as c:
            codes.append(c.docmd("AUTH", _plain("bob", f"stale{i}"))[0])
    assert codes == [535, 535, 535, 421]
    with _client(d, "127.0.0.4") as c:
        assert c.docmd("AUTH", _plain("alice", PASSWORD))[0] == 235
    with _client(d, "127.0.0.4") as c:
        assert c.docmd("AUTH", _plain("bob", PASSWORD))[0] == 421  # bob stays held from here
    for i in range(5):  # 3 + 5 failures: the address's ceiling
        with _client(d, "127.0.0.4") as c:
            assert c.docmd("AUTH", _plain(f"nobody{i}", "x"))[0] == 535
    with _client(d, "127.0.0.4") as c:
        assert c.docmd("AUTH", _plain("alice", PASSWORD))[0] == 421
    rows = _wait_rows(d, "127.0.0.4", 12)
    throttled = [(r["login"], r["detail"]) for r in rows if r["result"] == "throttled"]
    assert throttled == [
        ("bob", "address+login limit: 3 failures in 600 s"),
        ("bob", "address+login limit: 3 failures in 600 s"),
        ("alice", "address limit: 8 failures in 600 s"),
    ]
    assert [r["result"] for r in rows if r["login"] == "alice"] == ["ok", "throttled"]


def test_the_auth_limits_are_the_hosts_whichever_worker_takes_each_guess(make_cmcd) -> None:
    """Guesses taken by each worker in turn: alice stops at the host's 4 failures and the address at
    its 6, and a login or address held back is held back by every worker (failures are counted in
    the store, not in a worker's memory)."""
    d = make_cmcd({"smtp": {"auth_fail_limit": 4, "auth_fail_limit_per_address": 6}})
    workers = _sessions_on_each_worker(d, "127.0.0.6", 2)
    n = len(workers)
    codes = [workers[i % n][0].docmd("AUTH", _plain("alice", f"guess{i}"))[0] for i in range(4)]
    assert codes == [535] * 4
    assert [held[0].docmd("AUTH", _plain("alice", PASSWORD))[0] for held in workers] == [421] * n
    assert [workers[i % n][1].docmd("AUTH", _plain("bob", f"guess{i}"))[0] for i in range(2)] == [535] * 2
    assert [held[1].docmd("AUTH", _plain("carol", "x"))[0] for held in workers] == [421] * n
    for held in workers:
        for c in held:
            c.close()
    rows = _wait_rows(d, "127.0.0.6", 6 + 2 * n)
    assert [(r["login"], r["result"]) for r in rows] == (
        [("alice", "fail")] * 4 + [("alice", "throttled")] * n + [("bob", "fail")] * 2 + [("carol", "throttled")] * n
    )
    assert {r["detail"] for r in rows if r["login"] == "alice" and r["result"] == "throttled"} == {
        "address+login limit: 4 failures in 600 s"
    }
    assert {r["detail"] for r in rows if r["login"] == "carol"} == {"address limit: 6 failures in 600 s"}


def test_guesses_at_the_same_moment_on_every_worker_get_no_more_checks_than_the_limit(make_cmcd) -> None:
    """A burst: 6 sessions on each worker send a wrong password for alice at once. Each check claims
    its failure in the store before its password is checked, so exactly auth_fail_limit guesses are
    checked (535) and every other one is held back (421), however the workers race."""
    d = make_cmcd({"smtp": {"auth_fail_limit": 5}})
    sessions = [c for held in _sessions_on_each_worker(d, "127.0.0.7", 6) for c in held]
    start = threading.Barrier(len(sessions))

    def guess(i: int) -> int:
        start.wait(timeout=30)
        return int(sessions[i].docmd("AUTH", _plain("alice", f"burst{i}"))[0])

    try:
        with ThreadPoolExecutor(len(sessions)) as pool:
            codes = sorted(pool.map(guess, range(len(sessions))))
    finally:
        for c in sessions:
            c.close()
    assert codes == [421] * (len(sessions) - 5) + [535] * 5
    rows = _wait_rows(d, "127.0.0.7", len(sessions))
    assert sorted(r["result"] for r in rows) == ["fail"] * 5 + ["throttled"] * (len(sessions) - 5)


def test_login_of_one_user_with_password_of_another_fails(make_cmcd) -> None:
    d = make_cmcd()
    d.admin("user.passwd", tenant="beta", login="bob", password="bob's own secret")
    with d.smtp(login="bob", password="bob's own secret"):
        pass
    with d.smtp(login=None) as c:
        code, text = c.docmd("AUTH", _plain("alice", "bob's own secret"))
        assert (code, text[:5]) == (535, b"5.7.8")
        # the same session still works with the right password
        assert c.docmd("AUTH", _plain("alice", PASSWORD))[0] == 235
    rows = _wait_rows(d, "127.0.0.1", 3)
    assert [(r["login"], r["result"]) for r in rows] == [("bob", "ok"), ("alice", "fail"), ("alice", "ok")]


def test_unknown_login_costs_as_much_as_a_wrong_password(make_cmcd) -> None:
    d = make_cmcd({"smtp": {"auth_fail_limit": 1_000_000}})
    times: dict[str, list[float]] = {"unknown": [], "known": []}
    for i in range(30):
        order = ("unknown", "known") if i % 2 else ("known", "unknown")
        for kind in order:
            login = f"nobody{i}" if kind == "unknown" else "alice"
            with _client(d) as c:
                t0 = time.perf_counter()
                code, _ = c.docmd("AUTH", _plain(login, f"wrong{i}"))
                times[kind].append(time.perf_counter() - t0)
                assert code == 535
    unknown, known = statistics.median(times["unknown"]), statistics.median(times["known"])
    print(f"\nmedian failed AUTH: unknown login {unknown * 1000:.1f} ms, known login {known * 1000:.1f} ms")
    assert 0.5 <= unknown / known <= 2.0


# -- greedy clients --------------------------------------------------------------------------


def _open(port: int, source: str) -> tuple[socket.socket, bytes, float]:
    """A connection from SOURCE, its first reply line and how long that took."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(10)
        s.bind((source, 0))
        t0 = time.monotonic()
        s.connect(("127.0.0.1", port))
        line = b""
        while not line.endswith(b"\r\n"):
            chunk = s.recv(512)
            if not chunk:
                break
            line += chunk
        return s, line, time.monotonic() - t0
    except BaseException:
        s.close()
        raise


#: a thousand idle connections from one address, then 100 and 50 from two others
CROWD = (("127.0.0.1", 1000), ("127.0.0.2", 100), ("127.0.0.3", 50))
CAPS = {"max_connections_per_ip": 100, "max_connections": 150}
PER_IP_421 = b"421 4.7.0 Too many connections from your address; try again later\r\n"
TOTAL_421 = b"421 4.7.0 Too many connections; try again later\r\n"


def _crowd(make_cmcd: Any, overrides: dict[str, Any]) -> tuple[Cmcd, list[socket.socket], dict[str, list[bytes]]]:
    """A daemon with CAPS (and OVERRIDES) and the CROWD's connections, held open: their first lines."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:  # raised before the daemon starts, so it inherits it too
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    d = make_cmcd({"smtp": CAPS} | overrides)
    socks: list[socket.socket] = []
    replies: dict[str, list[bytes]] = {source: [] for source, _ in CROWD}
    slowest_refusal = 0.0
    t0 = time.monotonic()
    try:
        for source, n in CROWD:
            for _ in range(n):
                s, line, took = _open(d.smtp_port, source)
                socks.append(s)
                replies[source].append(line)
                if line.startswith(b"421"):
                    slowest_refusal = max(slowest_refusal, took)
    except BaseException:
        for s in socks:
            s.close()
        raise
    print(f"\n1150 connections in {time.monotonic() - t0:.2f} s; slowest 421: {slowest_refusal * 1000:.1f} ms")
    assert slowest_refusal < 2.0
    return d, socks, replies


def _freed(d: Cmcd) -> None:
    """Once the crowd has gone, the daemon notices the closed connections and takes mail again."""
    deadline = time.monotonic() + 15
    while True:
        try:
            c = d.smtp()
            break
        except smtplib.SMTPConnectError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    with c:
        c.mail("alice@acme.test")
        c.rcpt("rcpt@dst.test")
        assert c.data(message())[0] == 250
    assert any("reason=ip_limit" in line for line in d.log)
    assert any("reason=global_limit" in line for line in d.log)


def test_a_thousand_idle_connections_hit_the_per_ip_and_global_limits(make_cmcd) -> None:
    # workers = 1: the exact order of the refusals is one process's (with N, each worker holds its
    # share of the caps and the kernel picks the worker); the host's caps are tested just below
    d, socks, replies = _crowd(make_cmcd, {"server": {"workers": 1}})
    try:
        one, two, three = (replies[source] for source, _ in CROWD)
        assert all(r.startswith(b"220 ") for r in one[:100])
        assert one[100:] == [PER_IP_421] * 900
        assert all(r.startswith(b"220 ") for r in two[:50])
        assert two[50:] == [TOTAL_421] * 50
        assert three == [TOTAL_421] * 50
    finally:
        for s in socks:
            s.close()
    _freed(d)


def test_the_connection_caps_hold_for_the_host_whichever_worker_takes_a_connection(make_cmcd) -> None:
    """The same crowd with the default worker count (2 here): every worker holds its share of
    max_connections and max_connections_per_ip (cmcd/shares.py), so the host never holds more
    than the caps; offered enough connections each (the kernel spreads a thousand), the workers
    together take just as many as the caps allow, and every refusal is counted for the host."""
    port = free_port()
    d, socks, replies = _crowd(make_cmcd, {"metrics": {"listen": f"127.0.0.1:{port}"}})
    try:
        taken = {source: sum(r.startswith(b"220 ") for r in lines) for source, lines in replies.items()}
        refused = {source: [r for r in lines if not r.startswith(b"220 ")] for source, lines in replies.items()}
        assert all(r.startswith(b"220 ") or r in (PER_IP_421, TOTAL_421) for lines in replies.values() for r in lines)
        assert taken == {"127.0.0.1": 100, "127.0.0.2": 50, "127.0.0.3": 0}, taken
        assert refused["127.0.0.1"] == [PER_IP_421] * 900  # each worker's share of the global cap is not reached
        assert refused["127.0.0.2"] == refused["127.0.0.3"] == [TOTAL_421] * 50
        assert sum(_live_sessions(d)) == 150  # open at once: the host's max_connections, not more
        got = scrape(port)
        assert (
            got.value("cmcd_listener_connections_refused_total", listener="smtp", reason="max_connections_per_ip")
            == 900
        )
        assert got.value("cmcd_listener_connections_refused_total", listener="smtp", reason="max_connections") == 100
    finally:
        for s in socks:
            s.close()
    _freed(d)


def _vm(pid: int, field: str) -> int:
    """A /proc/PID/status field in kB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(field)


def test_tenfold_size_overrun_is_refused_in_bounded_memory(make_cmcd) -> None:
    d = make_cmcd({"smtp": {"max_message_size": "1MB"}})
    assert d.proc is not None
    baseline = _vm(d.proc.pid, "VmHWM")
    line = b"x" * 998 + b"\r\n"
    chunk = b"From: <alice@acme.test>\r\nTo: <rcpt@dst.test>\r\nSubject: big\r\n\r\n" + line * 1000  # ~1 MB
    with d.smtp() as c:
        assert c.mail("alice@acme.test")[0] == 250  # no SIZE=
        assert c.rcpt("rcpt@dst.test")[0] == 250
        c.putcmd("data")
        assert c.getreply()[0] == 354
        t0 = time.monotonic()
        assert c.sock is not None
        for i in range(10):
            c.sock.sendall(chunk if i == 0 else line * 1000)
        c.sock.sendall(b".\r\n")
        code, text = c.getreply()
        took = time.monotonic() - t0
        assert (code, text[:5]) == (552, b"5.3.4"), text
        assert c.noop()[0] == 250  # the session goes on
    peak = _vm(d.proc.pid, "VmHWM")
    print(
        f"\n10 MB into a 1 MB limit: {took:.2f} s; daemon VmHWM {baseline // 1024} MB before, {peak // 1024} MB after"
    )
    assert peak < 200 * 1024
    assert d.spooled() == {}
