#!/usr/bin/env python3
"""A big deferred queue: start-up time, idle CPU, restart after kill -9, and admin queries.

    .venv/bin/python bench/queue_idle.py [--recipients 1000000] [--per-message 5] [--idle 10]

Builds a spool holding N deferred recipients (N / per-message messages, 1 KB bodies encrypted
with the daemon's key, next attempt in an hour) straight through SQLite, the messages spread evenly
over the shards (one per worker: queue.db, queue-1.db, ...; each with queue ids naming it), then:

1. starts cmcd on it and times start to "ready" (recovery included);
2. samples the daemon's CPU time over --idle seconds while nothing is due (should be ~0), per
   process: the supervisor and each worker ([server] workers from --workers, else cmcd's default);
3. marks 10 % of the recipients of every shard inflight (as a crash mid-delivery leaves them),
   kill -9's the daemon (the supervisor: its workers must go too; orphans are reported and
   killed) and times the restart (inflight -> queued recovery included, per worker);
4. times `queue list` (first page and a page deep in the queue) and `queue summary`.

Loopback only: DNS points at a closed loopback port and every domain is routed to a closed port.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import proctree  # noqa: E402  (bench/proctree.py: CPU per process of a tree)

from cmcd import config as cmcd_config  # noqa: E402
from cmcd.admin.client import AdminClient  # noqa: E402
from cmcd.queue.ids import QueueIdGenerator  # noqa: E402
from cmcd.queue.spool import Spool  # noqa: E402
from cmcd.queue.startup import shard_file  # noqa: E402
from cmcd.store import open_store  # noqa: E402


def build(tmp: Path, recipients: int, per_message: int, shards: int) -> float:
    """The store and SHARDS spool shards; message n goes to shard n % SHARDS, with an id of that shard."""
    t0 = time.monotonic()
    store = open_store(tmp / "cmcd.db", tmp / "data.key")
    tenant = store.tenant_add("bench")
    store.domain_add("bench", "bench.test")
    keys = store.keys
    store.close()
    conns, ids = [], []
    for shard in range(shards):
        Spool(tmp / "spool", keys, shard_file(shard)).stop()  # creates the schema (and the counts' triggers)
        conn = sqlite3.connect(str(tmp / "spool" / shard_file(shard)))
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=OFF")
        conns.append(conn)
        ids.append(QueueIdGenerator(shard))
    now = time.time()
    body = b"Subject: queued\r\n\r\n" + b"x" * 1000 + b"\r\n"
    sender_enc, sender_hmac = keys.encrypt("sender@bench.test"), keys.index("sender@bench.test")
    messages = recipients // per_message
    rng = random.Random(1)
    for start in range(0, messages, 10_000):
        msgs: list[list[tuple[Any, ...]]] = [[] for _ in conns]
        rcpts: list[list[tuple[Any, ...]]] = [[] for _ in conns]
        for n in range(start, min(start + 10_000, messages)):
            shard = n % shards
            qid = ids[shard].next(now - rng.uniform(0, 86400))
            msgs[shard].append((qid, tenant.id, 1, sender_enc, sender_hmac, len(body), now - 3600,
                                keys.encrypt_bytes(body, qid.encode()), f"<{qid}@bench.test>"))  # fmt: skip
            for i in range(per_message):
                address = f"r{n}-{i}@dst{rng.randrange(1000)}.test"
                rcpts[shard].append((qid, keys.encrypt(address), keys.index(address), address.split("@")[1],
                                     "deferred", 1, now + 3600 + rng.uniform(0, 3600), "451 4.3.0 later"))  # fmt: skip
        for conn, shard_msgs, shard_rcpts in zip(conns, msgs, rcpts, strict=True):
            with conn:  # a message before its recipients: the counts' triggers look it up
                conn.executemany(
                    "INSERT INTO messages(queue_id, tenant_id, user_id, sender_enc, sender_hmac, size_bytes, "
                    "received, body, message_id) VALUES (?,?,?,?,?,?,?,?,?)",
                    shard_msgs,
                )
                conn.executemany(
                    "INSERT INTO recipients(queue_id, rcpt_enc, rcpt_hmac, domain, state, attempts, next_attempt, "
                    "last_response) VALUES (?,?,?,?,?,?,?,?)",
                    shard_rcpts,
                )
    for conn in conns:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
    return time.monotonic() - t0


def config(tmp: Path, workers: int) -> Path:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    path = tmp / "cmcd.toml"
    path.write_text(
        f"""
[server]
hostname = "bench.test"
{f"workers = {workers}" if workers else ""}
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


class Daemon:
    def __init__(self, cfg: Path):
        self.cfg = cfg
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []

    def start(self) -> float:
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cmcd.daemon", "serve", "--config", str(self.cfg)],
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        ready = threading.Event()

        def drain() -> None:
            assert self.proc is not None and self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line.rstrip())
                if "event=ready" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(300) or self.proc.poll() is not None:
            raise RuntimeError("cmcd did not start:\n" + "\n".join(self.lines[-20:]))
        return time.monotonic() - t0

    def snapshot(self) -> proctree.Snapshot:
        """The supervisor and every worker (one process when workers = 1)."""
        assert self.proc is not None
        return proctree.snapshot(self.proc.pid, threads=True)

    def kill9(self) -> str:
        """kill -9 the supervisor (or the one process); what became of its workers."""
        assert self.proc is not None
        before = self.snapshot()
        workers = [pid for pid in before if pid != self.proc.pid]
        self.proc.kill()
        self.proc.wait()
        t0 = time.monotonic()
        left = workers
        while left and time.monotonic() - t0 < 10:
            time.sleep(0.05)
            left = [
                pid
                for pid in left
                if (p := proctree.read_proc(pid)) and p.started == before[pid].started and p.state != "Z"
            ]
        if not workers:
            return "one process"
        if not left:
            return f"its {len(workers)} workers gone {time.monotonic() - t0:.2f}s later"
        for pid in left:  # orphans of the daemon this benchmark started: they must not keep a shard or a port
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
        return f"{len(left)} of {len(workers)} workers still running 10s later (ORPHANS; killed)"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)


def admin(sock: Path, verb: str, **args: Any) -> tuple[float, Any]:
    t0 = time.monotonic()
    result = AdminClient(sock, timeout_s=300).call(verb, **args)
    return time.monotonic() - t0, result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipients", type=int, default=1_000_000)
    ap.add_argument("--per-message", type=int, default=5)
    ap.add_argument("--idle", type=float, default=10.0)
    ap.add_argument(
        "--workers", type=int, default=0, help="cmcd's [server] workers (default: unset, cmcd's own default)"
    )
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cmcd-bench-queue-") as name:
        tmp = Path(name)
        cfg = config(tmp, a.workers)
        shards = cmcd_config.load(cfg).server.workers  # one shard per worker, as cmcd will run them
        built = build(tmp, a.recipients, a.per_message, shards)
        size = sum(p.stat().st_size for p in (tmp / "spool").iterdir())
        print(
            f"built {a.recipients} deferred recipients over {shards} shard{'s' if shards != 1 else ''} "
            f"in {built:.1f}s (spool {size / 1e6:.0f} MB)"
        )
        d = Daemon(cfg)
        try:
            print(f"cmcd workers: {a.workers or f'unset (cmcd default, {os.cpu_count()} CPUs)'}")
            print(f"start to ready: {d.start():.2f}s")
            time.sleep(1.0)
            s0, t0 = d.snapshot(), time.monotonic()
            time.sleep(a.idle)
            use = proctree.usage(s0, d.snapshot(), time.monotonic() - t0, proctree.cmcd_label)
            print(f"idle CPU over {a.idle:.0f}s: {use.total_s:.2f}s ({use.core_pct(use.total_s):.1f}% of one core)")
            print(use.describe("idle cmcd", threads=True))
            t, page = admin(tmp / "admin.sock", "queue.list", limit=100)
            print(f"queue list, first page: {1000 * t:.0f} ms")
            cursor = page["next"]
            for _ in range(3):
                t, page = admin(tmp / "admin.sock", "queue.list", limit=100, after=cursor, domain="dst7.test")
                cursor = page["next"] or cursor
            print(f"queue list --domain, a later page: {1000 * t:.0f} ms")
            t, summary = admin(tmp / "admin.sock", "queue.summary")
            print(f"queue summary: {1000 * t:.0f} ms ({summary['states']})")
            print(f"kill -9 of the daemon: {d.kill9()}")
            n = 0
            for shard in range(shards):
                conn = sqlite3.connect(str(tmp / "spool" / shard_file(shard)))
                with conn:
                    n += conn.execute(
                        "UPDATE recipients SET state = 'inflight' WHERE id % 10 = 0 AND state = 'deferred'"
                    ).rowcount
                conn.close()
            mark = len(d.lines)
            took = d.start()
            requeued = [
                int(m) for m in re.findall(r"event=spool_recovered inflight_requeued=(\d+)", "\n".join(d.lines[mark:]))
            ]
            print(
                f"restart after kill -9 with {n} inflight: {took:.2f}s to ready "
                f"(requeued {sum(requeued)}; per worker: {', '.join(map(str, requeued))})"
            )
        finally:
            d.stop()


if __name__ == "__main__":
    main()
