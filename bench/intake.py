#!/usr/bin/env python3
"""Intake benchmark: cmcd against a real Postfix, side by side, interleaved, medians.

    .venv/bin/python bench/intake.py [--messages N] [--concurrency K] [--runs R] [--profile]

Per round (R rounds, default 3; the order of the systems rotates each round):

(a) cmcd over STARTTLS + AUTH PLAIN: K concurrent sessions (a separate client process,
    raw asyncio streams on uvloop), each keeping one connection and sending 4 KB messages
    back to back (next MAIL after the 250 for DATA), N messages in all. Per message the
    time from writing the end-of-data "." to reading the 250 is recorded (p50/p90/p99/max).
(p) (a) paced, open loop: the same K sessions together offer --rate msg/s (default 600);
    message i is planned at t0 + i/rate whatever the replies so far, and goes out on the
    first free session at that time (late, and counted as behind schedule, when none is).
(b) cmcd with Postfix's smtp-source (20 sessions, one connection per message, HELO, no
    TLS, no AUTH) through an IP credential against cmcd's plain submission listener.
(c) the same smtp-source load against the system Postfix on a loopback port.

Every cmcd run is a fresh daemon in a fresh temporary directory ([server] workers from
--workers, else cmcd's default); each run prints the CPU of the supervisor and of every worker
process over the load, and the share of the machine's cores used (Postfix: its total).
cmcd's delivery is held: all domains are routed to a closed loopback port, so nothing
leaves, and each accepted message stays in its spool shard (SPOOL/queue*.db), where the
benchmark counts it. Postfix is held the same way by default (`defer_transports = smtp`);
`--postfix-mode relay` relays it to smtp-sink instead, `--postfix-mode hold` puts every
message on the hold queue.

Network: loopback only. Postfix never looks anything up in DNS (smtpd_peername_lookup =
no, smtp_dns_support_level = disabled, relayhost in brackets); cmcd's resolver points at a
closed loopback port. /etc/postfix/main.cf and master.cf are restored and Postfix stopped
at the end, also on error.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import fcntl
import json
import os
import re
import resource
import shutil
import signal
import socket
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
CLK_TCK = os.sysconf("SC_CLK_TCK")
sys.path.insert(0, str(ROOT / "bench"))

import proctree  # noqa: E402  (bench/proctree.py: CPU per process of a tree)

SENDER = "sender@bench.test"
RCPT = "rcpt@dst.test"
USER = "sender1"
PASSWORD = "bench-password-1"
MSG_SIZE = 4096
LATE_S = 0.010  # paced (p): a message whose MAIL went out this much after its planned time is behind schedule

POSTFIX_DIR = Path("/etc/postfix")
POSTFIX_LOG = Path("/var/log/postfix-bench.log")
POSTFIX_SPOOL = Path("/var/spool/postfix")
POSTFIX_LOCK = Path("/run/lock/cmcd-system-postfix.lock")  # tests/peers.py's: whoever holds it owns the system Postfix


# ---------------------------------------------------------------------------------------
# small helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git_state() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--short", "--", "cmcd"], capture_output=True, text=True, timeout=10
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"commit {head}" + (f" + {len(dirty)} uncommitted file(s) under cmcd/" if dirty else "")


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s") from None
            time.sleep(0.05)


def proc_cpu(pid: int, children: bool = True) -> float:
    """CPU seconds of PID (utime+stime, plus reaped children's cutime+cstime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is state (field 3); utime=14, stime=15, cutime=16, cstime=17
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def proc_status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def tree_status_kb(root: int, key: str) -> int:
    """KEY (VmRSS, VmHWM) summed over ROOT and its descendants: cmcd's supervisor and its workers."""
    total = 0
    for pid in proc_children_tree(root):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += proc_status_kb(pid, key)
    return total


def proc_children_tree(root: int) -> list[int]:
    """ROOT and all its descendants (through /proc/<pid>/task/<tid>/children)."""
    return proctree.tree_pids(root)


def tree_cpu(root: int) -> float:
    total = 0.0
    for pid in proc_children_tree(root):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += proc_cpu(pid)
    return total


def tree_pss_kb(root: int) -> int:
    total = 0
    for pid in proc_children_tree(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def wait_cpu_idle(read_cpu, quiet: float = 0.01, interval: float = 0.5, limit: float = 15.0) -> float:
    """Poll READ_CPU() until it grows by less than QUIET seconds in INTERVAL; return it."""
    deadline = time.monotonic() + limit
    last = read_cpu()
    while time.monotonic() < deadline:
        time.sleep(interval)
        now = read_cpu()
        if now - last < quiet:
            return now
        last = now
    return last


def pct(sorted_vals: list[float], p: float) -> float:
    if not sorted_vals:
        return float("nan")
    k = min(len(sorted_vals) - 1, max(0, round(p / 100 * len(sorted_vals) + 0.5) - 1))
    return sorted_vals[k]


def make_message(i: int) -> bytes:
    """A ~4 KB message (CRLF, dot-safe), headers like smtp-source's plus a Subject."""
    head = f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: bench {i}\r\n\r\n".encode()
    lines, n = [], 1
    size = len(head)
    while size < MSG_SIZE:
        line = f"La de da de da {n}. The quick brown fox jumps over the lazy dog.\r\n".encode()
        lines.append(line)
        size += len(line)
        n += 1
    return head + b"".join(lines)


# ---------------------------------------------------------------------------------------
# (a) the client worker: runs in its own process (`intake.py --client-worker`)


class SmtpReplyError(Exception):
    def __init__(self, stage: str, reply: bytes):
        super().__init__(f"{stage}: {reply!r}")
        self.stage, self.reply = stage, reply


async def _read_reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed by server")
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            break
    return int(lines[-1][:3]), b"".join(lines)


async def _cmd(reader, writer, data: bytes, want: int, stage: str) -> bytes:
    writer.write(data)
    code, reply = await _read_reply(reader)
    if code != want:
        raise SmtpReplyError(stage, reply)
    return reply


async def _take(p: dict, state: dict) -> float | None:
    """Claim the next message: its planned send time (time.perf_counter()), or None when every message is
    taken. Saturated (rate 0): now. Paced (open loop): message i is planned at t0 + i / rate, whatever
    the replies so far; a free session sleeps until then, and a message no session was free for at its
    time starts late (the lateness is recorded)."""
    i = state["next"]
    if i >= p["messages"]:
        return None
    state["next"] = i + 1
    now = time.perf_counter()
    if not p["rate"]:
        return now
    planned = state["t0"] + i / p["rate"]
    if planned > now:
        await asyncio.sleep(planned - now)
    state["late"].append(max(time.perf_counter() - planned, 0.0))
    return planned


def _client_tls_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no CA store: the daemon's certificate is a dev one
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _raw_session(p: dict, state: dict, ready: asyncio.Event, go: asyncio.Event) -> None:
    ctx = state["tls"]
    body = make_message(0)
    mail = f"MAIL FROM:<{SENDER}>\r\n".encode()
    rcpt = f"RCPT TO:<{RCPT}>\r\n".encode()
    auth = base64.b64encode(f"\0{p['user']}\0{p['password']}".encode())
    lat = state["latencies"]
    try:
        reader, writer = await asyncio.open_connection(p["host"], p["port"])
        code, reply = await _read_reply(reader)
        if code != 220:
            raise SmtpReplyError("banner", reply)
        await _cmd(reader, writer, b"EHLO client.bench.test\r\n", 250, "EHLO")
        await _cmd(reader, writer, b"STARTTLS\r\n", 220, "STARTTLS")
        await writer.start_tls(ctx)
        await _cmd(reader, writer, b"EHLO client.bench.test\r\n", 250, "EHLO2")
        await _cmd(reader, writer, b"AUTH PLAIN " + auth + b"\r\n", 235, "AUTH")
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        state["setup_errors"].append(repr(exc))
        state["connected"] += 1
        if state["connected"] >= p["concurrency"]:
            ready.set()
        return
    state["connected"] += 1
    if state["connected"] >= p["concurrency"]:
        ready.set()
    await go.wait()
    now = time.perf_counter  # uvloop's loop.time() has only millisecond resolution
    try:
        while (planned := await _take(p, state)) is not None:
            try:
                await _cmd(reader, writer, mail, 250, "MAIL")
                await _cmd(reader, writer, rcpt, 250, "RCPT")
                await _cmd(reader, writer, b"DATA\r\n", 354, "DATA")
                t0 = now()
                writer.write(body + b".\r\n")
                code, reply = await _read_reply(reader)
                t1 = now()
                if code != 250:
                    raise SmtpReplyError("end of data", reply)
                lat.append(t1 - t0)
                state["sojourn"].append(t1 - planned)
                state["last_ok"] = t1
            except SmtpReplyError as exc:
                key = f"{exc.stage}: {exc.reply[:60].decode(errors='replace').strip()}"
                state["errors"][key] = state["errors"].get(key, 0) + 1
                if p["rset"] or exc.stage in ("RCPT", "DATA"):
                    writer.write(b"RSET\r\n")
                    await _read_reply(reader)
                if exc.reply[:1] == b"4" and p["max_errors"] and sum(state["errors"].values()) > p["max_errors"]:
                    raise
                continue
            if p["rset"]:
                await _cmd(reader, writer, b"RSET\r\n", 250, "RSET")
        writer.write(b"QUIT\r\n")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_read_reply(reader), 5)
        writer.close()
    except Exception as exc:  # noqa: BLE001
        key = f"session aborted: {exc!r}"[:120]
        state["errors"][key] = state["errors"].get(key, 0) + 1


async def _aiosmtplib_session(p: dict, state: dict, ready: asyncio.Event, go: asyncio.Event) -> None:
    import aiosmtplib  # noqa: PLC0415

    body = make_message(0)
    lat = state["latencies"]
    now = time.perf_counter
    try:
        smtp = aiosmtplib.SMTP(
            hostname=p["host"],
            port=p["port"],
            start_tls=True,
            validate_certs=False,
            local_hostname="client.bench.test",
            timeout=120,
        )
        await smtp.connect()
        await smtp.ehlo()
        await smtp.auth_plain(p["user"], p["password"])
    except Exception as exc:  # noqa: BLE001
        state["setup_errors"].append(repr(exc))
        state["connected"] += 1
        if state["connected"] >= p["concurrency"]:
            ready.set()
        return
    state["connected"] += 1
    if state["connected"] >= p["concurrency"]:
        ready.set()
    await go.wait()
    try:
        while (planned := await _take(p, state)) is not None:
            try:
                await smtp.mail(SENDER)
                await smtp.rcpt(RCPT)
                # aiosmtplib's data() is DATA + body + "." in one call: this latency includes
                # the DATA→354 round trip.
                t0 = now()
                await smtp.data(body)
                t1 = now()
                lat.append(t1 - t0)
                state["sojourn"].append(t1 - planned)
                state["last_ok"] = t1
                if p["rset"]:
                    await smtp.rset()
            except aiosmtplib.SMTPResponseException as exc:
                key = f"{exc.code} {exc.message[:60]}"
                state["errors"][key] = state["errors"].get(key, 0) + 1
                with contextlib.suppress(Exception):
                    await smtp.rset()
        with contextlib.suppress(Exception):
            await smtp.quit()
    except Exception as exc:  # noqa: BLE001
        key = f"session aborted: {exc!r}"[:120]
        state["errors"][key] = state["errors"].get(key, 0) + 1


async def _client_main(p: dict) -> dict:
    state: dict[str, Any] = {
        "next": 0,
        "t0": 0.0,
        "late": [],  # paced: per message, how late its MAIL went out after its planned time
        "sojourn": [],  # per message, planned send time (saturated: when a session took it) to 250
        "latencies": [],
        "errors": {},
        "setup_errors": [],
        "connected": 0,
        "last_ok": None,
        "tls": _client_tls_context(),
    }
    ready, go = asyncio.Event(), asyncio.Event()
    session = _raw_session if p["client"] == "raw" else _aiosmtplib_session
    t_setup = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    tasks = [asyncio.create_task(session(p, state, ready, go)) for _ in range(p["concurrency"])]
    await asyncio.wait_for(ready.wait(), 120)
    setup = time.perf_counter() - t_setup
    # tell the parent that every session is connected and authenticated; wait for its "go"
    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = state["t0"] = time.perf_counter()
    go.set()
    timed_out = False
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), p["timeout"])
    except TimeoutError:
        timed_out = True
    t_end = state["last_ok"] if state["last_ok"] else time.perf_counter()
    cpu2 = resource.getrusage(resource.RUSAGE_SELF)
    lat = sorted(state["latencies"])
    ok = len(lat)
    wall = max(t_end - t0, 1e-9)
    late = sorted(state["late"])
    sojourn = sorted(state["sojourn"])
    return {
        "ok": ok,
        "rate_offered": p["rate"],
        "late_count": sum(x >= LATE_S for x in late),
        "late_p99_ms": pct(late, 99) * 1000 if late else None,
        "late_max_ms": late[-1] * 1000 if late else None,
        "sojourn_p50_ms": pct(sojourn, 50) * 1000 if sojourn else None,
        "sojourn_p99_ms": pct(sojourn, 99) * 1000 if sojourn else None,
        "sojourn_max_ms": sojourn[-1] * 1000 if sojourn else None,
        "errors": state["errors"],
        "setup_errors": state["setup_errors"][:10],
        "setup_error_count": len(state["setup_errors"]),
        "setup_s": setup,
        "wall_s": wall,
        "msgs_per_s": ok / wall,
        "p50_ms": pct(lat, 50) * 1000 if lat else None,
        "p90_ms": pct(lat, 90) * 1000 if lat else None,
        "p99_ms": pct(lat, 99) * 1000 if lat else None,
        "max_ms": lat[-1] * 1000 if lat else None,
        "timed_out": timed_out,
        "concurrency": p["concurrency"],
        "client_cpu_setup_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
        "client_cpu_s": (cpu2.ru_utime + cpu2.ru_stime) - (cpu1.ru_utime + cpu1.ru_stime),
    }


def client_worker() -> None:
    p = json.loads(sys.stdin.readline())
    try:
        import uvloop  # noqa: PLC0415

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    result = runner(_client_main(p))
    print(json.dumps(result), flush=True)


def run_client(port: int, args: argparse.Namespace, on_ready, rate: float = 0.0) -> dict:
    """Run the (a) load in a separate process, saturated or (RATE msg/s) paced; ON_READY() is called once
    all sessions are authenticated, just before the messages start."""
    params = {
        "rate": rate,
        "host": "127.0.0.1",
        "port": port,
        "user": USER,
        "password": PASSWORD,
        "messages": args.messages,
        "concurrency": args.concurrency,
        "client": args.client,
        "rset": args.rset,
        "timeout": args.timeout,
        "max_errors": 0,
    }
    errf = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--client-worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=errf,
        text=True,
    )
    assert proc.stdin and proc.stdout
    killer = threading.Timer(args.timeout + 180, proc.kill)
    killer.start()
    try:
        proc.stdin.write(json.dumps(params) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if line.strip() == "READY":
            on_ready()
            proc.stdin.write("go\n")
            proc.stdin.flush()
        out = proc.stdout.read()
        proc.wait()
    finally:
        killer.cancel()
    if proc.returncode != 0 or not out.strip():
        errf.seek(0)
        raise RuntimeError(
            f"client worker failed (rc={proc.returncode}): {errf.read().decode(errors='replace')[-2000:]}"
        )
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------
# smtp-source / smtp-sink


def run_smtp_source(port: int, args: argparse.Namespace) -> dict:
    cmd = [
        "smtp-source",
        "-s",
        str(args.sessions),
        "-m",
        str(args.messages),
        "-l",
        str(MSG_SIZE),
        "-M",
        "bench.local",
        "-f",
        SENDER,
        "-t",
        RCPT,
        f"127.0.0.1:{port}",
    ]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=args.timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        timed_out = True
    wall = time.monotonic() - t0
    # smtp-source aborts on the first unexpected reply (it is run without -A)
    return {
        "rc": proc.returncode,
        "wall_s": wall,
        "msgs_per_s": args.messages / wall,
        "output": out.strip()[-1500:],
        "timed_out": timed_out,
        "cmd": " ".join(cmd),
    }


class SmtpSink:
    """`smtp-sink -u nobody -c 127.0.0.1:PORT 1000`; counts messages from its -c output."""

    def __init__(self, port: int):
        self.port = port
        self.count = 0
        self.proc = subprocess.Popen(
            ["smtp-sink", "-u", "nobody", "-c", f"127.0.0.1:{port}", "1000"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        wait_port(port, 10)

    def _read(self) -> None:
        assert self.proc.stdout
        buf = b""
        while True:
            chunk = self.proc.stdout.read1(65536)
            if not chunk:
                return
            buf = (buf + chunk)[-200:]
            m = re.findall(rb"mesg=(\d+)", buf)
            if m:
                self.count = int(m[-1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------------------
# (c) Postfix, system instance


class Postfix:
    def __init__(self, port: int, sink_port: int, mode: str, workdir: Path):
        self.port, self.sink_port, self.mode = port, sink_port, mode
        self.backup_dir = workdir / "postfix-backup"
        self.backed_up: dict[str, bool] = {}
        self.started = False
        self.lock_fd: int | None = None

    def _run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (rc={r.returncode}): {r.stdout}{r.stderr}")
        return r

    def running(self) -> bool:
        return self._run("postfix", "status", check=False).returncode == 0

    def master_pid(self) -> int:
        return int((POSTFIX_SPOOL / "pid" / "master.pid").read_text().split()[0])

    def _lock(self, timeout: float = 900.0) -> None:
        """Hold tests/peers.py's system-Postfix lock (a test's PostfixMx or bench/relay.py may be using it)."""
        POSTFIX_LOCK.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(POSTFIX_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout
        said = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise TimeoutError(f"someone holds {POSTFIX_LOCK} (a test's PostfixMx?)") from None
                if not said:
                    log(f"waiting for {POSTFIX_LOCK} (someone uses the system Postfix)")
                    said = True
                time.sleep(0.5)
        self.lock_fd = fd

    def setup(self) -> None:
        self._lock()
        if self.running():
            raise RuntimeError(
                "the system Postfix is already running (someone else may be using it); "
                "stop it first or skip with --systems a,b"
            )
        self.backup_dir.mkdir(parents=True, exist_ok=True)
        for name in ("main.cf", "master.cf"):
            src = POSTFIX_DIR / name
            self.backed_up[name] = src.exists()
            if src.exists():
                shutil.copy2(src, self.backup_dir / name)
        # master.cf: the packaged one (or the prototype), every inet service dropped together
        # with its continuation lines, chroot off everywhere, one smtpd on our loopback port.
        base = POSTFIX_DIR / "master.cf"
        if not base.exists():
            base = POSTFIX_DIR / "master.cf.proto"
        out, skipping = [], False
        for line in base.read_text().splitlines():
            if skipping and line[:1] in (" ", "\t") and line.strip():
                continue
            skipping = False
            if re.match(r"^\S+\s+inet\s", line):
                skipping = True
                continue
            if line and not line.startswith("#") and line[:1] not in (" ", "\t"):
                cols = line.split()
                if len(cols) >= 8:
                    cols[4] = "n"
                    line = "  ".join(cols[:8]) + ("  " + " ".join(cols[8:]) if cols[8:] else "")
            out.append(line)
        out.append(f"127.0.0.1:{self.port} inet  n  -  n  -  -  smtpd")
        (POSTFIX_DIR / "master.cf").write_text("\n".join(out) + "\n")
        (POSTFIX_DIR / "main.cf").write_text("# written by cmcd bench/intake.py; the original is restored at the end\n")
        settings = [
            "compatibility_level = 3.6",
            "myhostname = bench.local",
            "mydomain = bench.local",
            "myorigin = bench.local",
            "mydestination =",
            "relay_domains =",
            "alias_maps =",
            "alias_database =",
            "local_recipient_maps =",
            "biff = no",
            "append_dot_mydomain = no",
            "inet_interfaces = 127.0.0.1",
            "inet_protocols = ipv4",
            "mynetworks = 127.0.0.0/8",
            "smtpd_relay_restrictions = permit_mynetworks, reject",
            f"relayhost = [127.0.0.1]:{self.sink_port}",
            "smtpd_peername_lookup = no",
            "smtp_dns_support_level = disabled",
            "smtputf8_enable = no",
            f"maillog_file = {POSTFIX_LOG}",
        ]
        if self.mode == "defer":
            settings.append("defer_transports = smtp")
        elif self.mode == "hold":
            settings.append("smtpd_data_restrictions = check_client_access static:HOLD")
        self._run("postconf", "-e", *settings)
        with contextlib.suppress(OSError):
            POSTFIX_LOG.unlink()
        self._run("postfix", "check", check=False)
        self.purge()
        self._run("postfix", "start")
        self.started = True
        wait_port(self.port, 30)

    def purge(self) -> None:
        self._run("postsuper", "-d", "ALL", check=False)
        self._run("postsuper", "-d", "ALL", "deferred", check=False)

    def queued(self) -> int:
        n = 0
        for sub in ("incoming", "active", "deferred", "hold", "maildrop"):
            for _dirpath, _dirs, files in os.walk(POSTFIX_SPOOL / sub):
                n += len(files)
        return n

    def active(self) -> int:
        n = 0
        for sub in ("incoming", "active"):
            for _dirpath, _dirs, files in os.walk(POSTFIX_SPOOL / sub):
                n += len(files)
        return n

    def teardown(self) -> None:
        errors = []
        if self.started or (self.backed_up and self.running()):  # never stop someone else's Postfix
            r = self._run("postfix", "stop", check=False)
            if r.returncode != 0:
                errors.append(f"postfix stop: {r.stdout}{r.stderr}")
            with contextlib.suppress(Exception):
                self.purge()
        for name, existed in self.backed_up.items():
            dst = POSTFIX_DIR / name
            try:
                if existed:
                    shutil.copy2(self.backup_dir / name, dst)
                else:
                    dst.unlink(missing_ok=True)
            except OSError as exc:
                errors.append(f"restore {dst}: {exc}")
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None
        if errors:
            log("Postfix teardown problems: " + "; ".join(errors))
        else:
            log("Postfix stopped; /etc/postfix/main.cf and master.cf restored")


def run_postfix(pf: Postfix, sink: SmtpSink, args: argparse.Namespace) -> dict:
    pf.purge()
    deadline = time.monotonic() + 30
    while pf.queued() and time.monotonic() < deadline:
        time.sleep(0.2)
    master = pf.master_pid()
    sink0 = sink.count
    peak = {"pss": 0}
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                peak["pss"] = max(peak["pss"], tree_pss_kb(master))
            stop.wait(0.25)

    th = threading.Thread(target=sampler, daemon=True)
    cpu0 = tree_cpu(master)
    th.start()
    res = run_smtp_source(pf.port, args)
    cpu_load = tree_cpu(master)  # master + every process under it, + what they reaped
    # let qmgr finish moving the mail (deferring it, or relaying it to the sink)
    deadline = time.monotonic() + args.timeout
    if pf.mode == "relay":
        while pf.queued() and time.monotonic() < deadline:
            time.sleep(0.2)
    else:
        while pf.active() and time.monotonic() < deadline:
            time.sleep(0.2)
    cpu1 = wait_cpu_idle(lambda: tree_cpu(master))
    stop.set()
    th.join()
    accepted = sink.count - sink0 if pf.mode == "relay" else pf.queued()
    res.update(
        {
            "accepted": accepted,
            "cpu_s": cpu1 - cpu0,
            "cpu_ms_per_msg": (cpu1 - cpu0) * 1000 / max(accepted, 1),
            "cpu_load_s": cpu_load - cpu0,
            "cpu_window_s": res["wall_s"],
            "cpu_share": (cpu_load - cpu0) / max(res["wall_s"] * (os.cpu_count() or 1), 1e-9),
            "peak_mb": peak["pss"] / 1024,
        }
    )
    return res


# ---------------------------------------------------------------------------------------
# cmcd


@dataclass
class Daemon:
    proc: subprocess.Popen
    tmp: Path
    port_plain: int
    port_tls: int
    sock: Path
    spool: Path
    stderr_lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0
    ready: threading.Event = field(default_factory=threading.Event)

    def _drain(self) -> None:
        assert self.proc.stderr
        with open(self.tmp / "daemon.log", "w") as logf:
            for raw in self.proc.stderr:
                line = raw.decode(errors="replace").rstrip("\n")
                logf.write(line + "\n")
                if len(self.stderr_lines) < 200:
                    self.stderr_lines.append(line)
                if "event=ready" in line:
                    self.ready.set()
                if re.search(r"\blevel=(warn|warning|error|critical)\b|Traceback", line, re.I):
                    self.problem_count += 1
                    if len(self.problems) < 20:
                        self.problems.append(line[:300])


def start_daemon(args: argparse.Namespace, dead_port: int) -> Daemon:
    tmp = Path(tempfile.mkdtemp(prefix="cmcd-bench-"))
    tls = tmp / "tls"
    tls.mkdir()
    subprocess.run(
        [str(VENV_BIN / "python"), "-m", "cmcd.devcert", str(tls)], check=True, cwd=ROOT, capture_output=True
    )
    port_plain, port_tls = free_port(), free_port()
    spool = tmp / "spool"
    spool.mkdir()
    sock = tmp / "admin.sock"
    workers = f"workers = {args.workers}\n" if args.workers else ""
    config = f"""\
[server]
hostname = "bench.local"
{workers}
[smtp]
listen = ["127.0.0.1:{port_plain}"]
listen_tls = ["127.0.0.1:{port_tls}"]
tls_cert = "{tls / "cert.pem"}"
tls_key = "{tls / "key.pem"}"
messages_per_second = 0
messages_per_day = 0
max_connections_per_ip = 1000

[spool]
dir = "{spool}"

[store]
path = "{tmp / "cmcd.db"}"
key_file = "{tmp / "data.key"}"

[metrics]
listen = ""

[admin]
socket = "{sock}"

[dns]
# a closed loopback port: nothing here may query the machine's resolver
nameservers = ["127.0.0.1:{dead_port}"]

[delivery]
# delivery held (intake is measured alone; bench/relay.py measures the whole path), and even
# so every domain goes to a closed loopback port, so accepted mail stays queued
enabled = false

[delivery.routes]
"*" = "127.0.0.1:{dead_port}"

[backup]
dir = "{tmp / "backups"}"
key_file = "{tmp / "backup.key"}"
"""
    cfg = tmp / "cmcd.toml"
    cfg.write_text(config)
    proc = subprocess.Popen(
        [str(VENV_BIN / "cmcd"), "serve", "--config", str(cfg)],
        cwd=tmp,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    d = Daemon(proc, tmp, port_plain, port_tls, sock, spool)
    threading.Thread(target=d._drain, daemon=True).start()
    deadline = time.monotonic() + args.ready_timeout
    while not d.ready.wait(0.1):
        if proc.poll() is not None or time.monotonic() > deadline:
            time.sleep(0.3)
            stop_daemon(d)
            why = f"exited with {proc.returncode}" if proc.returncode is not None else "no event=ready"
            raise RuntimeError(
                f"cmcd serve {why} within {args.ready_timeout}s; stderr:\n"
                + "\n".join(d.stderr_lines[-30:])
                + f"\n(config: {cfg})"
            )
    provision(d)
    return d


def cmcctl(d: Daemon, *argv: str, stdin: str | None = None) -> str:
    r = subprocess.run(
        [str(VENV_BIN / "cmcctl"), "--socket", str(d.sock), *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if r.returncode != 0:
        raise RuntimeError(f"cmcctl {' '.join(argv)} failed (rc={r.returncode}): {r.stdout}{r.stderr}")
    return r.stdout


def provision(d: Daemon) -> None:
    cmcctl(d, "tenant", "add", "bench")
    cmcctl(d, "domain", "add", "bench", "bench.test")
    cmcctl(d, "user", "add", "bench", USER, "--password-stdin", stdin=PASSWORD + "\n")
    cmcctl(d, "ipcred", "add", "bench", USER, "127.0.0.1/32")


def stop_daemon(d: Daemon) -> int | None:
    if d.proc.poll() is None:
        d.proc.send_signal(signal.SIGTERM)
        try:
            d.proc.wait(45)
        except subprocess.TimeoutExpired:
            d.problems.append("daemon did not exit within 45s of SIGTERM; killed")
            d.problem_count += 1
            d.proc.kill()
            d.proc.wait()
    return d.proc.returncode


def count_spooled(spool: Path) -> int | str:
    """Rows of `messages` over every spool shard: queue.db (worker 0) and queue-<k>.db (worker k)."""
    db = spool / "queue.db"
    if not db.exists():
        return f"no {db}"
    total = 0
    for path in [db, *sorted(spool.glob("queue-*.db"))]:
        try:
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
            try:
                total += con.execute("SELECT count(*) FROM messages").fetchone()[0]
            finally:
                con.close()
        except sqlite3.Error as exc:
            return f"error: {path.name}: {exc}"
    return total


class Profiler:
    """py-spy record on the daemon (raw collapsed stacks), stopped with SIGINT."""

    def __init__(self, pid: int, out_base: Path, gil: bool):
        self.raw = out_base.with_suffix(".collapsed.txt")
        self.summary = out_base.with_suffix(".top.txt")
        pyspy = shutil.which("py-spy", path=str(VENV_BIN)) or shutil.which("py-spy")
        if not pyspy:
            subprocess.run([str(VENV_BIN / "pip"), "install", "-q", "py-spy"], check=True)
            pyspy = str(VENV_BIN / "py-spy")
        self.proc = subprocess.Popen(
            [
                pyspy,
                "record",
                "--pid",
                str(pid),
                "--rate",
                "200",
                "--nonblocking",
                "--subprocesses",  # the workers, when cmcd runs more than one process
                *(["--gil"] if gil else []),
                "--format",
                "raw",
                "-o",
                str(self.raw),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        time.sleep(1.0)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        if not self.raw.exists():
            return f"py-spy wrote nothing: {out[-1000:]}"
        text = summarize_collapsed(self.raw)
        self.summary.write_text(text)
        return text


def summarize_collapsed(path: Path, top: int = 30) -> str:
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        self_t[frames[-1]] = self_t.get(frames[-1], 0) + count
        for f in set(frames):
            incl[f] = incl.get(f, 0) + count
    out = [
        f"py-spy samples: {total} (raw stacks: {path}; load it into speedscope.app or flamegraph.pl)",
        "",
        f"top {top} by own time (leaf frame):",
    ]
    for f, c in sorted(self_t.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"  {100 * c / max(total, 1):5.1f}%  {f}")
    out += ["", f"top {top} by inclusive time:"]
    for f, c in sorted(incl.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"  {100 * c / max(total, 1):5.1f}%  {f}")
    return "\n".join(out) + "\n"


def run_cmcd(kind: str, args: argparse.Namespace, dead_port: int, profile_base: Path | None) -> dict:
    code = git_state()  # the daemon may be edited while the benchmark runs
    d = start_daemon(args, dead_port)
    pid = d.proc.pid
    res: dict[str, Any] = {"code": code}
    prof = None

    def tree_total() -> float:  # the supervisor and every worker (one process when workers = 1)
        return proctree.total_s(proctree.snapshot(pid))

    cpu_start = tree_total()
    mark: dict[str, float] = {}
    snaps: dict[str, proctree.Snapshot] = {}

    def on_ready() -> None:
        nonlocal prof
        mark["rss0"] = tree_status_kb(pid, "VmRSS")
        mark["hwm0"] = tree_status_kb(pid, "VmHWM")
        if profile_base is not None:
            prof = Profiler(pid, profile_base, args.profile_gil)  # waits a second for py-spy to attach
        snaps["0"] = proctree.snapshot(pid, threads=True)
        mark["t0"] = time.monotonic()
        mark["cpu0"] = proctree.total_s(snaps["0"])

    try:
        if kind in "ap":
            res.update(run_client(d.port_plain, args, on_ready, args.rate if kind == "p" else 0.0))
            res["sent_ok"] = res["ok"]
            res["setup_cpu_s"] = mark["cpu0"] - cpu_start
            res["rss_after_auth_mb"] = mark["rss0"] / 1024
            res["hwm_after_auth_mb"] = mark["hwm0"] / 1024
        else:
            on_ready()
            res.update(run_smtp_source(d.port_plain, args))
            res["sent_ok"] = args.messages if res["rc"] == 0 and not res["timed_out"] else "smtp-source aborted"
        # the load's window: from "go" (after the sessions' set-up) until the client (smtp-source) is done
        snap1 = proctree.snapshot(pid, threads=True)
        use = proctree.usage(snaps["0"], snap1, time.monotonic() - mark["t0"], proctree.cmcd_label)
        res["cpu_tree"] = use.to_json()
        res["cpu_describe"] = use.describe("cmcd", threads=True)
        res["cpu_share"] = use.share
        res["cpu_window_s"] = use.wall_s
        cpu0 = mark["cpu0"]
        cpu_load = proctree.total_s(snap1)
        cpu1 = wait_cpu_idle(tree_total) if d.proc.poll() is None else cpu_load
        res["cpu_s"] = cpu1 - cpu0
        res["cpu_load_s"] = cpu_load - cpu0
        if prof is not None:
            res["profile"] = prof.stop()
            res["profile_files"] = [str(prof.raw), str(prof.summary)]
            prof = None
        res["peak_mb"] = tree_status_kb(pid, "VmHWM") / 1024 if d.proc.poll() is None else float("nan")
        res["rss_end_mb"] = tree_status_kb(pid, "VmRSS") / 1024 if d.proc.poll() is None else float("nan")
        res["alive_at_end"] = d.proc.poll() is None
    finally:
        if prof is not None:
            prof.stop()
        rc = stop_daemon(d)
    res["daemon_rc"] = rc
    res["spooled"] = count_spooled(d.spool)
    ok = res["sent_ok"] if isinstance(res.get("sent_ok"), int) else 0
    res["cpu_ms_per_msg"] = res["cpu_s"] * 1000 / max(ok, 1)
    res["problems"] = d.problems
    res["problem_count"] = d.problem_count
    res["tmp"] = str(d.tmp)
    if args.keep:
        log(f"kept {d.tmp}")
    else:
        shutil.rmtree(d.tmp, ignore_errors=True)
    return res


def cmcd_available() -> bool:
    exe = VENV_BIN / "cmcd"
    if not exe.exists():
        return False
    r = subprocess.run([str(exe), "serve", "--help"], capture_output=True, timeout=60)
    return r.returncode == 0


# ---------------------------------------------------------------------------------------
# driver


LABELS = {
    "a": "cmcd (a) STARTTLS+AUTH, {K} conns, reuse",
    "p": "cmcd (p) = (a) paced at {R:g}/s, open loop",
    "b": "cmcd (b) smtp-source -s {S}, IP cred",
    "c": "Postfix (c) smtp-source -s {S}, {mode}",
}


def args_k(r: dict) -> str:
    return str(r.get("concurrency", "K"))


def describe_run(kind: str, i: int, r: dict) -> str:
    if "error" in r:
        return f"  run {i + 1} {kind}: ERROR {r['error']}"
    s = f"  run {i + 1} {kind}: {r['msgs_per_s']:7.0f} msg/s  wall {r['wall_s']:6.2f}s  cpu {r['cpu_ms_per_msg']:.3f} ms/msg"
    s += f"  peak {r['peak_mb']:.1f} MB"
    if kind in "ap":
        s += f"  p50 {fmt_ms(r['p50_ms'])} p90 {fmt_ms(r.get('p90_ms'))} p99 {fmt_ms(r['p99_ms'])} ms"
        s += f" max {fmt_ms(r['max_ms'])} ms"
        s += f"  250s={r['ok']} spooled={r['spooled']}"
        s += f"  client cpu {r['client_cpu_s'] * 1000 / max(r['ok'], 1):.3f} ms/msg ({100 * r['client_cpu_s'] / r['wall_s']:.0f}% of a core)"
        s += (
            f"\n      setup: {args_k(r)} TLS+AUTH sessions in {r['setup_s']:.2f}s, daemon CPU {r['setup_cpu_s']:.2f}s;"
            f" RSS after setup {r['rss_after_auth_mb']:.1f} MB (peak so far {r['hwm_after_auth_mb']:.1f} MB),"
            f" at end {r['rss_end_mb']:.1f} MB"
        )
        if kind == "p":
            s += (
                f"\n      paced: offered {r['rate_offered']:g} msg/s, achieved {r['msgs_per_s']:.0f};"
                f" behind schedule (MAIL >= {LATE_S * 1000:.0f} ms after its planned time) {r['late_count']} of"
                f" {r['ok']}, lateness p99 {fmt_ms(r['late_p99_ms'])} max {fmt_ms(r['late_max_ms'])} ms;"
                f" planned send -> 250 p50 {fmt_ms(r['sojourn_p50_ms'])} p99 {fmt_ms(r['sojourn_p99_ms'])}"
                f" max {fmt_ms(r['sojourn_max_ms'])} ms"
            )
        if r["errors"] or r["setup_error_count"]:
            s += f"\n      errors: {r['errors']} setup_errors({r['setup_error_count']}): {r['setup_errors'][:3]}"
    elif kind == "b":
        s += f"  250s={r['sent_ok']} spooled={r['spooled']}  smtp-source rc={r['rc']}"
        if r["rc"] != 0 or r["timed_out"]:
            s += f"\n      smtp-source: {r['output'][-500:]}"
    else:
        s += f"  accepted={r['accepted']}  smtp-source rc={r['rc']}"
        if r["rc"] != 0 or r["timed_out"]:
            s += f"\n      smtp-source: {r['output'][-500:]}"
        s += (
            f"\n      Postfix CPU over {r['cpu_window_s']:.2f}s (master + children, + reaped):"
            f" {r['cpu_load_s']:.2f}s ({100 * r['cpu_load_s'] / max(r['cpu_window_s'], 1e-9):.0f}% of one core)"
            f" = {100 * r['cpu_share']:.0f}% of the {os.cpu_count()} cores"
        )
    if kind in "abp":
        s += f"\n      {r['cpu_describe']}"
        s += f"\n      cmcd code: {r.get('code', '?')}"
        if r.get("problem_count"):
            s += f"\n      daemon logged {r['problem_count']} warning/error lines, e.g.: " + " | ".join(
                r["problems"][:3]
            )
        if not r.get("alive_at_end", True):
            s += "\n      DAEMON DIED during the run"
        if r.get("daemon_rc") not in (0, None, -signal.SIGTERM):
            s += f"\n      daemon exit code {r['daemon_rc']}"
    return s


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def fmt_med(vals: list[float], fmt: str = "{:.0f}") -> str:
    if not vals:
        return "-"
    return fmt.format(statistics.median(vals))


def final_table(results: dict[str, list[dict]], args: argparse.Namespace) -> str:
    rows = [
        (
            "system",
            "msg/s median",
            "all runs",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "peak MB",
            "CPU ms/msg",
            "cores used",
            "accepted / counted",
        )
    ]
    med: dict[str, float] = {}
    for kind in args.systems:
        runs = [r for r in results[kind] if "error" not in r]
        label = LABELS[kind].format(K=args.concurrency, S=args.sessions, mode=args.postfix_mode, R=args.rate)
        rates = [r["msgs_per_s"] for r in runs]
        if rates:
            med[kind] = statistics.median(rates)
        allr = " ".join(f"{x:.0f}" for x in rates) + (
            f" (+{len(results[kind]) - len(runs)} failed)" if len(runs) < len(results[kind]) else ""
        )
        lat = {
            q: fmt_med([r[q] for r in runs if r.get(q) is not None], "{:.2f}") if kind in "ap" else "-"
            for q in ("p50_ms", "p90_ms", "p99_ms", "max_ms")
        }
        peak = fmt_med([r["peak_mb"] for r in runs], "{:.1f}")
        if kind == "c":
            peak += " (ΣPSS)"
        cpu = fmt_med([r["cpu_ms_per_msg"] for r in runs], "{:.3f}")
        share = fmt_med([100 * r["cpu_share"] for r in runs if "cpu_share" in r], "{:.0f}%")
        if kind == "c":
            check = " ".join(f"{r['accepted']}" for r in runs) + (
                " at the sink" if args.postfix_mode == "relay" else " in queue"
            )
        else:
            check = " ".join(f"{r['sent_ok']}/{r['spooled']}" for r in runs)
        rows.append((label, fmt_med(rates), allr, *lat.values(), peak, cpu, share, check))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(
        "accepted / counted: 250 replies seen by the client / rows of `messages` in every spool shard, per run"
        + (
            ""
            if "c" not in args.systems
            else "; Postfix: messages that reached smtp-sink"
            if args.postfix_mode == "relay"
            else "; Postfix: messages in its queue after the run"
        )
    )
    lines.append(
        f"cores used: CPU during the load / (its wall time x {os.cpu_count()} cores), cmcd: the supervisor and"
        " every worker, Postfix: master and all its children; latencies: end-of-data sent -> 250 received"
    )
    for kind in ("a", "p"):
        client = [r["client_cpu_s"] / r["wall_s"] for r in results.get(kind, []) if "error" not in r]
        if client:
            lines.append(
                f"({kind}) client process: {100 * max(client):.0f}% of one core at most (it is not the bottleneck "
                "while this stays well below 100%)"
            )
    paced = [r for r in results.get("p", []) if "error" not in r]
    if paced:
        lines.append(
            f"(p) offered {args.rate:g} msg/s; behind schedule (MAIL >= {LATE_S * 1000:.0f} ms late), per run: "
            + " ".join(f"{r['late_count']}/{r['ok']}" for r in paced)
        )
    if "c" in med:
        for kind in "ab":
            if kind in med:
                lines.append(f"ratio cmcd({kind})/Postfix: {med[kind] / med['c']:.2f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", "-n", type=int, default=20000, help="messages per run (default 20000)")
    ap.add_argument("--concurrency", "-k", type=int, default=50, help="client connections for (a) and (p) (default 50)")
    ap.add_argument("--runs", "-r", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--sessions", type=int, default=20, help="smtp-source -s for (b) and (c) (default 20)")
    ap.add_argument(
        "--systems", default="a,p,b,c", help="which of a,p,b,c to run (default all; p is (a) paced, open loop)"
    )
    ap.add_argument(
        "--rate", type=float, default=600.0, help="(p): msg/s the K sessions together offer, open loop (default 600)"
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=0,
        help="cmcd's [server] workers (default: the key unset, so cmcd's own default applies)",
    )
    ap.add_argument(
        "--postfix-mode",
        choices=("defer", "relay", "hold"),
        default="defer",
        help="Postfix delivery: defer_transports=smtp (default), relay to smtp-sink, or hold queue",
    )
    ap.add_argument("--client", choices=("raw", "aiosmtplib"), default="raw", help="client for (a) (default raw)")
    ap.add_argument("--rset", action="store_true", help="(a): send RSET after every message")
    ap.add_argument(
        "--timeout", type=float, default=0.0, help="per-run load timeout in s (default 60 + N/min(40, rate))"
    )
    ap.add_argument("--ready-timeout", type=float, default=30.0, help="wait for event=ready (default 30s)")
    ap.add_argument(
        "--profile",
        nargs="?",
        const="a",
        choices=("a", "p", "b"),
        help="py-spy the daemon (every process) during the first (a) run (or the first (p) or (b) run)",
    )
    ap.add_argument("--profile-gil", action="store_true", help="py-spy --gil: sample only the thread holding the GIL")
    ap.add_argument("--profile-out", default="", help="profile output base path (default /tmp/cmcd-intake-profile-TS)")
    ap.add_argument("--keep", action="store_true", help="keep the daemons' temporary directories")
    ap.add_argument("--json", default="", help="also write all results to this JSON file")
    ap.add_argument("--client-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client_worker:
        client_worker()
        return 0
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not set(args.systems) <= {"a", "p", "b", "c"} or not args.systems:
        ap.error("--systems takes a comma-separated subset of a,p,b,c")
    if args.rate <= 0:
        ap.error("--rate must be > 0")
    if args.workers < 0:
        ap.error("--workers must be >= 1")
    if not args.timeout:
        args.timeout = 60 + args.messages / min(40.0, args.rate)
    if os.geteuid() != 0 and "c" in args.systems:
        ap.error("(c) configures the system Postfix: run as root, or pass --systems a,b")
    if any(k in args.systems for k in "abp") and not cmcd_available():
        ap.error(f"{VENV_BIN / 'cmcd'} serve --help does not work yet: cmcd is not installed or not finished")

    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    print(
        f"# cmcd intake benchmark, {started}; N={args.messages} messages of {MSG_SIZE} B, K={args.concurrency}, "
        f"smtp-source -s {args.sessions}, {args.runs} interleaved runs, systems {','.join(args.systems)}"
    )
    print(f"# cmcd code: {git_state()}")
    print(f"# host: {os.cpu_count()} CPUs, {os.uname().release}; Python {sys.version.split()[0]}; client {args.client}")
    print(
        "# cmcd workers: "
        + (
            f"{args.workers} ([server] workers = {args.workers})"
            if args.workers
            else f"[server] workers unset: cmcd's default (os.cpu_count() = {os.cpu_count()})"
        )
        + "; each run prints the processes it found and their CPU"
        + (f"; (p) paced at {args.rate:g} msg/s" if "p" in args.systems else "")
    )
    print(
        "# cmcd delivery held (routes to a closed loopback port); Postfix mode: "
        + {
            "defer": "acceptance, delivery held with defer_transports = smtp",
            "relay": "relaying to smtp-sink; msg/s is acceptance (N / smtp-source wall time)",
            "hold": "acceptance, every message put on the hold queue",
        }[args.postfix_mode]
        + f"; Postfix logs to {POSTFIX_LOG}"
    )
    print(
        "# CPU ms/msg: daemon CPU from the start of the load until it is idle again; "
        "Postfix: master + all its children. Peak MB: cmcd VmHWM, Postfix peak sum of PSS",
        flush=True,
    )

    def on_term(signum, frame):  # noqa: ARG001 - so that the finally below restores Postfix
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    workdir = Path(tempfile.mkdtemp(prefix="cmcd-bench-main-"))
    dead_port = free_port()  # never listened on
    results: dict[str, list[dict]] = {k: [] for k in args.systems}
    pf = sink = None
    profiled = args.profile is None
    profile_base = Path(args.profile_out or f"/tmp/cmcd-intake-profile-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        if "c" in args.systems:
            sink = SmtpSink(free_port())
            pf = Postfix(free_port(), sink.port, args.postfix_mode, workdir)
            pf.setup()
            log(f"Postfix smtpd on 127.0.0.1:{pf.port}, relayhost smtp-sink on 127.0.0.1:{sink.port}")
        for i in range(args.runs):
            order = args.systems[i % len(args.systems) :] + args.systems[: i % len(args.systems)]
            for kind in order:
                log(f"round {i + 1}/{args.runs}: {kind} (load average {loadavg()})")
                try:
                    if kind == "c":
                        assert pf is not None and sink is not None
                        r = run_postfix(pf, sink, args)
                    else:
                        pb = None
                        if kind == args.profile and not profiled:
                            pb, profiled = profile_base, True
                        r = run_cmcd(kind, args, dead_port, pb)
                except Exception as exc:  # noqa: BLE001 - one failed run does not end the benchmark
                    r = {"error": f"{type(exc).__name__}: {exc}"}
                results[kind].append(r)
                print(describe_run(kind, i, r), flush=True)
                if "profile" in r:
                    print("\n# py-spy profile of the daemon during this run:\n" + r["profile"], flush=True)
    finally:
        if pf is not None:
            pf.teardown()
        if sink is not None:
            sink.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(final_table(results, args))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"started": started, "args": vars(args), "results": results}, indent=1, default=str)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
