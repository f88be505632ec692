"""A supervisor and its workers, end to end: every worker serves, a tenancy change is in force in all
of them when the admin command returns, kill -9 of a worker under load loses nothing, kill -9 of the
supervisor leaves no worker behind, a destination's connection limit and a tenant's daily quota hold
across workers.

Which worker took a message is read from its queue id (it names the shard); new connections are
spread over the workers by the kernel (SO_REUSEPORT), so a test opens connections until both answered.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from cmcd.listening import Inherited, bind_shared, bound_name, environment, key
from cmcd.queue.ids import shard_of
from tests.conftest import PASSWORD, Cmcd, message, queue_id, wait_until
from tests.peers import DnsServer, Sink, free_port

WORKERS = {"server": {"workers": 2}}
DELIVERY = {"enabled": True, "routes": {}, "retry_schedule": ["1s"], "retry_jitter": 0.0, "connect_timeout": "2s",
            "command_timeout": "5s", "data_timeout": "5s", "dead_site_backoff": "1s"}  # fmt: skip


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer() as server:
        server.add("acme.test", "MX", "10 mx.acme.test.")
        server.add("mx.acme.test", "A", "127.0.0.9")
        server.add("dst.test", "MX", "10 mx.dst.test.")
        server.add("mx.dst.test", "A", "127.0.0.2")
        yield server


@pytest.fixture
def port() -> int:
    return free_port("127.0.0.1")


def delivering(make_cmcd: Any, dns: DnsServer, port: int, **delivery: Any) -> Cmcd:
    return make_cmcd(
        WORKERS
        | {
            "dns": {"nameservers": [f"127.0.0.1:{dns.port}"], "timeout": "2s"},
            "delivery": DELIVERY | {"port": port} | delivery,
        }
    )


def send(d: Cmcd, rcpt: str = "r@dst.test", subject: str = "hello", login: str = "alice") -> str:
    """One message on a connection of its own; its queue id."""
    with d.smtp(login=login) as c:
        c.mail("alice@acme.test")
        c.rcpt(rcpt)
        return queue_id(c.data(message(to=rcpt, subject=subject)))


def one_per_worker(d: Cmcd, login: str = "alice") -> dict[int, smtplib.SMTP]:
    """An open, authenticated session with each worker (identified by the shard of a message it took)."""
    sessions: dict[int, smtplib.SMTP] = {}
    for _ in range(200):
        c = d.smtp(login=login)
        c.mail("alice@acme.test")
        c.rcpt("r@dst.test")
        shard = shard_of(queue_id(c.data(message())))
        assert shard is not None
        if shard in sessions:
            c.quit()
        else:
            sessions[shard] = c
        if len(sessions) == 2:
            return sessions
    raise AssertionError(f"200 connections reached only workers {sorted(sessions)}")


def worker_pids(d: Cmcd) -> list[int]:
    return [w["pid"] for w in d.admin("status")["workers"]]


def test_every_worker_serves_and_status_adds_them_up(make_cmcd: Any) -> None:
    d = make_cmcd(WORKERS)
    status = d.admin("status")
    assert [w["worker"] for w in status["workers"]] == [0, 1]
    assert len(set(worker_pids(d))) == 2 and status["pid"] not in worker_pids(d)
    sessions = one_per_worker(d)
    for c in sessions.values():
        c.quit()
    shards = {shard_of(q) for q in d.spooled()}
    assert shards == {0, 1}
    assert d.admin("status")["accepted"] == len(d.spooled())
    listed = d.admin("queue.list", limit=10_000)["items"]
    assert sorted(i["queue_id"] for i in listed) == sorted(d.spooled())
    for qid in d.spooled():  # a queue id reaches the worker whose shard holds it
        assert d.admin("queue.show", queue_id=qid)["queue_id"] == qid
    assert d.admin("queue.summary")["states"]["queued"] == len(d.spooled())


def test_a_tenancy_change_is_in_force_in_every_worker_when_the_command_returns(make_cmcd: Any) -> None:
    d = make_cmcd(WORKERS)
    d.admin("suppression.add", tenant="acme", address="gone@dst.test")
    sessions = one_per_worker(d)
    for c in sessions.values():  # the default: a suppressed recipient is taken (and dropped at delivery)
        c.mail("alice@acme.test")
        assert c.rcpt("gone@dst.test")[0] == 250
        c.rset()
    d.admin("tenant.set", name="acme", suppressed_rcpt="refuse")
    for shard, c in sessions.items():  # no wait: the command has returned
        c.mail("alice@acme.test")
        code, text = c.rcpt("gone@dst.test")
        assert (code, text[:5]) == (550, b"5.7.1"), (shard, code, text)
        c.rset()
    d.admin("tenant.set", name="acme", suppressed_rcpt="accept")
    for shard, c in sessions.items():
        c.mail("alice@acme.test")
        assert c.rcpt("gone@dst.test")[0] == 250, shard
        c.quit()
    # a user added is let in by every worker
    d.admin("user.add", tenant="acme", login="carol", role="sender", password=PASSWORD)
    for c in one_per_worker(d, login="carol").values():
        c.quit()


def test_kill_9_of_a_worker_under_load_loses_nothing(make_cmcd: Any, dns: DnsServer, port: int) -> None:
    with Sink("127.0.0.2", port) as sink, Sink("127.0.0.9", port):
        d = delivering(make_cmcd, dns, port)
        accepted: list[str] = []
        failures = Counter[str]()
        stop = threading.Event()

        def load(n: int) -> None:
            i = 0
            while not stop.is_set():
                token = f"tok-{n}-{i}"
                i += 1
                try:
                    send(d, subject=token)
                except (smtplib.SMTPException, OSError) as exc:  # a worker killed mid-session: not accepted
                    failures[type(exc).__name__] += 1
                    continue
                accepted.append(token)

        threads = [threading.Thread(target=load, args=(n,), daemon=True) for n in range(3)]
        for t in threads:
            t.start()
        try:
            for rnd in range(5):
                wait_until(lambda n=20 * (rnd + 1): len(sink.messages) >= n, "deliveries under way", timeout=30)  # type: ignore[misc]
                victim = rnd % 2
                before = worker_pids(d)[victim]
                os.kill(before, signal.SIGKILL)
                wait_until(lambda v=victim, p=before: _restarted(d, v, p), f"worker {victim} restarted", timeout=60)  # type: ignore[misc]
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        wait_until(lambda: not set(accepted) - _tokens(sink), "every accepted message delivered", timeout=90)
        received = Counter(_all_tokens(sink))
        lost = set(accepted) - set(received)
        duplicates = sum(n - 1 for t, n in received.items() if n > 1)
        print(
            f"accepted={len(accepted)} delivered={sum(received.values())} duplicates={duplicates} failures={dict(failures)}"
        )
        assert not lost
        assert len(accepted) >= 60  # the load ran through every round
        status = d.admin("status")
        assert sum(w["restarts"] for w in status["workers"]) == 5
        wait_until(lambda: d.admin("queue.summary")["total"][0] == 0, "both shards drained", timeout=60)


def _restarted(d: Cmcd, index: int, old_pid: int) -> bool:
    w = d.admin("status")["workers"][index]
    return bool(w["up"]) and w["pid"] != old_pid


def _all_tokens(sink: Sink) -> list[str]:
    out = []
    for r in list(sink.messages):
        m = re.search(rb"Subject: (tok-\S+)", r.data)
        if m:
            out.append(m.group(1).decode())
    return out


def _tokens(sink: Sink) -> set[str]:
    return set(_all_tokens(sink))


def test_kill_9_of_the_supervisor_takes_the_workers_and_a_restart_recovers_every_shard(make_cmcd: Any) -> None:
    d = make_cmcd(WORKERS)
    sessions = one_per_worker(d)
    for c in sessions.values():
        c.quit()
    held = set(d.spooled())
    assert {shard_of(q) for q in held} == {0, 1}
    pids = worker_pids(d)
    d.kill9()
    wait_until(lambda: not any(_alive(p) for p in pids), "no worker outlives its supervisor", timeout=10)
    d.start()
    listed = {i["queue_id"] for i in d.admin("queue.list", limit=10_000)["items"]}
    assert listed == held
    assert set(d.spooled()) == held


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_a_destinations_connection_limit_holds_across_workers(make_cmcd: Any, dns: DnsServer, port: int) -> None:
    dns.add("limited.test", "MX", "10 mx.limited.test.")
    dns.add("mx.limited.test", "A", "127.0.0.3")
    with Sink("127.0.0.3", port, data_delay=0.2) as limited, Sink("127.0.0.9", port):
        d = delivering(
            make_cmcd, dns, port, domains={"limited.test": {"connection_limit": 2}},
            connection_limit=10, initial_concurrency=10,
        )  # fmt: skip
        ids = [send(d, rcpt=f"r{n}@limited.test") for n in range(16)]
        assert {shard_of(q) for q in ids} == {0, 1}, "both workers deliver to the destination"
        limited.wait_for(16, timeout=60)
        assert 1 <= limited.peak <= 2


def test_the_daily_quota_holds_across_workers_and_a_restart(make_cmcd: Any) -> None:
    d = make_cmcd(WORKERS | {"smtp": {"messages_per_day": 10}})
    taken: list[str] = []
    refused = 0
    for _ in range(30):
        with d.smtp() as c:
            code, text = c.mail("alice@acme.test")
            if code != 250:
                assert (code, text[:5]) == (550, b"5.7.1") and b"quota of 10 messages" in text
                refused += 1
                continue
            c.rcpt("r@dst.test")
            code, text = c.data(message())
            if code == 250:
                taken.append(queue_id((code, text)))
            else:
                refused += 1
    assert len(taken) == 10 and refused == 20
    assert {shard_of(q) for q in taken} == {0, 1}
    d.stop()
    d.start()
    for _ in range(6):  # refused at MAIL, or at the end of data once the store says the quota is spent
        with d.smtp() as c:
            code, text = c.mail("alice@acme.test")
            if code == 250:
                c.rcpt("r@dst.test")
                code, text = c.data(message())
            assert code in (550, 451) and text[:5] in (b"5.7.1", b"4.7.1"), (code, text)
            assert b"quota of 10 messages" in text
    assert len(d.spooled()) == 10


def test_many_right_logins_at_once_from_one_address_are_not_throttled(make_cmcd: Any) -> None:
    # a check under way is claimed in the store before scrypt (so guesses at once on every worker
    # get no more checks than the limit); logins at once wait for each other's checks, none is refused
    d = make_cmcd(WORKERS | {"smtp": {"auth_fail_limit": 3, "auth_fail_limit_per_address": 5, "auth_cache_ttl": 0}})
    results: list[object] = []

    def login() -> None:
        try:
            d.smtp().quit()
            results.append("ok")
        except (smtplib.SMTPException, OSError) as exc:
            results.append(exc)

    threads = [threading.Thread(target=login) for _ in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == ["ok"] * 30


def test_fewer_workers_than_shards_holding_mail_is_refused_by_name(make_cmcd: Any) -> None:
    d = make_cmcd(WORKERS)
    for c in one_per_worker(d).values():
        c.quit()
    held = set(d.spooled())
    d.stop()
    d.config["server"]["workers"] = 1
    d.write_config()
    out = subprocess.run(
        [sys.executable, "-m", "cmcd.daemon", "serve", "--config", str(d.config_path)],
        capture_output=True, text=True, timeout=30, cwd=d.root, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "queue-1.db: spool shard 1 holds" in lines[0] and "workers to at least 2" in lines[0]
    d.config["server"]["workers"] = 2
    d.write_config()
    d.start()
    assert {i["queue_id"] for i in d.admin("queue.list", limit=10_000)["items"]} == held


# -- the sockets a supervisor binds for its workers (cmcd/listening.py) --------------------------------


def test_one_port_for_every_copy_and_a_worker_finds_its_sockets() -> None:
    sets = bind_shared("127.0.0.1:0", 3, 16)
    socks = [s for one in sets for s in one]
    try:
        assert [len(one) for one in sets] == [1, 1, 1]
        ports = {s.getsockname()[1] for s in socks}
        assert len(ports) == 1 and all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in socks)
        address = bound_name(socks[0])
        with socket.create_connection(("127.0.0.1", ports.pop()), timeout=5):
            pass  # the kernel put it in one of the copies' queues
        inherited = Inherited(environment({key("smtp", "127.0.0.1:0"): sets[1]}))
        assert inherited.take("smtps", "127.0.0.1:0") == []
        (taken,) = inherited.take("smtp", "127.0.0.1:0")
        assert bound_name(taken) == address
        taken.detach()  # the same descriptor as sets[1][0]: closed once, below
    finally:
        for s in socks:
            s.close()


def test_a_host_name_binds_every_address_it_resolves_to() -> None:
    want = {info[4][0] for info in socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)}
    sets = bind_shared("localhost:0", 2, 16)
    try:
        assert [{s.getsockname()[0] for s in one} for one in sets] == [want, want]
        assert len({s.getsockname()[1] for one in sets for s in one}) == 1
    finally:
        for one in sets:
            for s in one:
                s.close()


def test_an_address_in_use_by_another_listener_is_refused() -> None:
    other = socket.create_server(("127.0.0.1", 0))  # no SO_REUSEPORT: nobody may share its port
    try:
        with pytest.raises(OSError):
            bind_shared(f"127.0.0.1:{other.getsockname()[1]}", 2, 16)
    finally:
        other.close()
