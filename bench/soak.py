#!/usr/bin/env python3
"""Load-and-soak benchmark: cmcd under paced load for a long while, killed -9 three times, then checked for loss.

    .venv/bin/python bench/soak.py [--minutes 30] [--rate R] [--sessions 20] [--kills 3] [--quick]

1. Sinks (one helper process, uvloop/asyncio, loopback): "fast" (accepts everything), "flaky" (451 at
   the end of DATA to a random 10% of its transactions), "strict" (550 to RCPT for local parts that
   start with "reject", 1% of its recipients), "hole" (accepts TCP, never says a word) and "dsn" (where
   bounces to sender@bench.test go). Each sink records every recipient of every transaction it
   answered 250 to, with the X-Soak-Token header of the message.
2. A fresh cmcd (`python -m cmcd.daemon serve --config`, a temporary directory) with delivery on,
   `[dns] nameservers` at a closed loopback port, every domain routed by `[delivery.routes]` to a sink,
   short retry timings (retry_schedule 5s..30s, command_timeout 10s, dead_site_backoff 20s,
   max_lifetime --lifetime) so that the flaky sink's deferrals are delivered within the run.
3. Intake capacity: --capacity-s (25 s) of unpaced submission with --sessions parallel sessions
   (HELO, IP credential for 127.0.0.1/32, connection reused for up to 100 messages).
4. Soak: --minutes of submission paced at 70% of that capacity (--rate overrides). During it the
   daemon is killed with SIGKILL --kills times (at 25/50/75%) and restarted at once with the same
   config; the submitters reconnect. A message counts as accepted only when its DATA got 250 (the
   queue id is taken from the reply); others are counted as not accepted and never resubmitted.
5. Drain: wait (at most --drain-timeout) until no recipient outside hole.test is pending.
6. Zero-loss check: every accepted (queue id, recipient) must be delivered (seen at a sink),
   bounced (a final "bounced" mail-log event: strict's reject recipients), or, for hole.test only,
   expired or still deferred. Anything else is LOST. Duplicates at the sinks (at-least-once after
   kill -9) are counted, as are deliveries of messages that never got their 250.

Everything binds and connects to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import proctree  # noqa: E402  (bench/proctree.py: the daemon's process tree)
from intake import VENV_BIN, free_port, git_state, loadavg, log, wait_port  # noqa: E402
from relay import daemon_toml  # noqa: E402

from cmcd.admin.client import AdminClient, AdminClientError  # noqa: E402

SENDER = "sender@bench.test"
USER = "sender1"
PASSWORD = "bench-password-1"
CAPACITY_BASE = 0  # message numbers of the capacity phase start here
SOAK_BASE = 10_000_000  # ... and those of the soak phase here
FAST_DOMAINS = [f"f{i}.test" for i in range(8)]
SINKS = ("fast", "flaky", "strict", "dsn")
FLAKY_RATE = 0.10  # the flaky sink's share of 451 replies
TOKEN_RE = re.compile(rb"\r\nX-Soak-Token: (\d+)\r\n", re.I)


# ---------------------------------------------------------------------------------------
# the message plan: recipients of message I and what must become of each


def recipients(i: int) -> list[str]:
    """Per 100 messages: 80 at the fast domains, 14 at flaky.test, 5 at strict.test, 1 at hole.test;
    every 10th message (i % 10 == 3) also has a recipient at flaky.test."""
    slot = i % 100
    if slot < 80:
        out = [f"r{i}@{FAST_DOMAINS[i % len(FAST_DOMAINS)]}"]
    elif slot < 94:
        out = [f"r{i}@flaky.test"]
    elif slot < 99:
        # 1 in 100 strict.test recipients is refused with 550
        out = [f"reject-r{i}@strict.test" if slot == 94 and (i // 100) % 20 == 0 else f"r{i}@strict.test"]
    else:
        out = [f"r{i}@hole.test"]
    if i % 10 == 3:
        out.append(f"r{i}.b@flaky.test")
    return out


def expected(rcpt: str) -> str:
    """ "deliver", "bounce" or "hole"."""
    if rcpt.endswith("@hole.test"):
        return "hole"
    if rcpt.startswith("reject-"):
        return "bounce"
    return "deliver"


def number_of(rcpt: str) -> int:
    local = rcpt.split("@", 1)[0].removeprefix("reject-")
    return int(local[1:].split(".", 1)[0])


def filler(size: int) -> bytes:
    lines, n, total = [], 1, 0
    while total < size:
        line = f"Soak line {n}: the quick brown fox jumps over the lazy dog.\r\n".encode()
        lines.append(line)
        total += len(line)
        n += 1
    return b"".join(lines)


# ---------------------------------------------------------------------------------------
# sink worker (`soak.py --sink-worker`): a separate process so it does not share a GIL


async def _sink_session(kind: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, st: dict) -> None:
    st["conns"][kind] += 1
    if kind == "hole":
        with contextlib.suppress(Exception):
            while await reader.read(65536):
                pass
        writer.close()
        return
    rcpts: list[str] = []
    rng = random.Random()
    try:
        writer.write(b"220 sink.soak.local ESMTP\r\n")
        while True:
            line = await reader.readline()
            if not line:
                break
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(
                    b"250-sink.soak.local\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 100000000\r\n"
                    b"250 ENHANCEDSTATUSCODES\r\n"
                )
            elif verb == b"HELO":
                writer.write(b"250 sink.soak.local\r\n")
            elif verb == b"MAIL":
                rcpts = []
                st["txn"][kind] += 1
                writer.write(b"250 2.1.0 OK\r\n")
            elif verb == b"RCPT":
                text = line.decode(errors="replace")
                addr = text[text.find("<") + 1 : text.find(">")].lower()
                if kind == "strict" and addr.startswith("reject"):
                    st["r5xx"][kind] += 1
                    writer.write(b"550 5.1.1 no such user here\r\n")
                else:
                    rcpts.append(addr)
                    writer.write(b"250 2.1.5 OK\r\n")
            elif verb == b"DATA":
                if not rcpts:
                    writer.write(b"554 5.5.1 no valid recipients\r\n")
                    continue
                writer.write(b"354 go ahead\r\n")
                data = await reader.readuntil(b"\r\n.\r\n")
                m = TOKEN_RE.search(data, 0, 8192)
                token = m.group(1).decode() if m else "-"
                if kind == "flaky" and rng.random() < FLAKY_RATE:
                    st["r4xx"][kind] += 1
                    writer.write(b"451 4.3.0 flaky sink: try again later\r\n")
                else:
                    st["msgs"][kind] += 1
                    now = time.monotonic()  # system-wide: compared with the kill times of the main process
                    st["out"].write("".join(f"{kind}\t{r}\t{token}\t{now:.6f}\n" for r in rcpts))
                    writer.write(b"250 2.0.0 OK\r\n")
                rcpts = []
            elif verb == b"RSET":
                rcpts = []
                writer.write(b"250 2.0.0 OK\r\n")
            elif verb == b"NOOP":
                writer.write(b"250 2.0.0 OK\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"502 5.5.2 not implemented\r\n")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def _sink_main(p: dict) -> None:
    st: dict[str, Any] = {k: Counter() for k in ("conns", "txn", "msgs", "r4xx", "r5xx")}
    st["out"] = open(p["records"], "a", buffering=1 << 20)  # noqa: SIM115 - flushed below, closed at the end
    servers = []
    for kind, port in p["ports"].items():

        async def handler(r, w, kind=kind):
            await _sink_session(kind, r, w, st)

        servers.append(await asyncio.start_server(handler, "127.0.0.1", port, limit=1 << 24, backlog=1024))
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), stop.set)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
        st["out"].flush()
    for s in servers:
        s.close()
    st["out"].close()
    print(json.dumps({k: dict(v) for k, v in st.items() if k != "out"}), flush=True)
    os._exit(0)  # open hole connections and sessions: no need to wait for them


def sink_worker() -> None:
    p = json.loads(sys.stdin.readline())
    try:
        import uvloop  # noqa: PLC0415

        uvloop.run(_sink_main(p))
    except ImportError:  # pragma: no cover
        asyncio.run(_sink_main(p))


class Sinks:
    def __init__(self, workdir: Path):
        self.ports = {k: free_port() for k in (*SINKS, "hole")}
        self.records = workdir / "sink-records.tsv"
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--sink-worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"ports": self.ports, "records": str(self.records)}) + "\n")
        self.proc.stdin.flush()
        if self.proc.stdout.readline().strip() != "READY":
            raise RuntimeError("sink worker did not start")
        for port in self.ports.values():
            wait_port(port, 10)

    def stop(self) -> dict:
        if self.proc.poll() is not None:
            return {}
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        out = self.proc.stdout.read()
        self.proc.wait(30)
        return json.loads(out.strip().splitlines()[-1]) if out.strip() else {}


# ---------------------------------------------------------------------------------------
# submit worker (`soak.py --submit-worker`)


async def _reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    while True:
        line = await asyncio.wait_for(reader.readline(), 60)
        if not line:
            raise ConnectionError("connection closed by server")
        if len(line) < 4 or line[3:4] != b"-":
            return int(line[:3]), line


async def _submit_session(p: dict, st: dict, out) -> None:
    body = filler(p["size"])
    helo = b"HELO submit.soak.local\r\n"
    mail = f"MAIL FROM:<{SENDER}>\r\n".encode()
    rate, t0, base = p["rate"], st["t0"], p["base"]
    while not st["done"]:
        writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", p["port"]), 5)
            code, _ = await _reply(reader)
            if code != 220:
                raise RuntimeError(f"banner {code}")
            writer.write(helo)
            code, _ = await _reply(reader)
            if code != 250:
                raise RuntimeError(f"HELO {code}")
        except Exception:  # noqa: BLE001 - the daemon is (re)starting: try again soon
            st["connect_fail"] += 1
            if writer is not None:
                writer.close()
            await asyncio.sleep(0.1)
            continue
        for _ in range(100):  # messages per connection
            k = st["next"]
            now = time.monotonic()
            if (p["count"] and k >= p["count"]) or now > st["deadline"]:
                st["done"] = True
                break
            st["next"] += 1
            if rate:
                due = t0 + k / rate
                if due > now:
                    await asyncio.sleep(due - now)
            i = base + k
            rcpts = recipients(i)
            try:
                writer.write(mail)
                code, _ = await _reply(reader)
                if code != 250:
                    raise RuntimeError(f"MAIL {code}")
                ok = []
                for r in rcpts:
                    writer.write(f"RCPT TO:<{r}>\r\n".encode())
                    code, _ = await _reply(reader)
                    if code == 250:
                        ok.append(r)
                    else:
                        st["errors"][f"RCPT {code}"] += 1
                if not ok:
                    writer.write(b"RSET\r\n")
                    await _reply(reader)
                    out.write(f"N\t{i}\tno recipient accepted\n")
                    continue
                writer.write(b"DATA\r\n")
                code, _ = await _reply(reader)
                if code != 354:
                    raise RuntimeError(f"DATA {code}")
                head = (
                    f"From: <{SENDER}>\r\nTo: <{rcpts[0]}>\r\nSubject: soak {i}\r\n"
                    f"Message-ID: <soak-{i}@bench.test>\r\nX-Soak-Token: {i}\r\n\r\n"
                ).encode()
                writer.write(head + body + b".\r\n")
                code, line = await _reply(reader)
                if code != 250:
                    raise RuntimeError(f"end of data {code}")
                m = re.search(rb"queued as (\S+)", line)
                qid = m.group(1).decode() if m else "?"
                st["ok"] += 1
                out.write(f"A\t{i}\t{qid}\t{time.monotonic():.3f}\t{','.join(ok)}\n")
            except Exception as exc:  # noqa: BLE001 - not accepted; the session reconnects
                key = f"{type(exc).__name__}: {exc}"[:80]
                st["errors"][key] += 1
                st["failed"] += 1
                out.write(f"N\t{i}\t{key}\n")
                break
        with contextlib.suppress(Exception):
            writer.write(b"QUIT\r\n")
            await asyncio.wait_for(_reply(reader), 2)
        writer.close()


async def _submit_main(p: dict) -> dict:
    t0 = time.monotonic()
    st: dict[str, Any] = {"next": 0, "ok": 0, "failed": 0, "connect_fail": 0, "errors": Counter(), "done": False}
    st["t0"], st["deadline"] = t0, t0 + p["duration_s"] + p.get("grace_s", 0)
    out = open(p["out"], "a", buffering=1 << 16)  # noqa: SIM115

    async def flusher() -> None:
        while True:
            await asyncio.sleep(0.5)
            out.flush()

    fl = asyncio.get_running_loop().create_task(flusher())
    await asyncio.gather(*(_submit_session(p, st, out) for _ in range(p["sessions"])))
    fl.cancel()
    out.close()
    return {
        "ok": st["ok"],
        "failed": st["failed"],
        "claimed": st["next"],
        "connect_fail": st["connect_fail"],
        "errors": dict(st["errors"]),
        "wall_s": time.monotonic() - t0,
    }


def submit_worker() -> None:
    p = json.loads(sys.stdin.readline())
    try:
        import uvloop  # noqa: PLC0415

        result = uvloop.run(_submit_main(p))
    except ImportError:  # pragma: no cover
        result = asyncio.run(_submit_main(p))
    print(json.dumps(result), flush=True)


class Submitter:
    """The submit worker, running in the background; .result once it has finished."""

    def __init__(self, params: dict):
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--submit-worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdin
        self.proc.stdin.write(json.dumps(params) + "\n")
        self.proc.stdin.close()

    def running(self) -> bool:
        return self.proc.poll() is None

    def result(self) -> dict:
        assert self.proc.stdout
        out = self.proc.stdout.read()
        self.proc.wait()
        if self.proc.returncode != 0 or not out.strip():
            raise RuntimeError(f"submit worker failed (rc={self.proc.returncode})")
        return json.loads(out.strip().splitlines()[-1])


class Tail:
    """Complete lines appended to PATH since the last call."""

    def __init__(self, path: Path):
        self.path, self.offset, self.pending = path, 0, b""

    def lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        *done, self.pending = (self.pending + chunk).split(b"\n")
        return [d.decode() for d in done]


# ---------------------------------------------------------------------------------------
# the daemon


def rss_kb(pid: int, key: str = "VmRSS") -> int:
    """KEY (VmRSS, VmHWM) of PID summed with its descendants': cmcd's supervisor and its workers."""
    total = 0
    for p in proctree.tree_pids(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


class Daemon:
    """cmcd serve with CONFIG; start() again after a kill -9 reuses the same directory and config."""

    def __init__(self, tmp: Path, config: Path, smtp_port: int):
        self.tmp, self.config, self.smtp_port = tmp, config, smtp_port
        self.proc: subprocess.Popen | None = None
        self.ready = threading.Event()
        self.generation = 0
        self.problems: list[str] = []
        self.problem_count = 0
        self.problem_kinds: Counter[str] = Counter()
        self.log_path = tmp / "daemon.log"

    def start(self, timeout: float = 120) -> float:
        """Start and wait for event=ready; returns the seconds it took."""
        t = time.monotonic()
        self.generation += 1
        self.ready = threading.Event()
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "python"), "-m", "cmcd.daemon", "serve", "--config", str(self.config)],
            cwd=self.tmp,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        threading.Thread(target=self._drain, args=(self.proc, self.ready, self.generation), daemon=True).start()
        while not self.ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() - t > timeout:
                raise RuntimeError(f"cmcd did not become ready (rc={self.proc.poll()}); see {self.log_path}")
        return time.monotonic() - t

    def _drain(self, proc: subprocess.Popen, ready: threading.Event, gen: int) -> None:
        assert proc.stderr
        with open(self.log_path, "a") as logf:
            logf.write(f"----- generation {gen}, pid {proc.pid}\n")
            for raw in proc.stderr:
                line = raw.decode(errors="replace").rstrip("\n")
                logf.write(line + "\n")
                if "event=ready" in line:
                    ready.set()
                m = re.search(r"\blevel=(warn|warning|error|critical)\b", line, re.I)
                if m or "Traceback" in line:
                    self.problem_count += 1
                    ev = re.search(r"\bevent=(\S+)", line)
                    key = f"{m.group(1) if m else 'traceback'}:{ev.group(1) if ev else '?'}"
                    self.problem_kinds[key] += 1
                    if self.problem_kinds[key] <= 2:  # the first two of each kind, errors in full
                        self.problems.append(f"[gen {gen}] {line if 'warn' not in key else line[:300]}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def admin(self, verb: str, **args: Any) -> Any:
        try:
            return AdminClient(self.tmp / "admin.sock", timeout_s=120).call(verb, **args)
        except AdminClientError as exc:
            raise RuntimeError(f"admin {verb}: {exc}") from None

    def mail_log(self) -> list[dict]:
        return list(AdminClient(self.tmp / "admin.sock").stream("log.mail"))

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.problems.append("daemon did not exit within 60s of SIGTERM; killed")
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def write_config(tmp: Path, sinks: Sinks, args: argparse.Namespace) -> tuple[Path, int]:
    tls = tmp / "tls"
    subprocess.run([str(VENV_BIN / "python"), "-m", "cmcd.devcert", str(tls)], check=True, cwd=ROOT,
                   capture_output=True)  # fmt: skip
    (tmp / "spool").mkdir()
    port, dead = free_port(), free_port()
    q = json.dumps
    routes = {d: sinks.ports["fast"] for d in FAST_DOMAINS}
    routes |= {"flaky.test": sinks.ports["flaky"], "strict.test": sinks.ports["strict"]}
    routes |= {"hole.test": sinks.ports["hole"], "bench.test": sinks.ports["dsn"], "*": sinks.ports["dsn"]}
    delivery = (
        'retry_schedule = ["5s", "10s", "20s", "30s"]\nretry_jitter = 0.1\n'
        f"max_lifetime = {q(args.lifetime)}\n"
        'connect_timeout = "5s"\ncommand_timeout = "10s"\ndata_timeout = "30s"\ndead_site_backoff = "20s"\n'
    )
    config = daemon_toml(
        tmp, tls, hostname="soak.bench.local", delivery=delivery,
        routes={d: f"127.0.0.1:{p}" for d, p in routes.items()},
        smtp_listen=f"127.0.0.1:{port}", smtps_listen=None, nameserver=f"127.0.0.1:{dead}",
        comment="every domain has a static route", workers=args.workers,
    )  # fmt: skip
    cfg = tmp / "cmcd.toml"
    cfg.write_text(config)
    return cfg, port


# ---------------------------------------------------------------------------------------
# the run


class Accepted:
    """What the submit workers wrote: accepted messages (number -> (queue id, time, recipients))."""

    def __init__(self, path: Path):
        self.tail = Tail(path)
        self.msgs: dict[int, tuple[str, float, list[str]]] = {}
        self.not_accepted = 0
        self.times: list[float] = []  # acceptance times, in order of reading

    def update(self) -> None:
        for line in self.tail.lines():
            f = line.split("\t")
            if f[0] == "A":
                t = float(f[3])
                self.msgs[int(f[1])] = (f[2], t, f[4].split(","))
                self.times.append(t)
            elif f[0] == "N":
                self.not_accepted += 1

    def first_after(self, t: float) -> float | None:
        later = [x for x in self.times[-50000:] if x > t]
        return min(later) if later else None


def run(args: argparse.Namespace) -> int:
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    print(f"# cmcd soak benchmark, {started}; cmcd code: {git_state()}")
    print(f"# host: {os.cpu_count()} CPUs, load average {loadavg()}; {args.minutes} min, {args.sessions} sessions, "
          f"{args.kills} kill -9, message size {args.size} B, max_lifetime {args.lifetime}", flush=True)  # fmt: skip
    print(f"# cmcd workers: {args.workers or f'[server] workers unset (cmcd default, {os.cpu_count()} CPUs)'}; "
          "RSS is the sum over the supervisor and its workers; kill -9 hits the supervisor", flush=True)  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="cmcd-soak-"))
    sinks = Sinks(workdir)
    cfg, port = write_config(workdir, sinks, args)
    d = Daemon(workdir, cfg, port)
    accepted = Accepted(workdir / "accepted.tsv")
    rss: list[tuple[float, int, int]] = []  # (time, generation, kB)
    res: dict[str, Any] = {"restarts": []}
    sink_stats: dict = {}
    t_begin = time.monotonic()

    def sample(label: str = "") -> int:
        kb = rss_kb(d.pid)
        if kb:
            rss.append((time.monotonic(), d.generation, kb))
        if label:
            log(f"RSS {label}: {kb / 1024:.1f} MB (pid {d.pid})")
        return kb

    def status_line() -> str:
        try:
            summ = d.admin("queue.summary")
            states = summ.get("states", {})
            return " ".join(f"{k}={v}" for k, v in states.items())
        except Exception as exc:  # noqa: BLE001
            return f"(queue.summary: {exc})"

    try:
        log(f"sinks {sinks.ports}; workdir {workdir}")
        res["ready_s"] = d.start()
        d.admin("tenant.add", name="bench")
        d.admin("domain.add", tenant="bench", domain="bench.test")
        d.admin("user.add", tenant="bench", login=USER, role="sender", password=PASSWORD)
        d.admin("ipcred.add", tenant="bench", login=USER, cidr="127.0.0.1/32")
        time.sleep(1)
        res["rss_idle_kb"] = sample("idle after start-up")

        # 1. capacity
        log(f"capacity: {args.capacity_s:.0f} s unpaced, {args.sessions} sessions")
        common = {"port": port, "sessions": args.sessions, "size": args.size, "out": str(accepted.tail.path)}
        sub = Submitter(common | {"rate": 0, "count": 0, "duration_s": args.capacity_s, "base": CAPACITY_BASE})
        while sub.running():
            time.sleep(1)
            sample()
        cap = sub.result()
        res["capacity"] = cap
        res["capacity_rate"] = cap["ok"] / cap["wall_s"]
        accepted.update()
        log(f"capacity: {cap['ok']} accepted in {cap['wall_s']:.1f} s = {res['capacity_rate']:.0f} msg/s; "
            f"errors {cap['errors']}; queue {status_line()}")  # fmt: skip
        time.sleep(5)
        res["rss_start_kb"] = sample("after warm-up (capacity phase)")

        # 2. soak
        rate = args.rate or 0.7 * res["capacity_rate"]
        res["target_rate"] = rate
        duration = args.minutes * 60
        count = int(rate * duration)
        kill_at = [duration * (j + 1) / (args.kills + 1) for j in range(args.kills)]
        log(f"soak: {count} messages at {rate:.1f} msg/s over {duration:.0f} s; kill -9 at "
            + ", ".join(f"{k:.0f}s" for k in kill_at))  # fmt: skip
        sub = Submitter(common | {"rate": rate, "count": count, "duration_s": duration, "grace_s": 120,
                                  "base": SOAK_BASE})  # fmt: skip
        t0 = time.monotonic()
        next_sample, next_report = t0, t0 + args.report_s
        last_n, last_t = len(accepted.msgs), t0
        pending_restart: list[dict] = []
        while sub.running():
            time.sleep(0.2)
            now = time.monotonic()
            accepted.update()
            for r in pending_restart[:]:
                first = accepted.first_after(r["dead_at"])
                if first is not None:
                    r["first_250_s"] = first - r["killed_at"]
                    pending_restart.remove(r)
                    log(f"restart {r['n']}: first 250 {r['first_250_s']:.2f} s after the kill")
            if kill_at and now - t0 >= kill_at[0]:
                kill_at.pop(0)
                sample()
                n = len(res["restarts"]) + 1
                r = {"n": n, "at_s": now - t0, "rss_before_kb": rss_kb(d.pid), "old_pid": d.pid}
                r["killed_at"] = time.monotonic()
                d.kill9()
                r["dead_at"] = time.monotonic()  # 250s read after this came from the new process
                r["ready_s"] = d.start()
                r["new_pid"] = d.pid
                # recipients that were in flight at the kill: counted by the new process as possible duplicates
                r["possible_duplicates"] = d.admin("status").get("possible_duplicates", 0)
                r["rss_after_kb"] = rss_kb(d.pid)
                res["restarts"].append(r)
                pending_restart.append(r)
                log(f"restart {n}: kill -9 pid {r['old_pid']} at {r['at_s']:.0f} s (RSS "
                    f"{r['rss_before_kb'] / 1024:.1f} MB); new pid {d.pid} ready after {r['ready_s']:.2f} s "
                    f"(RSS {r['rss_after_kb'] / 1024:.1f} MB)")  # fmt: skip
            if now >= next_sample:
                sample()
                next_sample += 10
            if now >= next_report:
                n = len(accepted.msgs)
                log(f"+{now - t0:5.0f} s: accepted {n} "
                    f"({(n - last_n) / (now - last_t):.0f} msg/s last {now - last_t:.0f} s), "
                    f"not accepted {accepted.not_accepted}, RSS {rss[-1][2] / 1024:.1f} MB, "
                    f"queue {status_line()}, load {loadavg()}")  # fmt: skip
                last_n, last_t = n, now
                next_report += args.report_s
        soak = sub.result()
        accepted.update()
        res["soak"] = soak
        res["soak_wall_s"] = soak["wall_s"]
        res["achieved_rate"] = soak["ok"] / soak["wall_s"]
        for r in pending_restart:
            r["first_250_s"] = None
        log(f"soak done: {soak['ok']} accepted in {soak['wall_s']:.1f} s = {res['achieved_rate']:.1f} msg/s; "
            f"failed {soak['failed']}, errors {soak['errors']}")  # fmt: skip
        res["rss_load_end_kb"] = sample("at the end of the load")

        # 3. drain
        t_drain = time.monotonic()
        drained = False
        while time.monotonic() - t_drain < args.drain_timeout:
            try:
                summ = d.admin("queue.summary")
                others = sum(x["counts"][0] for x in summ["domains"] if x["domain"] != "hole.test")
                others += summ.get("more_domains", 0)
            except Exception as exc:  # noqa: BLE001
                log(f"queue.summary: {exc}")
                others = -1
            if others == 0:
                drained = True
                break
            if int(time.monotonic() - t_drain) % 15 == 0:
                log(f"draining: {others} recipients outside hole.test pending; {status_line()}")
            sample()
            time.sleep(1)
        res["drain_s"] = time.monotonic() - t_drain
        res["drained"] = drained
        log(f"drain {'done' if drained else 'TIMED OUT'} after {res['drain_s']:.1f} s; queue {status_line()}")
        time.sleep(3)  # the event shipper runs every 0.5 s; the sinks flush every 0.5 s
        res["rss_end_kb"] = sample("at the end (drained)")
        res["hwm_kb"] = rss_kb(d.pid, "VmHWM")
        res["queue_end"] = d.admin("queue.summary")
        res["status_end"] = d.admin("status")
        t = time.monotonic()
        events = d.mail_log()
        res["log_rows"] = len(events)
        res["log_read_s"] = time.monotonic() - t
        log(f"mail log: {len(events)} rows in {res['log_read_s']:.1f} s")
        res["queue_after_log"] = d.admin("queue.summary")
    finally:
        rc = d.stop()
        res["daemon_rc"] = rc
        sink_stats = sinks.stop()
    res["sinks"] = sink_stats
    res["rss"] = rss
    res["total_s"] = time.monotonic() - t_begin
    verdict = check(res, accepted, events, sinks, d)
    print(report(res, verdict, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"res": res, "verdict": verdict}, indent=1, default=str))
    if args.keep:
        log(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if verdict["lost"] == 0 and res.get("drained") else 1


FINAL = ("delivered", "bounced", "expired", "suppressed", "deleted")


def check(res: dict, accepted: Accepted, events: list[dict], sinks: Sinks, d: Daemon) -> dict:
    # the sinks: recipient -> times seen; token mismatches
    seen: Counter[str] = Counter()
    times: dict[str, list[float]] = {}
    dsn = 0
    mismatched = 0
    with open(sinks.records) as f:
        for line in f:
            kind, rcpt, token, at = line.rstrip("\n").split("\t")
            if kind == "dsn":
                dsn += 1
                continue
            seen[rcpt] += 1
            times.setdefault(rcpt, []).append(float(at))
            if token != str(number_of(rcpt)):
                mismatched += 1
    # the mail log: (queue id, recipient) -> final event, and whether any event at all
    final: dict[tuple[str, str], str] = {}
    logged: set[tuple[str, str]] = set()
    for e in events:
        key = (e.get("queue_id") or "", (e.get("rcpt") or "").lower())
        logged.add(key)
        if e.get("event") in FINAL:
            final[key] = e["event"]
    pending_hole = [0, 0]  # before and after the mail log was read (expiries happen in between)
    for j, q in enumerate((res["queue_end"], res["queue_after_log"])):
        for dom in q.get("domains", []):
            if dom["domain"] == "hole.test":
                pending_hole[j] = dom["counts"][0]
    out: Counter[str] = Counter()
    unexpected: Counter[str] = Counter()
    examples: list[str] = []
    acc_rcpts: set[str] = set()
    lost = no_final_log = 0
    for i, (qid, _t, rcpts) in accepted.msgs.items():
        for r in rcpts:
            r = r.lower()
            acc_rcpts.add(r)
            exp = expected(r)
            fin = final.get((qid, r))
            if seen[r]:
                state = "delivered"
                if fin not in (None, "delivered"):
                    unexpected[f"seen at a sink but logged {fin}"] += 1
                if fin is None:
                    no_final_log += 1
            elif fin in ("bounced", "expired", "suppressed", "deleted"):
                state = fin
            elif fin == "delivered":
                state = "lost"  # cmcd says delivered, no sink has it
            elif exp == "hole" and (qid, r) in logged:
                state = "deferred"
            else:
                state = "lost"
            out[state] += 1
            ok = {"deliver": ("delivered",), "bounce": ("bounced",), "hole": ("deferred", "expired")}[exp]
            if state == "lost":
                lost += 1
            elif state not in ok:
                unexpected[f"{exp} recipient ended {state}"] += 1
            if (state == "lost" or state not in ok) and len(examples) < 15:
                hist = " ".join(f"{e.get('event')}#{e.get('attempt')}" for e in events
                                if e.get("queue_id") == qid and (e.get("rcpt") or "").lower() == r)  # fmt: skip
                examples.append(f"msg {i} qid {qid} rcpt {r}: {state} (log: {hist or 'nothing'}; at sinks {seen[r]}x)")
    dups = sum(n - 1 for n in seen.values() if n > 1)
    per_kill, not_after_kill = duplicates_per_kill(times, [r["killed_at"] for r in res["restarts"]])
    unacked = sum(1 for r in seen if r not in acc_rcpts)
    return {
        "rcpts": sum(out.values()),
        "states": dict(out),
        "lost": lost,
        "unexpected": dict(unexpected),
        "examples": examples,
        "duplicates": dups,
        "dup_rcpts": sum(1 for n in seen.values() if n > 1),
        "dups_per_kill": per_kill,
        "dups_not_after_kill": not_after_kill,
        "unacked_delivered": unacked,
        "delivered_no_log": no_final_log,
        "token_mismatch": mismatched,
        "dsn": dsn,
        "pending_hole_end": pending_hole,
        "problems": d.problems,
        "problem_count": d.problem_count,
        "problem_kinds": dict(d.problem_kinds),
    }


def duplicates_per_kill(times: dict[str, list[float]], kills: list[float]) -> tuple[list[int], int]:
    """Each extra delivery of a recipient (its 2nd, 3rd, ...) is charged to the last kill before it;
    returns the counts per kill and the extra deliveries no kill preceded (a bug, never at-least-once)."""
    per_kill = [0] * len(kills)
    orphans = 0
    for seen_at in times.values():
        for t in sorted(seen_at)[1:]:
            before = [j for j, k in enumerate(kills) if k <= t]
            if before:
                per_kill[before[-1]] += 1
            else:
                orphans += 1
    return per_kill, orphans


def report(res: dict, v: dict, args: argparse.Namespace) -> str:
    mb = lambda kb: f"{kb / 1024:.1f} MB"  # noqa: E731
    rss = res["rss"]
    peak = max(rss, key=lambda x: x[2]) if rss else (0, 0, 0)
    st = v["states"]
    rows = [
        (f"intake capacity (unpaced, {args.sessions} sessions, {res['capacity']['wall_s']:.0f} s)",
         f"{res['capacity_rate']:.1f} msg/s ({res['capacity']['ok']} accepted)"),
        ("target rate", f"{res['target_rate']:.1f} msg/s" + (" (--rate)" if args.rate else " (70% of capacity)")),
        ("achieved rate (soak)", f"{res['achieved_rate']:.1f} msg/s over {res['soak_wall_s']:.0f} s"),
        ("messages accepted (250 with queue id)", f"{res['capacity']['ok'] + res['soak']['ok']} "
         f"(capacity {res['capacity']['ok']}, soak {res['soak']['ok']})"),
        ("messages not accepted", f"{res['capacity']['failed'] + res['soak']['failed']} "
         f"(errors {res['soak']['errors']})"),
        ("recipients accepted", str(v["rcpts"])),
        ("  delivered (seen at a sink)", str(st.get("delivered", 0))),
        ("  bounced (5xx, final log event)", str(st.get("bounced", 0))),
        ("  deferred (hole.test, still queued)", f"{st.get('deferred', 0)} (hole.test in the queue before/after the log was read: "
         f"{v['pending_hole_end'][0]}/{v['pending_hole_end'][1]})"),
        ("  expired (hole.test)", str(st.get("expired", 0))),
        ("  LOST", str(v["lost"])),
        ("  in an unexpected final state", str(sum(v["unexpected"].values())) +
         (f" {v['unexpected']}" if v["unexpected"] else "")),
        ("duplicates at the sinks", f"{v['duplicates']} extra copies of {v['dup_rcpts']} recipients"),
        ("duplicates per kill", f"{v['dups_per_kill']} (not after any kill: {v['dups_not_after_kill']})"),
        ("possible duplicates counted at each restart", str([r.get("possible_duplicates") for r in res["restarts"]])
         + " (recipients in flight at the kill, cmcctl status)"),
        ("outcome commit window, last process", str(res.get("status_end", {}).get("outcome_commit_ms", {}))
         + " (remote 250 to the outcome committed, ms)"),
        ("delivered without a 250 to the client", str(v["unacked_delivered"])),
        ("seen at a sink, no final mail-log event", str(v["delivered_no_log"])),
        ("token mismatches at the sinks", str(v["token_mismatch"])),
        ("DSNs received (bounces + expiries)", str(v["dsn"])),
        ("sink replies", f"flaky 4xx {res['sinks'].get('r4xx', {})}, strict 5xx {res['sinks'].get('r5xx', {})}, "
         f"hole connections {res['sinks'].get('conns', {}).get('hole', 0)}"),
        ("RSS idle after start-up", mb(res["rss_idle_kb"])),
        ("RSS start (after warm-up)", mb(res["rss_start_kb"])),
        ("RSS end of load / after drain", f"{mb(res['rss_load_end_kb'])} / {mb(res['rss_end_kb'])} "
         f"(process {len(res['restarts']) + 1}, VmHWM {mb(res['hwm_kb'])})"),
        ("RSS peak (sampled)", f"{mb(peak[2])} (process {peak[1]})"),
        ("drain time", f"{res['drain_s']:.1f} s" + ("" if res["drained"] else " (TIMED OUT)")),
        ("restarts (kill -9)", str(len(res["restarts"]))),
    ]  # fmt: skip
    for r in res["restarts"]:
        f250 = "never" if r.get("first_250_s") is None else f"{r['first_250_s']:.2f} s"
        rows.append((f"  restart {r['n']} at +{r['at_s']:.0f} s",
                     f"ready {r['ready_s']:.2f} s, first 250 {f250} after the kill; RSS "
                     f"{mb(r['rss_before_kb'])} before, {mb(r['rss_after_kb'])} just after"))  # fmt: skip
    rows.append(("mail log rows read", f"{res['log_rows']} in {res['log_read_s']:.1f} s"))
    rows.append(("daemon warnings/errors logged", f"{v['problem_count']} {v['problem_kinds']}"))
    rows.append(("daemon exit status at SIGTERM", str(res["daemon_rc"])))
    w = max(len(a) for a, _ in rows)
    lines = ["", "RESULT" + ("  ZERO LOSS" if v["lost"] == 0 else f"  {v['lost']} LOST"), "-" * (w + 40)]
    lines += [f"{a.ljust(w)}  {b}" for a, b in rows]
    # RSS over time, one line per minute-ish
    if rss:
        t0 = rss[0][0]
        step = max(1, len(rss) // 20)
        lines.append("RSS samples (s since start: MB [process]): " + ", ".join(
            f"{t - t0:.0f}: {kb / 1024:.0f} [{g}]" for t, g, kb in rss[::step]))  # fmt: skip
    for e in v["examples"]:
        lines.append("  e.g. " + e)
    for p in v["problems"][:10]:
        lines.append("  daemon: " + p)
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="soak duration (default 30)")
    ap.add_argument("--rate", type=float, default=0.0, help="msg/s during the soak (default: 70%% of capacity)")
    ap.add_argument("--sessions", type=int, default=20, help="parallel submission sessions (default 20)")
    ap.add_argument("--kills", type=int, default=3, help="kill -9 + restart this many times, evenly spread (3)")
    ap.add_argument("--quick", action="store_true", help="smoke check: 2 minutes, 15 s capacity, lifetime 120s")
    ap.add_argument("--capacity-s", type=float, default=25.0, help="unpaced capacity measurement (25 s)")
    ap.add_argument("--lifetime", default="10m", help="delivery.max_lifetime (hole.test mail expires; 10m)")
    ap.add_argument("--drain-timeout", type=float, default=900.0, help="wait at most this long to drain (900 s)")
    ap.add_argument("--size", type=int, default=4096, help="message body size in bytes (4096)")
    ap.add_argument("--report-s", type=float, default=60.0, help="progress line interval (60 s)")
    ap.add_argument("--workers", type=int, default=0, help="cmcd's [server] workers (default: unset, cmcd's default)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (daemon.log, spool)")
    ap.add_argument("--json", default="", help="also write the numbers to this file")
    ap.add_argument("--sink-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--submit-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sink_worker:
        sink_worker()
        return 0
    if args.submit_worker:
        submit_worker()
        return 0
    if args.quick:
        args.minutes, args.capacity_s, args.lifetime, args.report_s = 2.0, 15.0, "120s", 20.0
        args.drain_timeout = min(args.drain_timeout, 300.0)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
