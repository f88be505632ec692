#!/usr/bin/env python3
"""Store write contention: how long the workers' store calls take with 1 worker and with 2, in one run.

    .venv/bin/python bench/store_contention.py [-n 20000] [--workers 1,2] [--json FILE]

Every worker has its own spool shard but all of them write the one store (cmcd.db: the mail log,
daily counts, quota leases, login and operation logs), each from its own store thread. SQLite lets
one connection write at a time: a worker whose write finds the file locked by another worker waits
in SQLite's busy handler (it sleeps 1, 2, 5, 10, 15, 20, 25, ... ms between tries, up to the
connection's busy timeout). SQLite counts those waits nowhere; they show only in the duration of
the store call, which cmcd observes in the histogram cmcd_store_write_seconds (every call on a
worker's store thread, reads included; /metrics adds the workers' histograms up).

For each worker count (default 1, then 2), a fresh daemon (bench/relay.py's daemon_toml and Daemon:
DKIM on through domain.add, the IP credential 127.0.0.1/32, a metrics listener on a free loopback
port) accepts N messages from smtp-source (relay.py's `one` shape: 20 sessions, one connection per
message, 1 recipient) and relays them to one smtp-sink. The run is complete when the admin status
says every accepted recipient was delivered (as relay.py decides); then the benchmark waits until
the spool's mail-log outbox is empty and the daemon is idle, so the log shipping that follows the
last delivery is in the window. Reported, from the difference of two /metrics scrapes (just before
the first submission and at the end): store calls, calls per message, mean, p50/p90/p99 estimated
from the buckets (linear within a bucket, as Prometheus's histogram_quantile), the share of calls
over 10 ms and over 100 ms, and the store thread's busy time (sum of the calls); also throughput
(messages / (last delivery at the sink - first submission)), cmcd's CPU (bench/proctree.py, the
supervisor and each worker, first submission to completion) and the store's own figures (mail-log
rows, size of cmcd.db and its WAL).

Loopback only; run as root (smtp-sink -u nobody). Never touches the system Postfix.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import proctree  # noqa: E402  (bench/proctree.py: CPU per process of a tree)
import relay  # noqa: E402  (bench/relay.py: daemon_toml, Daemon, Sink, smtp-source)
from intake import VENV_BIN, free_port, git_state, loadavg, log, wait_cpu_idle, wait_port  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

HISTOGRAM = "cmcd_store_write_seconds"
OUTBOX = "cmcd_outbox_backlog"


# ---------------------------------------------------------------------------------------
# the histogram


@dataclass(frozen=True)
class Hist:
    """A Prometheus histogram: cumulative counts per upper bound (the last is +Inf), and the sum."""

    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]
    sum_s: float

    @property
    def count(self) -> int:
        return self.cumulative[-1] if self.cumulative else 0

    def minus(self, before: Hist) -> Hist:
        """What was observed since BEFORE (the same buckets)."""
        if before.bounds != self.bounds:
            raise ValueError("histograms with different buckets")
        cum = tuple(a - b for a, b in zip(self.cumulative, before.cumulative, strict=True))
        return Hist(self.bounds, cum, self.sum_s - before.sum_s)

    @property
    def mean_s(self) -> float:
        return self.sum_s / self.count if self.count else math.nan

    def quantile(self, q: float) -> float:
        """Estimated Q-quantile: linear within its bucket (as histogram_quantile); in the +Inf bucket,
        the largest finite bound (the true value is above it)."""
        if not self.count:
            return math.nan
        rank = q * self.count
        prev_bound, prev_cum = 0.0, 0
        for bound, cum in zip(self.bounds, self.cumulative, strict=True):
            if cum >= rank:
                if math.isinf(bound):
                    return prev_bound
                if cum == prev_cum:
                    return bound
                return prev_bound + (bound - prev_bound) * (rank - prev_cum) / (cum - prev_cum)
            prev_bound, prev_cum = bound, cum
        return prev_bound

    def share_over(self, bound_s: float) -> float:
        """The share of calls that took longer than BOUND_S (one of the bucket bounds)."""
        if not self.count:
            return math.nan
        i = self.bounds.index(bound_s)
        return 1 - self.cumulative[i] / self.count


def scrape(port: int) -> tuple[Hist, float]:
    """/metrics: the store-call histogram (every label set added up) and the mail-log outbox backlog."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=15) as r:
        text = r.read().decode()
    buckets: dict[float, int] = {}
    sum_s, backlog = 0.0, 0.0
    for fam in text_string_to_metric_families(text):
        if fam.name == HISTOGRAM:
            for s in fam.samples:
                if s.name.endswith("_bucket"):
                    le = float(s.labels["le"])
                    buckets[le] = buckets.get(le, 0) + int(s.value)
                elif s.name.endswith("_sum"):
                    sum_s += s.value
        elif fam.name == OUTBOX:
            backlog += sum(s.value for s in fam.samples if s.labels.get("kind") == "mail")
    if not buckets:
        raise RuntimeError(f"/metrics on port {port} has no {HISTOGRAM}")
    bounds = tuple(sorted(buckets))
    return Hist(bounds, tuple(buckets[b] for b in bounds), sum_s), backlog


# ---------------------------------------------------------------------------------------
# one run


def start_daemon(workers: int, sink: relay.Sink, tls_dir: Path, metrics_port: int) -> relay.Daemon:
    """A fresh cmcd with WORKERS workers, everything routed to SINK, /metrics on METRICS_PORT, and
    relay.py's tenant: domain bench.test (DKIM keys, so every message is signed) and user sender1
    with the IP credential 127.0.0.1/32 (smtp-source needs no AUTH)."""
    tmp = Path(tempfile.mkdtemp(prefix="cmcd-bench-store-"))
    (tmp / "spool").mkdir()
    cfg = tmp / "cmcd.toml"
    cfg.write_text(
        relay.daemon_toml(
            tmp, tls_dir, hostname="relay.bench.local", delivery="", routes={"*": f"127.0.0.1:{sink.port}"},
            comment="every domain goes to the sink", workers=workers, metrics_listen=f"127.0.0.1:{metrics_port}",
        )
    )  # fmt: skip
    proc = subprocess.Popen(
        [str(VENV_BIN / "python"), "-m", "cmcd.daemon", "serve", "--config", str(cfg)],
        cwd=tmp,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    d = relay.Daemon(tmp, proc)
    if not d.ready.wait(30) or proc.poll() is not None or not d.smtp_port:
        d.stop()
        raise RuntimeError("cmcd did not become ready:\n" + "\n".join(d.lines[-30:]) + f"\n(config: {cfg})")
    wait_port(metrics_port, 10)
    d.admin("tenant.add", name="bench")
    added = d.admin("domain.add", tenant="bench", domain="bench.test")
    d.dkim = ",".join(added.get("selectors", [])) if isinstance(added, dict) else ""
    d.admin("user.add", tenant="bench", login=relay.USER, role="sender", password=relay.PASSWORD)
    d.admin("ipcred.add", tenant="bench", login=relay.USER, cidr="127.0.0.1/32")
    return d


def store_figures(tmp: Path) -> dict[str, Any]:
    """What the store file says: mail-log rows, and the size of cmcd.db and its WAL (read only)."""
    db = tmp / "cmcd.db"
    wal = tmp / "cmcd.db-wal"
    out: dict[str, Any] = {
        "db_bytes": db.stat().st_size if db.exists() else 0,
        "wal_bytes": wal.stat().st_size if wal.exists() else 0,
    }
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        out["mail_log_rows"] = conn.execute("SELECT count(*) FROM mail_log").fetchone()[0]
    finally:
        conn.close()
    return out


def run(workers: int, sink: relay.Sink, tls_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    metrics_port = free_port()
    d = start_daemon(workers, sink, tls_dir, metrics_port)
    res: dict[str, Any] = {"workers": workers, "dkim": d.dkim, "load_before": loadavg()}
    try:
        root = d.proc.pid
        sink0 = sink.count
        mark: dict[str, Any] = {}

        def on_go() -> None:  # just before the first submission: the measured window starts
            mark["hist"], _ = scrape(metrics_port)
            mark["snap"] = proctree.snapshot(root, threads=True)
            mark["t0"] = time.monotonic()

        sub = relay.run_smtp_source(d.smtp_port, relay.SHAPES["one"], args, on_go)
        t0 = mark["t0"]
        # complete when cmcd's status says every accepted recipient is delivered (relay.py's rule)
        done, delivered = False, 0
        last_progress, last_t = sink.count, time.monotonic()
        while time.monotonic() < t0 + args.timeout:
            delivered = d.admin("status")["delivery"].get("delivered", 0)
            if delivered >= sub["ok"]:
                done = True
                break
            time.sleep(0.25)
            if sink.count != last_progress:
                last_progress, last_t = sink.count, time.monotonic()
            elif time.monotonic() - last_t > args.stall:
                break
        t_done = time.monotonic()
        use = proctree.usage(mark["snap"], proctree.snapshot(root, threads=True), t_done - t0, proctree.cmcd_label)
        end = sink.changed if done else t_done
        # the log shipping after the last delivery belongs to the window: wait for an empty outbox
        # (the figure is at most about a second old, so only a scrape well after completion counts)
        # and for the daemon to be idle
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            _, backlog = scrape(metrics_port)
            if backlog == 0 and time.monotonic() > t_done + 2.5:
                break
            time.sleep(0.5)
        wait_cpu_idle(lambda: proctree.total_s(proctree.snapshot(root)), limit=15)
        hist_end, backlog = scrape(metrics_port)
        h = hist_end.minus(mark["hist"])
        figures = store_figures(d.tmp)
        wall = max(end - t0, 1e-9)
        checks = []
        if not done:
            checks.append(f"INCOMPLETE: delivered {delivered} of {sub['ok']}")
        if sub["errors"]:
            checks.append(f"submit errors {sub['errors']}")
        if sink.count - sink0 != sub["ok"]:
            checks.append(f"sink counted {sink.count - sink0} != {sub['ok']} accepted")
        if backlog:
            checks.append(f"{backlog:.0f} mail-log events still in the outbox")
        res.update(
            {
                "messages": sub["ok"],
                "delivered": delivered,
                "wall_s": wall,
                "msgs_per_s": sub["ok"] / wall,
                "accept_per_s": sub["ok"] / max(sub["wall_s"], 1e-9),
                "cpu": use.to_json(),
                "cpu_ms_per_msg": 1000 * use.total_s / max(sub["ok"], 1),
                "cpu_share": use.share,
                "cpu_describe": use.describe("cmcd"),
                "calls": h.count,
                "calls_per_msg": h.count / max(sub["ok"], 1),
                "sum_s": h.sum_s,
                "mean_s": h.mean_s,
                "p50_s": h.quantile(0.5),
                "p90_s": h.quantile(0.9),
                "p99_s": h.quantile(0.99),
                "over_10ms": h.share_over(0.01),
                "over_100ms": h.share_over(0.1),
                "store_busy_share": h.sum_s / (wall * workers),
                "buckets": list(zip(h.bounds, h.cumulative, strict=True)),
                "store": figures,
                "checks": checks,
                "problems": d.problems[:5],
                "problem_count": d.problem_count,
            }
        )
    finally:
        d.stop()
        if args.keep:
            log(f"kept {d.tmp}")
        else:
            shutil.rmtree(d.tmp, ignore_errors=True)
    res["load_after"] = loadavg()
    return res


# ---------------------------------------------------------------------------------------
# report


def ms(v: float) -> str:
    return "-" if math.isnan(v) else f"{1000 * v:.2f}"


def pct(v: float) -> str:
    return "-" if math.isnan(v) else f"{100 * v:.2f}%"


def table(results: list[dict[str, Any]]) -> str:
    ok = [r for r in results if "error" not in r]
    rows: list[tuple[str, ...]] = [("", *(f"workers={r['workers']}" for r in ok))]
    lines = [
        ("messages delivered", lambda r: f"{r['delivered']}/{r['messages']}"),
        ("throughput msg/s", lambda r: f"{r['msgs_per_s']:.0f}"),
        ("accept msg/s", lambda r: f"{r['accept_per_s']:.0f}"),
        ("cmcd CPU ms/msg", lambda r: f"{r['cpu_ms_per_msg']:.2f}"),
        ("cores used", lambda r: f"{100 * r['cpu_share']:.0f}%"),
        ("store calls", lambda r: str(r["calls"])),
        ("store calls/msg", lambda r: f"{r['calls_per_msg']:.3f}"),
        ("call mean ms", lambda r: ms(r["mean_s"])),
        ("call p50 ms (est.)", lambda r: ms(r["p50_s"])),
        ("call p90 ms (est.)", lambda r: ms(r["p90_s"])),
        ("call p99 ms (est.)", lambda r: ms(r["p99_s"])),
        ("calls > 10 ms", lambda r: pct(r["over_10ms"])),
        ("calls > 100 ms", lambda r: pct(r["over_100ms"])),
        ("store time ms/msg", lambda r: f"{1000 * r['sum_s'] / max(r['messages'], 1):.3f}"),
        ("store thread busy/worker", lambda r: f"{100 * r['store_busy_share']:.1f}%"),
        ("mail-log rows/msg", lambda r: f"{r['store']['mail_log_rows'] / max(r['messages'], 1):.2f}"),
        ("store db / WAL MB", lambda r: f"{r['store']['db_bytes'] / 1e6:.1f} / {r['store']['wal_bytes'] / 1e6:.1f}"),
        ("checks", lambda r: "OK" if not r["checks"] else "; ".join(r["checks"])),
    ]
    rows += [(name, *(fn(r) for r in ok)) for name, fn in lines]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
           for r in rows]  # fmt: skip
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def meaning(results: list[dict[str, Any]]) -> str:
    """What the difference between one worker and more says, in words, from the numbers."""
    by = {r["workers"]: r for r in results if "error" not in r}
    if 1 not in by or len(by) < 2:
        return "(no workers=1 run next to another worker count: nothing to compare)"
    one = by[1]
    out = [
        "What it means: the store calls do the same kinds of work at any worker count (with more workers the",
        "log-shipping batches are smaller: if anything less work per call), and with one worker the store thread",
        "shares its process's GIL with a busier event loop. So what a call takes beyond its workers=1 time is",
        "waiting for the store's write lock while another worker holds it: SQLite's busy handler sleeping 1, 2,",
        "5, 10, ... ms per try, which SQLite counts nowhere else (on a loaded 2-core machine part of it may be",
        "waiting for a CPU). Store time per message counts the same waiting whatever the batch sizes.",
    ]
    for n, r in sorted(by.items()):
        if n == 1:
            continue
        extra = r["mean_s"] - one["mean_s"]
        per_msg = r["sum_s"] / max(r["messages"], 1) - one["sum_s"] / max(one["messages"], 1)
        out.append(
            f"workers={n}: a call takes {ms(extra)} ms more on average (mean {ms(one['mean_s'])} -> {ms(r['mean_s'])}"
            f" ms, p99 {ms(one['p99_s'])} -> {ms(r['p99_s'])} ms, > 10 ms {pct(one['over_10ms'])} ->"
            f" {pct(r['over_10ms'])}, > 100 ms {pct(one['over_100ms'])} -> {pct(r['over_100ms'])});"
            f" store time per message {ms(one['sum_s'] / max(one['messages'], 1))} ->"
            f" {ms(r['sum_s'] / max(r['messages'], 1))} ms ({ms(per_msg)} ms of waiting per message);"
            f" each store thread busy {100 * one['store_busy_share']:.0f}% -> {100 * r['store_busy_share']:.0f}% of the run."
        )
        if extra < max(0.0002, 0.1 * one["mean_s"]):
            out.append(f"  -> no measurable write contention at {r['msgs_per_s']:.0f} msg/s.")
        else:
            out.append(
                "  -> the workers wait for each other's store writes. The calls run on each worker's store thread,"
                " off the event loop, and in this benchmark no message waits for one (IP credential, no AUTH, no"
                " daily quota): the waiting delays the log shipping only. Where a client does wait for the store"
                " (AUTH failure counts, a quota block, an API idempotency key) it adds to that client's latency."
            )
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# driver


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", "-n", type=int, default=20_000, help="messages per run (default 20000)")
    ap.add_argument("--workers", default="1,2", help="worker counts to run, in order (default 1,2)")
    ap.add_argument("--sessions", type=int, default=relay.SESSIONS, help="smtp-source sessions (default 20)")
    ap.add_argument("--timeout", type=float, default=0.0, help="per-run limit in s (default 120 + N/20)")
    ap.add_argument("--stall", type=float, default=60.0, help="give up a run after this long without progress")
    ap.add_argument("--keep", action="store_true", help="keep cmcd's temporary directories")
    ap.add_argument("--json", default="", help="also write every run's numbers to this file")
    args = ap.parse_args()
    try:
        counts = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        ap.error("--workers takes a comma-separated list of worker counts, e.g. 1,2")
    if not counts or min(counts) < 1:
        ap.error("--workers takes worker counts >= 1")
    if not args.timeout:
        args.timeout = 120 + args.messages / 20
    if os.geteuid() != 0:
        ap.error("run as root: smtp-sink -u nobody needs it")

    print(
        f"# cmcd store write contention, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; N={args.messages} messages of"
        f" {relay.MSG_SIZE} B per run, smtp-source -s {args.sessions} (one connection per message, 1 recipient),"
        f" relayed to smtp-sink; workers {','.join(map(str, counts))}; DKIM on"
    )
    print(f"# cmcd code: {git_state()}; host: {os.cpu_count()} CPUs, load average {loadavg()}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="cmcd-bench-store-main-"))
    sink: relay.Sink | None = None
    results: list[dict[str, Any]] = []
    try:
        tls_dir = workdir / "tls"
        subprocess.run(
            [str(VENV_BIN / "python"), "-m", "cmcd.devcert", str(tls_dir)], check=True, cwd=ROOT, capture_output=True
        )
        sink = relay.Sink("main")
        for n in counts:
            log(f"workers={n}: {args.messages} messages (load average {loadavg()})")
            try:
                r = run(n, sink, tls_dir, args)
            except Exception as exc:  # noqa: BLE001 - one failed run does not end the benchmark
                r = {"workers": n, "error": f"{type(exc).__name__}: {exc}"}
            results.append(r)
            if "error" in r:
                print(f"workers={n}: ERROR {r['error']}", flush=True)
                continue
            print(
                f"workers={n}: {r['msgs_per_s']:.0f} msg/s, {r['calls']} store calls, mean {ms(r['mean_s'])} ms,"
                f" p99 {ms(r['p99_s'])} ms; load average {r['load_before']} -> {r['load_after']}"
                f"\n    {r['cpu_describe']}"
                f"\n    buckets (le s: calls): "
                + ", ".join(
                    f"{b:g}: {c - p}"
                    for (b, c), p in zip(r["buckets"], [0] + [c for _, c in r["buckets"]][:-1], strict=True)
                    if c - p
                )
                + (
                    f"\n    daemon logged {r['problem_count']} warning/error lines, e.g. "
                    + " | ".join(r["problems"][:3])
                    if r["problem_count"]
                    else ""
                ),
                flush=True,
            )
    finally:
        if sink is not None:
            sink.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(table(results))
    print(
        "store calls: cmcd_store_write_seconds over the window (every call on a worker's store thread, reads"
        " included), all workers added up, from just before the first submission until the outbox is empty;"
        " store thread busy: their sum / (first submission to last delivery x workers)"
    )
    print(meaning(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
