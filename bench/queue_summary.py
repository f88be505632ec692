#!/usr/bin/env python3
"""`cmcctl queue summary` and the /metrics queue figures on a big, varied queue, and what keeping
the queue's counts costs a group commit and a delivery round.

    .venv/bin/python bench/queue_summary.py [--recipients 1000000] [--runs 3] [--no-daemon] [--no-intake]

1. Builds a spool of N recipients through the spool's own insert (tables.insert_messages, 10,000
   messages a transaction): 20 tenants (skewed), 5,000 destination domains (Zipf: a few big ones
   and a long tail), 1-8 recipients a message, received over the last 3 days with a burst in the
   last 30 minutes, then states spread over queued / deferred / inflight / held (whole messages
   held) and some final rows (delivered, waiting for their message's last recipient). The
   mail-log outbox rows of the fill are dropped (a running daemon ships them at once).
2. Times Spool.summary (all tenants, and the biggest tenant alone) and Spool.figures directly
   (median of --runs), and checks the summary against a full scan done here (qshape's buckets
   from every pending row: what `queue summary` computed before it kept counts).
3. Starts cmcd on the spool and times `queue.summary` through the admin socket (median of --runs).
4. Intake and delivery cost of the counts: two fresh spools side by side, one as cmcd makes it
   and one with every trigger of the spool dropped, alternating: commit_all of 1,000 messages
   (1 and 10 recipients each) and a delivery round of 1,000 recipients (claim_due, then
   apply_results delivered: outcomes and erasure); wall and CPU milliseconds per transaction.

Loopback only: DNS points at a closed loopback port and every domain is routed to a closed port;
nothing is due during the run (next attempts are a day away).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import random
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cmcd.admin.client import AdminClient, AdminClientError  # noqa: E402
from cmcd.crypto import DataKeys  # noqa: E402
from cmcd.queue import tables  # noqa: E402
from cmcd.queue.ids import QueueIdGenerator  # noqa: E402
from cmcd.queue.spool import Spool  # noqa: E402
from cmcd.queue.work import Result  # noqa: E402
from cmcd.records import Recipient, RecipientState, SpoolMessage  # noqa: E402
from cmcd.store import open_store  # noqa: E402

TENANTS = 20
DOMAINS = 5000
AGE_BUCKETS_MIN = (5, 10, 20, 40, 80, 160, 320, 640, 1280)  # qshape's, as manage.py has them
PENDING = ("queued", "deferred", "inflight", "held")
BODY = b"Subject: queued\r\n\r\n" + b"x" * 1000 + b"\r\n"


def _zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (k**s) for k in range(1, n + 1)]


def build(tmp: Path, recipients: int, now: float) -> tuple[float, dict[str, int]]:
    """The spool under TMP/spool with about RECIPIENTS recipients; returns the seconds it took and
    the tenants by name -> id."""
    t0 = time.monotonic()
    store = open_store(tmp / "cmcd.db", tmp / "data.key")
    tenant_ids = {f"t{i:02d}": store.tenant_add(f"t{i:02d}").id for i in range(TENANTS)}
    keys = store.keys
    store.close()
    spool = Spool(tmp / "spool", keys)  # creates the schema
    spool.stop()
    conn = sqlite3.connect(str(tmp / "spool" / "queue.db"), isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    rng = random.Random(13)
    ids = QueueIdGenerator()
    domains = [f"dst{i}.test" for i in range(DOMAINS)]
    dweights = _zipf_weights(DOMAINS, 1.07)
    tlist = list(tenant_ids.values())
    tweights = _zipf_weights(TENANTS, 0.8)
    made = 0
    batch: list[SpoolMessage] = []
    while made < recipients:
        burst = rng.random() < 0.1
        received = now - (rng.uniform(0, 1800) if burst else rng.uniform(0, 3 * 86400))
        n = min(rng.randint(1, 8), recipients - made)
        rdomains = rng.choices(domains, dweights, k=n)
        qid = ids.next(received)
        batch.append(
            SpoolMessage(
                queue_id=qid,
                tenant_id=rng.choices(tlist, tweights)[0],
                user_id=1,
                sender="sender@bench.test",
                recipients=tuple(Recipient(f"r{made + i}@{d}", d) for i, d in enumerate(rdomains)),
                body=BODY,
                received_ts=received,
                message_id=f"<{qid}@bench.test>",
            )
        )
        made += n
        if len(batch) == 10_000 or made >= recipients:
            conn.execute("BEGIN")
            tables.insert_messages(conn, keys, batch)
            conn.execute("COMMIT")
            batch = []
    conn.execute("BEGIN")
    conn.execute("DELETE FROM events")
    later = now + 86400
    conn.execute("UPDATE recipients SET next_attempt = ? + (id % 3600)", (later,))
    conn.execute("UPDATE messages SET held = 1 WHERE rowid % 25 = 0")
    conn.execute(
        "UPDATE recipients SET state = 'held' WHERE queue_id IN (SELECT queue_id FROM messages WHERE held = 1)"
    )
    conn.execute("UPDATE recipients SET state = 'deferred', attempts = 1 WHERE state = 'queued' AND id % 10 < 6")
    conn.execute("UPDATE recipients SET state = 'inflight' WHERE state = 'queued' AND id % 10 = 6")
    conn.execute("UPDATE recipients SET state = 'delivered' WHERE state = 'queued' AND id % 10 = 7 AND id % 3 = 0")
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.monotonic() - t0, tenant_ids


def full_scan(path: Path, now: float, tenant_id: int | None = None, top: int = 50) -> dict[str, Any]:
    """The summary from every pending row (the pre-counts algorithm), for checking."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    scope, args = ("", ()) if tenant_id is None else (" AND m.tenant_id = ?", (tenant_id,))
    by_state = dict.fromkeys(PENDING, 0)
    domains: dict[str, list[int]] = {}
    cuts = [now - b * 60 for b in AGE_BUCKETS_MIN]
    for domain, state, received in conn.execute(
        "SELECT r.domain, r.state, m.received FROM recipients r JOIN messages m ON m.queue_id = r.queue_id "
        f"WHERE r.state IN ('queued', 'deferred', 'inflight', 'held'){scope}",
        args,
    ):
        by_state[state] += 1
        counts = domains.setdefault(domain, [0] * (len(AGE_BUCKETS_MIN) + 2))
        counts[0] += 1
        counts[1 + next((i for i, cut in enumerate(cuts) if received > cut), len(cuts))] += 1
    conn.close()
    ranked = sorted(domains.items(), key=lambda kv: (-kv[1][0], kv[0]))
    return {
        "states": by_state,
        "buckets_min": list(AGE_BUCKETS_MIN),
        "total": [sum(c[i] for c in domains.values()) for i in range(len(AGE_BUCKETS_MIN) + 2)],
        "domains": [{"domain": d, "counts": c} for d, c in ranked[:top]],
        "more_domains": max(0, len(ranked) - top),
    }


def _median_ms(times: list[float]) -> str:
    return f"{1000 * statistics.median(times):.0f} ms (min {1000 * min(times):.0f}, max {1000 * max(times):.0f})"


def direct(tmp: Path, keys: DataKeys, biggest: int, runs: int) -> None:
    async def go() -> None:
        spool = Spool(tmp / "spool", keys)
        spool.start()
        try:
            for label, scope in (("all tenants", None), ("biggest tenant", biggest)):
                times = []
                for _ in range(runs):
                    now = time.time()
                    t0 = time.perf_counter()
                    got = await spool.summary(now, scope)
                    times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                want = full_scan(spool.path, now, scope)
                scan = time.perf_counter() - t0
                same = "same as" if got == want else "DIFFERENT FROM"
                print(f"  Spool.summary, {label}: {_median_ms(times)}; {same} a full scan ({1000 * scan:.0f} ms)")
                if got != want:
                    print(f"    got  {got['states']} {got['total']}\n    want {want['states']} {want['total']}")
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                figures = await spool.figures()
                times.append(time.perf_counter() - t0)
            print(f"  Spool.figures: {_median_ms(times)} ({figures.recipients})")
        finally:
            spool.stop()

    asyncio.run(go())


def config(tmp: Path) -> Path:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    path = tmp / "cmcd.toml"
    path.write_text(
        f"""
[server]
hostname = "bench.test"
[smtp]
listen = ["127.0.0.1:0"]
tls_cert = "{tmp / "cert.pem"}"
tls_key = "{tmp / "key.pem"}"
[spool]
dir = "{tmp / "spool"}"
[store]
path = "{tmp / "cmcd.db"}"
key_file = "{tmp / "data.key"}"
[metrics]
listen = ""
[admin]
socket = "{tmp / "admin.sock"}"
[dns]
nameservers = ["127.0.0.1:{port}"]
[delivery.routes]
"*" = "127.0.0.1:{port}"
"""
    )
    subprocess.run([sys.executable, "-m", "cmcd.devcert", str(tmp)], check=True, cwd=ROOT, capture_output=True)
    return path


def through_daemon(tmp: Path, runs: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cmcd.daemon", "serve", "--config", str(config(tmp))],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    lines: list[str] = []
    ready = threading.Event()

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line.rstrip())
            if "event=ready" in line:
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    t0 = time.monotonic()
    try:
        if not ready.wait(600) or proc.poll() is not None:
            raise RuntimeError("cmcd did not start:\n" + "\n".join(lines[-20:]))
        print(f"  start to ready: {time.monotonic() - t0:.2f}s")
        client = AdminClient(tmp / "admin.sock", timeout_s=300)
        for _ in range(300):  # "ready" can come before the admin socket answers (a supervisor's)
            try:
                client.call("status")
                break
            except AdminClientError:
                time.sleep(0.1)
        workers = [line for line in lines if "workers=" in line][:1]
        print(f"  ({workers[0] if workers else 'one process'})")
        for label, args in (("all tenants", {}), ("--tenant t00", {"tenant": "t00"})):
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                result = client.call("queue.summary", **args)
                times.append(time.perf_counter() - t0)
            print(f"  queue.summary, {label}: {_median_ms(times)} (states {result['states']})")
    finally:
        proc.terminate()
        proc.wait(60)


def _trigger_free(spool: Spool) -> None:
    conn = sqlite3.connect(str(spool.path))
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        conn.execute(f"DROP TRIGGER {name}")
    conn.commit()
    conn.close()


async def _timed(fn: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    await fn()
    return time.perf_counter() - w0, time.process_time() - c0


def intake(tmp: Path, keys: DataKeys, rounds: int) -> None:
    """Group commits and delivery rounds of 1,000 on a spool with and without its triggers, alternating."""

    async def go() -> None:
        spools = {"with counts": Spool(tmp / "a", keys), "no triggers": Spool(tmp / "b", keys)}
        _trigger_free(spools["no triggers"])
        ids = QueueIdGenerator()
        rng = random.Random(5)
        domains = [f"dst{i}.test" for i in range(200)]
        for s in spools.values():
            s.start()
        took: dict[tuple[str, str], list[tuple[float, float]]] = {}
        try:
            for r in range(rounds):
                for name, spool in spools.items() if r % 2 == 0 else reversed(spools.items()):
                    for per in (1, 10):
                        now = time.time()
                        batch = [
                            SpoolMessage(
                                queue_id=(qid := ids.next(now)),
                                tenant_id=1 + n % 5,
                                user_id=1,
                                sender="sender@bench.test",
                                recipients=tuple(
                                    Recipient(f"r{n}.{i}@{d}", d) for i, d in enumerate(rng.choices(domains, k=per))
                                ),
                                body=BODY,
                                received_ts=now,
                                message_id=f"<{qid}@bench.test>",
                            )
                            for n in range(1000)
                        ]
                        took.setdefault((name, f"commit 1000 x {per} rcpt"), []).append(
                            await _timed(functools.partial(spool.commit_all, batch, "2026-01-01", None, 0.0))
                        )
                    jobs: list[Any] = []

                    async def claim(spool: Spool = spool, out: list[Any] = jobs) -> None:
                        out += await spool.claim_due(time.time() + 1, 1000)

                    took.setdefault((name, "claim 1000 rcpt"), []).append(await _timed(claim))
                    results = [
                        Result(job, due, RecipientState.DELIVERED, "250 2.0.0 ok")
                        for job in jobs
                        for due in job.recipients
                    ]
                    took.setdefault((name, "outcomes+erase 1000 rcpt"), []).append(
                        await _timed(
                            functools.partial(
                                spool.apply_results, results, clock=time.time, hostname="bench.test", ids=ids
                            )
                        )
                    )
        finally:
            for s in spools.values():
                s.stop()
        for what in dict.fromkeys(k[1] for k in took):
            cells = []
            for name in spools:
                wall = statistics.median(t[0] for t in took[(name, what)])
                cpu = statistics.median(t[1] for t in took[(name, what)])
                cells.append(f"{name}: {1000 * wall:6.1f} ms wall, {1000 * cpu:6.1f} ms CPU")
            print(f"  {what:26s} " + " | ".join(cells))

    asyncio.run(go())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipients", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--intake-rounds", type=int, default=20)
    ap.add_argument("--no-daemon", action="store_true")
    ap.add_argument("--no-intake", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cmcd-bench-summary-") as name:
        tmp = Path(name)
        now = time.time()
        built, tenants = build(tmp, a.recipients, now)
        size = sum(p.stat().st_size for p in (tmp / "spool").iterdir())
        conn = sqlite3.connect(str(tmp / "spool" / "queue.db"))
        states = dict(conn.execute("SELECT state, COUNT(*) FROM recipients GROUP BY state").fetchall())
        nmsg = conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        conn.close()
        print(f"built {sum(states.values())} recipients in {nmsg} messages in {built:.1f}s (spool {size / 1e6:.0f} MB)")
        print(f"  states {states}; {TENANTS} tenants, {DOMAINS} domains; load {os.getloadavg()[0]:.2f}")
        store = open_store(tmp / "cmcd.db", tmp / "data.key")
        keys = store.keys
        store.close()
        print("direct:")
        direct(tmp, keys, tenants["t00"], a.runs)
        if not a.no_daemon:
            print("through the admin socket:")
            through_daemon(tmp, a.runs)
        if not a.no_intake:
            print(f"cost of the counts (median of {a.intake_rounds} rounds, alternating):")
            intake(tmp, keys, a.intake_rounds)


if __name__ == "__main__":
    main()
