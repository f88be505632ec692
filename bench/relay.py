#!/usr/bin/env python3
"""Relay benchmark: cmcd and a real Postfix accepting and delivering to smtp-sink, side by side.

    .venv/bin/python bench/relay.py [--messages N] [--runs R] [--shape one|ten|mixed|all]

Both systems accept mail on a loopback port and deliver everything to Postfix's smtp-sink on
127.0.0.1; the time runs from the first submission to the last delivery the sink counted.

Shapes (each round runs the chosen shapes, each once for cmcd and once for Postfix, in an
order that alternates from round to round; the final table shows medians):

  one     N messages of 4 KB, 1 recipient (rcpt@one.test), Postfix's smtp-source -s 20
          (one connection per message, HELO, no pipelining).
  ten     N messages, 10 recipients each at 10 domains, sent by this script's own submitter
          (20 sessions, one connection per message, HELO, no pipelining, like smtp-source)
          for both systems. Two variants:
            ten/1site   t0..t9.test all routed to the one main sink (cmcd: "*" route, one site;
                        Postfix: relayhost, one destination). Postfix then puts the 10
                        recipients into ONE transaction (same next hop), cmcd makes 10 (one per
                        domain).
            ten/10site  s0..s9.test each routed to its own sink on its own port (cmcd: one route
                        and one site per domain; Postfix: transport_maps, one next hop per
                        domain). Both make 10 transactions per message.
  mixed   N messages, 1 recipient each, round robin over 100 domains: m00..m97.test (healthy,
          to the main sink), tempfail.test (a smtp-sink that answers 4xx to every RCPT and
          DATA) and blackhole.test (a TCP port that accepts and never says a word). Measured:
          the healthy recipients' end-to-end rate, next to the "one" rate of the same round.

Counting: smtp-sink -c prints a running count of messages (transactions) after every "."; a
reader thread keeps the count and the time it last changed. A run is complete when
  cmcd:    the admin socket's status says delivery.delivered == the recipients accepted for
           healthy domains (it counts recipients), and
  Postfix: its queue (incoming, active, deferred, maildrop) is empty after the submitter
           finished (mixed: the main sink counted every healthy message);
the end time is the last change of the healthy sinks' counts. After a settle period the
exact numbers are checked: per sink, transactions == expected (cmcd always; Postfix where
its batching is known), cmcd's delivered counter, Postfix's "status=sent" log lines.

CPU: from the first submission until the system is idle again (per message), and per process
from the first submission to completion: cmcd's supervisor and each worker ([server] workers from
--workers, else cmcd's default) in seconds and % of one core, and the share of the machine's cores
used (Postfix: master and all its children).

Network: loopback only. cmcd: [dns] nameservers = ["127.0.0.1:9"] (nothing listens there) and
every domain routed with [delivery.routes]. Postfix: smtp_dns_support_level = disabled,
smtpd_peername_lookup = no, relayhost and transport_maps with bracketed IP next hops.
The system Postfix is used under tests/peers.py's lock (/run/lock/cmcd-system-postfix.lock);
main.cf and master.cf are backed up the way PostfixMx does it (so a crashed run is repaired
by the next PostfixMx start) and restored at the end, also on error or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import intake  # noqa: E402  (bench/intake.py: the shared helpers)
import proctree  # noqa: E402  (bench/proctree.py: CPU per process of a tree)
from intake import VENV_BIN, free_port, git_state, loadavg, log, proc_children_tree, proc_cpu, wait_port  # noqa: E402

from cmcd.admin.client import AdminClient, AdminClientError  # noqa: E402

SENDER = "sender@bench.test"
USER = "sender1"
PASSWORD = "bench-password-1"
MSG_SIZE = 4096
SESSIONS = 20

POSTFIX_DIR = Path("/etc/postfix")
POSTFIX_SPOOL = Path("/var/spool/postfix")
POSTFIX_LOG = Path("/var/log/postfix-bench-relay.log")

ONE_DOMAIN = "one.test"
TEN1_DOMAINS = [f"t{i}.test" for i in range(10)]
TEN10_DOMAINS = [f"s{i}.test" for i in range(10)]
TEMPFAIL = "tempfail.test"
BLACKHOLE = "blackhole.test"
MIXED_DOMAINS = [f"m{i:02d}.test" for i in range(98)] + [TEMPFAIL, BLACKHOLE]
MIXED_HEALTHY = set(MIXED_DOMAINS[:98])


@dataclass(frozen=True)
class Shape:
    key: str
    label: str
    domains: list[str]
    rcpts_per_msg: int
    submitter: str  # "smtp-source" or "python"

    def healthy(self, domain: str) -> bool:
        return domain not in (TEMPFAIL, BLACKHOLE)


SHAPES = {
    "one": Shape("one", "one: 1 rcpt, smtp-source", [ONE_DOMAIN], 1, "smtp-source"),
    "ten1": Shape("ten1", "ten/1site: 10 rcpts at 10 domains, 1 site", TEN1_DOMAINS, 10, "python"),
    "ten10": Shape("ten10", "ten/10site: 10 rcpts at 10 domains, 10 sites", TEN10_DOMAINS, 10, "python"),
    "mixed": Shape("mixed", "mixed: 1 rcpt, 100 domains, 1 tempfail + 1 blackhole", MIXED_DOMAINS, 1, "python"),
}


# ---------------------------------------------------------------------------------------
# CPU accounting


def tree_snapshot(root: int) -> dict[int, tuple[str, float, float]]:
    """pid -> (comm, own CPU s, reaped children's CPU s) for ROOT and its descendants."""
    snap: dict[int, tuple[str, float, float]] = {}
    for pid in proc_children_tree(root):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{pid}/stat") as f:
                raw = f.read()
            comm = raw[raw.index("(") + 1 : raw.rindex(")")]
            fields = raw.rsplit(")", 1)[1].split()
            own = (int(fields[11]) + int(fields[12])) / intake.CLK_TCK
            kids = (int(fields[13]) + int(fields[14])) / intake.CLK_TCK
            snap[pid] = (comm, own, kids)
    return snap


def tree_split(
    before: dict[int, tuple[str, float, float]], after: dict[int, tuple[str, float, float]]
) -> dict[str, float]:
    """CPU seconds spent between two snapshots, by process name; "(exited)" is what processes that ended
    in between used (as the reaped-children time of their parents)."""
    out: dict[str, float] = {}
    for pid, (comm, own, kids) in after.items():
        b_own, b_kids = (before[pid][1], before[pid][2]) if pid in before and before[pid][0] == comm else (0.0, 0.0)
        out[comm] = out.get(comm, 0.0) + own - b_own
        if kids - b_kids > 0:
            out["(exited)"] = out.get("(exited)", 0.0) + kids - b_kids
    return {k: v for k, v in out.items() if v > 0.005}


def tree_total(snap: dict[int, tuple[str, float, float]]) -> float:
    return sum(own + kids for _, own, kids in snap.values())


# ---------------------------------------------------------------------------------------
# the python submitter: runs in its own process (`relay.py --submit-worker`)


def recipients_for(i: int, domains: list[str], k: int) -> list[str]:
    """Message I's recipients: K consecutive domains of DOMAINS, starting at I*K (round robin)."""
    n = len(domains)
    return [f"r{i}.{j}@{domains[(i * k + j) % n]}" for j in range(k)]


def filler(size: int) -> bytes:
    lines, n, total = [], 1, 0
    while total < size:
        line = f"La de da de da {n}. The quick brown fox jumps over the lazy dog.\r\n".encode()
        lines.append(line)
        total += len(line)
        n += 1
    return b"".join(lines)


async def _reply(reader: asyncio.StreamReader) -> int:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed by server")
        if len(line) < 4 or line[3:4] != b"-":
            return int(line[:3])


async def _submit_session(p: dict, st: dict) -> None:
    body = filler(MSG_SIZE)
    helo = b"HELO submit.bench.local\r\n"
    mail = f"MAIL FROM:<{SENDER}>\r\n".encode()
    while st["next"] < p["messages"]:
        i = st["next"]
        st["next"] += 1
        rcpts = recipients_for(i, p["domains"], p["rcpts"])
        writer = None
        try:
            reader, writer = await asyncio.open_connection(p["host"], p["port"])
            if await _reply(reader) != 220:
                raise RuntimeError("banner")
            writer.write(helo)
            if await _reply(reader) != 250:
                raise RuntimeError("HELO")
            writer.write(mail)
            code = await _reply(reader)
            if code != 250:
                raise RuntimeError(f"MAIL {code}")
            ok = []
            for r in rcpts:
                writer.write(f"RCPT TO:<{r}>\r\n".encode())
                code = await _reply(reader)
                if code == 250:
                    ok.append(r)
                else:
                    st["errors"][f"RCPT {code}"] = st["errors"].get(f"RCPT {code}", 0) + 1
            if ok:
                writer.write(b"DATA\r\n")
                code = await _reply(reader)
                if code != 354:
                    raise RuntimeError(f"DATA {code}")
                head = f"From: <{SENDER}>\r\nTo: <{rcpts[0]}>\r\nSubject: relay bench {i}\r\n\r\n".encode()
                writer.write(head + body + b".\r\n")
                code = await _reply(reader)
                if code != 250:
                    raise RuntimeError(f"end of data {code}")
                st["ok"] += 1
                for r in ok:
                    d = r.rsplit("@", 1)[1]
                    st["accepted"][d] = st["accepted"].get(d, 0) + 1
                st["last_ok"] = time.monotonic()
            writer.write(b"QUIT\r\n")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(_reply(reader), 5)
        except Exception as exc:  # noqa: BLE001 - counted, the session goes on with the next message
            key = f"{type(exc).__name__}: {exc}"[:100]
            st["errors"][key] = st["errors"].get(key, 0) + 1
        finally:
            if writer is not None:
                writer.close()


async def _submit_main(p: dict) -> dict:
    st: dict[str, Any] = {"next": 0, "ok": 0, "accepted": {}, "errors": {}, "last_ok": None}
    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    await asyncio.gather(*(_submit_session(p, st) for _ in range(p["sessions"])))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    end = st["last_ok"] or time.monotonic()
    return {
        "ok": st["ok"],
        "accepted": st["accepted"],
        "errors": st["errors"],
        "t0": t0,
        "wall_s": max(end - t0, 1e-9),
        "cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
    }


def submit_worker() -> None:
    p = json.loads(sys.stdin.readline())
    try:
        import uvloop  # noqa: PLC0415

        result = uvloop.run(_submit_main(p))
    except ImportError:  # pragma: no cover
        result = asyncio.run(_submit_main(p))
    print(json.dumps(result), flush=True)


def run_python_submitter(port: int, shape: Shape, args: argparse.Namespace, on_go) -> dict:
    params = {
        "host": "127.0.0.1",
        "port": port,
        "messages": args.messages,
        "domains": shape.domains,
        "rcpts": shape.rcpts_per_msg,
        "sessions": args.sessions,
    }
    errf = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--submit-worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=errf,
        text=True,
    )
    assert proc.stdin and proc.stdout
    killer = threading.Timer(args.timeout, proc.kill)
    killer.start()
    try:
        proc.stdin.write(json.dumps(params) + "\n")
        proc.stdin.flush()
        if proc.stdout.readline().strip() == "READY":
            on_go()
            proc.stdin.write("go\n")
            proc.stdin.flush()
        out = proc.stdout.read()
        proc.wait()
    finally:
        killer.cancel()
    if proc.returncode != 0 or not out.strip():
        errf.seek(0)
        raise RuntimeError(f"submitter failed (rc={proc.returncode}): {errf.read().decode(errors='replace')[-2000:]}")
    res = json.loads(out.strip().splitlines()[-1])
    res["cmd"] = f"python submitter, {args.sessions} sessions, {shape.rcpts_per_msg} rcpt(s)/msg"
    return res


def run_smtp_source(port: int, shape: Shape, args: argparse.Namespace, on_go) -> dict:
    cmd = [
        "smtp-source", "-s", str(args.sessions), "-m", str(args.messages), "-l", str(MSG_SIZE),
        "-M", "submit.bench.local", "-f", SENDER, "-t", f"rcpt@{shape.domains[0]}", f"127.0.0.1:{port}",
    ]  # fmt: skip
    out = tempfile.TemporaryFile()
    on_go()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    killer = threading.Timer(args.timeout, proc.kill)
    killer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        killer.cancel()
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    text = out.read().decode(errors="replace").strip()
    ok = args.messages if proc.returncode == 0 else 0  # smtp-source stops at the first unexpected reply
    return {
        "ok": ok,
        "accepted": {shape.domains[0]: ok},
        "errors": {} if proc.returncode == 0 else {f"smtp-source rc={proc.returncode}: {text[-300:]}": 1},
        "t0": t0,
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "cmd": " ".join(cmd),
    }


def submit(port: int, shape: Shape, args: argparse.Namespace, on_go) -> dict:
    if shape.submitter == "smtp-source":
        return run_smtp_source(port, shape, args, on_go)
    return run_python_submitter(port, shape, args, on_go)


# ---------------------------------------------------------------------------------------
# the receiving side: smtp-sink processes and a black hole


class Sink:
    """`smtp-sink -u nobody -c [EXTRA] 127.0.0.1:PORT 1000`; .count (messages, from its -c counter) and
    .changed (time.monotonic() when the count last grew)."""

    def __init__(self, name: str, extra: tuple[str, ...] = ()):
        self.name = name
        self.port = free_port()
        self.count = 0
        self.changed = 0.0
        self.proc = subprocess.Popen(
            ["smtp-sink", "-u", "nobody", "-c", *extra, f"127.0.0.1:{self.port}", "1000"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        threading.Thread(target=self._read, daemon=True).start()
        wait_port(self.port, 10)

    def _read(self) -> None:
        assert self.proc.stdout
        fd = self.proc.stdout.fileno()
        pending = b""
        while chunk := os.read(fd, 65536):
            now = time.monotonic()
            *records, pending = re.split(rb"[\r\n]", pending + chunk)
            for rec in reversed(records):  # the newest complete record with a count
                m = re.search(rb"mesg=(\d+)", rec)
                if m:
                    n = int(m.group(1))
                    if n != self.count:
                        self.count, self.changed = n, now
                    break

    def cpu(self) -> float:
        try:
            return proc_cpu(self.proc.pid)
        except OSError:
            return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class BlackHole:
    """Accepts TCP connections on 127.0.0.1:PORT and never answers; restart() drops every connection
    (so that no client stays stuck on it into the next run)."""

    def __init__(self) -> None:
        from tests.peers import BlackHole as _BlackHole  # noqa: PLC0415

        self.port = free_port()
        self._impl = _BlackHole("127.0.0.1", self.port).start()

    @property
    def connections(self) -> int:
        return self._impl.connections

    def restart(self) -> None:
        from tests.peers import BlackHole as _BlackHole  # noqa: PLC0415

        self._impl.stop()
        self._impl = _BlackHole("127.0.0.1", self.port).start()

    def stop(self) -> None:
        self._impl.stop()


@dataclass
class Peers:
    main: Sink
    split: list[Sink]
    tempfail: Sink
    blackhole: BlackHole

    def sinks_for(self, shape: Shape) -> dict[str, Sink]:
        """domain -> the sink its mail goes to (none for the black hole)."""
        out = {}
        for d in shape.domains:
            if d in TEN10_DOMAINS:
                out[d] = self.split[TEN10_DOMAINS.index(d)]
            elif d == TEMPFAIL:
                out[d] = self.tempfail
            elif d != BLACKHOLE:
                out[d] = self.main
        return out

    def all(self) -> list[Sink]:
        return [self.main, *self.split, self.tempfail]

    def routes(self) -> dict[str, str]:
        """The routes both systems use: domain (or "*") -> 127.0.0.1:PORT."""
        r = {"*": f"127.0.0.1:{self.main.port}"}
        for d, s in zip(TEN10_DOMAINS, self.split, strict=True):
            r[d] = f"127.0.0.1:{s.port}"
        r[TEMPFAIL] = f"127.0.0.1:{self.tempfail.port}"
        r[BLACKHOLE] = f"127.0.0.1:{self.blackhole.port}"
        return r

    def stop(self) -> None:
        for s in self.all():
            s.stop()
        self.blackhole.stop()


# ---------------------------------------------------------------------------------------
# cmcd


class Daemon:
    def __init__(self, tmp: Path, proc: subprocess.Popen):
        self.tmp, self.proc = tmp, proc
        self.smtp_port = 0
        self.ready = threading.Event()
        self.problems: list[str] = []
        self.problem_count = 0
        self.lines: list[str] = []
        self.dkim = ""  # the selectors domain.add made (cmcd signs with them)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr
        with open(self.tmp / "daemon.log", "w") as logf:
            for raw in self.proc.stderr:
                line = raw.decode(errors="replace").rstrip("\n")
                logf.write(line + "\n")
                if len(self.lines) < 200:
                    self.lines.append(line)
                if "event=ready" in line:
                    m = re.search(r" smtp=\S+:(\d+)", line)
                    self.smtp_port = int(m.group(1)) if m else 0
                    self.ready.set()
                if re.search(r"\blevel=(warn|warning|error|critical)\b|Traceback", line, re.I):
                    self.problem_count += 1
                    if len(self.problems) < 20:
                        self.problems.append(line[:300])
        self.ready.set()

    def admin(self, verb: str, **args: Any) -> Any:
        try:
            return AdminClient(self.tmp / "admin.sock", timeout_s=30).call(verb, **args)
        except AdminClientError as exc:
            raise RuntimeError(f"admin {verb}: {exc}") from None

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(45)
            except subprocess.TimeoutExpired:
                self.problems.append("daemon did not exit within 45s of SIGTERM; killed")
                self.problem_count += 1
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def toml_str(s: str) -> str:
    return json.dumps(s)


def daemon_toml(
    tmp: Path,
    tls_dir: Path,
    *,
    hostname: str,
    delivery: str,
    routes: dict[str, str],
    smtp_listen: str = "127.0.0.1:0",
    smtps_listen: str | None = "127.0.0.1:0",
    api: bool = False,
    nameserver: str = "127.0.0.1:9",
    comment: str = "every domain is routed",
    workers: int | None = None,
    metrics_listen: str = "",
) -> str:
    """A benchmark daemon's configuration, everything under TMP and on loopback: limits off,
    metrics off unless METRICS_LISTEN ("host:port"), DNS at NAMESERVER (where nothing answers),
    DELIVERY ("key = value" lines) and ROUTES (domain -> "host:port") for [delivery]; [server]
    workers = WORKERS when given (else the key is left out and cmcd's default applies). Shared by
    relay.py, api.py, soak.py and store_contention.py."""
    q = toml_str
    workers_line = f"workers = {workers}\n" if workers else ""
    route_lines = "".join(f"{q(d)} = {q(t)}\n" for d, t in routes.items())
    smtps = f"listen_tls = [{q(smtps_listen)}]" if smtps_listen else "listen_tls = []"
    api_section = '\n[api]\nlisten = "127.0.0.1:0"\n' if api else ""
    return f"""\
[server]
hostname = {q(hostname)}
shutdown_grace = "5s"
{workers_line}
[smtp]
listen = [{q(smtp_listen)}]
{smtps}
tls_cert = {q(str(tls_dir / "cert.pem"))}
tls_key = {q(str(tls_dir / "key.pem"))}
messages_per_second = 0
messages_per_day = 0
max_connections_per_ip = 1000
{api_section}
[spool]
dir = {q(str(tmp / "spool"))}

[store]
path = {q(str(tmp / "cmcd.db"))}
key_file = {q(str(tmp / "data.key"))}

[metrics]
listen = {q(metrics_listen)}

[admin]
socket = {q(str(tmp / "admin.sock"))}

[dns]
# nothing listens there: cmcd never asks the machine's resolver; {comment}
nameservers = [{q(nameserver)}]
timeout = "2s"

[backup]
dir = {q(str(tmp / "backups"))}
key_file = {q(str(tmp / "backup.key"))}

[delivery]
enabled = true
{delivery}
[delivery.routes]
{route_lines}"""


def start_cmcd(args: argparse.Namespace, peers: Peers, tls_dir: Path) -> Daemon:
    tmp = Path(tempfile.mkdtemp(prefix="cmcd-bench-relay-"))
    (tmp / "spool").mkdir()
    tuning = "".join(f"{k} = {v}\n" for k, v in args.cmcd_delivery.items())
    config = daemon_toml(
        tmp, tls_dir, hostname="relay.bench.local", delivery=tuning, routes=peers.routes(),
        comment="every domain has a static route", workers=args.workers,
    )  # fmt: skip
    cfg = tmp / "cmcd.toml"
    cfg.write_text(config)
    proc = subprocess.Popen(
        [str(VENV_BIN / "python"), "-m", "cmcd.daemon", "serve", "--config", str(cfg)],
        cwd=tmp,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    d = Daemon(tmp, proc)
    if not d.ready.wait(30) or proc.poll() is not None or not d.smtp_port:
        d.stop()
        raise RuntimeError("cmcd did not become ready:\n" + "\n".join(d.lines[-30:]) + f"\n(config: {cfg})")
    d.admin("tenant.add", name="bench")
    added = d.admin("domain.add", tenant="bench", domain="bench.test")
    d.dkim = ",".join(added.get("selectors", [])) if isinstance(added, dict) else ""
    d.admin("user.add", tenant="bench", login=USER, role="sender", password=PASSWORD)
    d.admin("ipcred.add", tenant="bench", login=USER, cidr="127.0.0.1/32")
    return d


# ---------------------------------------------------------------------------------------
# Postfix: the system instance, as a relay to the sinks


class PostfixRelay:
    def __init__(self, peers: Peers, args: argparse.Namespace):
        self.port = free_port()
        self.peers = peers
        self.args = args
        self.lock_fd: int | None = None
        self.backed_up = False
        self.started = False
        self.log_offset = 0

    @staticmethod
    def _run(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (rc={r.returncode}): {r.stdout}{r.stderr}")
        return r

    def main_cf(self, *, log_file: bool = True) -> str:
        routes = self.peers.routes()
        transport = ", ".join(
            f"{d}=smtp:[127.0.0.1]:{routes[d].rsplit(':', 1)[1]}" for d in (*TEN10_DOMAINS, TEMPFAIL, BLACKHOLE)
        )
        params = {
            "compatibility_level": "3.6",
            "myhostname": "postfix.bench.local",
            "mydomain": "bench.local",
            "myorigin": "bench.local",
            "mydestination": "",
            "relay_domains": "",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            "append_dot_mydomain": "no",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "relayhost": f"[127.0.0.1]:{self.peers.main.port}",
            "transport_maps": f"inline:{{{transport}}}",
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "lmtp_dns_support_level": "disabled",
            "smtputf8_enable": "no",
            "maillog_file": str(POSTFIX_LOG),
        }
        if not log_file:
            del params["maillog_file"]
        return "# written by cmcd bench/relay.py; the original is restored at the end\n" + "".join(
            f"{k} = {v}\n" for k, v in params.items()
        )

    def setup(self) -> None:
        from tests import peers as tp  # noqa: PLC0415

        tp.POSTFIX_LOCK.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tp.POSTFIX_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.args.lock_timeout
        said = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise TimeoutError(f"someone holds {tp.POSTFIX_LOCK} (a test's PostfixMx?)") from None
                if not said:
                    log(f"waiting for {tp.POSTFIX_LOCK} (a test uses the system Postfix)")
                    said = True
                time.sleep(0.5)
        self.lock_fd = fd
        if self._run("postfix", "status", check=False).returncode == 0 or tp._postfix_running():
            raise RuntimeError("the system Postfix is already running (someone else's?); `postfix stop` it first")
        tp._postfix_restore()  # a PostfixMx (or this benchmark) that crashed before restoring: put its config back
        main, master = POSTFIX_DIR / "main.cf", POSTFIX_DIR / "master.cf"
        backup = {
            p.name: {"text": p.read_text(), "mtime": p.stat().st_mtime} if p.exists() else None for p in (main, master)
        }
        master_src = master.read_text() if master.exists() else (POSTFIX_DIR / "master.cf.proto").read_text()
        tp._write_config(tp._POSTFIX_BACKUP, json.dumps(backup))
        self.backed_up = True
        tp._write_config(main, self.main_cf(log_file=False))
        self._run("postsuper", "-d", "ALL", check=False)  # nothing left from earlier may reach the sinks
        tp._write_config(main, self.main_cf())
        tp._write_config(master, tp._master_cf(master_src, f"127.0.0.1:{self.port}"))
        self.log_offset = POSTFIX_LOG.stat().st_size if POSTFIX_LOG.exists() else 0
        self.started = True
        self._run("postfix", "start")
        wait_port(self.port, 30)

    def master_pid(self) -> int:
        return int((POSTFIX_SPOOL / "pid" / "master.pid").read_text().split()[0])

    def purge(self) -> None:
        self._run("postsuper", "-d", "ALL", check=False)

    def queued(self) -> int:
        n = 0
        for sub in ("incoming", "active", "deferred", "maildrop", "hold"):
            for _dirpath, _dirs, files in os.walk(POSTFIX_SPOOL / sub):
                n += len(files)
        return n

    def log_tail(self) -> str:
        try:
            with POSTFIX_LOG.open("rb") as f:
                f.seek(self.log_offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def teardown(self) -> None:
        from tests import peers as tp  # noqa: PLC0415

        errors = []
        try:
            if self.started and tp._postfix_running():
                with contextlib.suppress(Exception):
                    self.purge()
                r = self._run("postfix", "stop", check=False)
                if r.returncode != 0:
                    errors.append(f"postfix stop: {r.stdout}{r.stderr}")
                with contextlib.suppress(RuntimeError):
                    tp._wait_postfix_gone(30)
            if self.backed_up:
                tp._postfix_restore()
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))
        finally:
            if self.lock_fd is not None:
                os.close(self.lock_fd)
                self.lock_fd = None
        if errors:
            log("Postfix teardown problems: " + "; ".join(errors))
        elif self.backed_up:
            log("Postfix stopped; /etc/postfix/main.cf and master.cf restored")


# ---------------------------------------------------------------------------------------
# one run


def expected_for(shape: Shape, peers: Peers, accepted: dict[str, int]) -> dict[str, Any]:
    """From the recipients accepted per domain: healthy recipients, and the transactions each sink must see
    when every (message, domain) is one transaction."""
    per_sink: dict[str, int] = {}
    healthy = 0
    sinks = peers.sinks_for(shape)
    for d, n in accepted.items():
        if shape.healthy(d):
            healthy += n
            s = sinks[d]
            per_sink[s.name] = per_sink.get(s.name, 0) + n
    return {"healthy_rcpts": healthy, "per_sink": per_sink}


def run_one(system: str, shape: Shape, peers: Peers, args: argparse.Namespace, pf: PostfixRelay | None,
            tls_dir: Path) -> dict:  # fmt: skip
    d: Daemon | None = None
    res: dict[str, Any] = {"system": system, "shape": shape.key}
    healthy_sinks = [s for dom, s in peers.sinks_for(shape).items() if shape.healthy(dom)]
    healthy_sinks = list({id(s): s for s in healthy_sinks}.values())
    try:
        if system == "cmcd":
            res["code"] = git_state()
            d = start_cmcd(args, peers, tls_dir)
            port, root_pid = d.smtp_port, d.proc.pid
            res["dkim"] = d.dkim
        else:
            assert pf is not None
            pf.purge()
            deadline = time.monotonic() + 30
            while pf.queued() and time.monotonic() < deadline:
                time.sleep(0.2)
            port, root_pid = pf.port, pf.master_pid()
            log_off = POSTFIX_LOG.stat().st_size if POSTFIX_LOG.exists() else 0
        sink0 = {s.name: s.count for s in peers.all()}
        sinkcpu0 = sum(s.cpu() for s in peers.all())
        snap0 = tree_snapshot(root_pid)
        mark: dict[str, float] = {}
        per_proc: dict[str, proctree.Snapshot] = {}

        def on_go() -> None:  # the first submission: the measured window starts
            per_proc["0"] = proctree.snapshot(root_pid, threads=system == "cmcd")
            mark.setdefault("t0", time.monotonic())

        backlog: dict[str, int] = {"max": 0}
        stop_sampler = threading.Event()

        def sampler() -> None:
            while not stop_sampler.wait(0.5):
                with contextlib.suppress(Exception):
                    if system == "cmcd":
                        assert d is not None
                        st = d.admin("status")
                        backlog["max"] = max(
                            backlog["max"],
                            st.get("accepted", 0) - st["delivery"].get("delivered", 0) // shape.rcpts_per_msg,
                        )
                    else:
                        assert pf is not None
                        backlog["max"] = max(backlog["max"], pf.queued())

        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        sub = submit(port, shape, args, on_go)
        t0 = mark["t0"]
        exp = expected_for(shape, peers, sub["accepted"])
        res["submit"] = {k: v for k, v in sub.items() if k not in ("t0",)}

        # wait until complete (or stalled)
        def progress() -> int:
            return sum(s.count for s in peers.all())

        def complete() -> bool:
            if system == "cmcd":
                assert d is not None
                st = d.admin("status")
                res["status"] = st
                return st["delivery"].get("delivered", 0) >= exp["healthy_rcpts"]
            if shape.key == "mixed":
                return peers.main.count - sink0[peers.main.name] >= exp["per_sink"].get(peers.main.name, 0)
            return pf.queued() == 0  # type: ignore[union-attr]

        last_p, last_t = progress(), time.monotonic()
        done = False
        deadline = t0 + args.timeout
        while time.monotonic() < deadline:
            if complete():
                done = True
                break
            time.sleep(0.25)
            p = progress()
            if p != last_p:
                last_p, last_t = p, time.monotonic()
            elif time.monotonic() - last_t > args.stall:
                break
        t_done = time.monotonic()
        # CPU per process over the window: first submission to completion (cmcd: supervisor and workers)
        use = proctree.usage(
            per_proc["0"],
            proctree.snapshot(root_pid, threads=system == "cmcd"),
            t_done - t0,
            proctree.cmcd_label if system == "cmcd" else proctree.comm_label,
        )
        res["cpu_window"] = use.to_json()
        res["cpu_share"] = use.share
        res["cpu_describe"] = (
            use.describe("cmcd", threads=True)
            if system == "cmcd"
            else f"Postfix CPU over {use.wall_s:.2f}s (master + children, + reaped): {use.total_s:.2f}s"
            f" ({use.core_pct(use.total_s):.0f}% of one core) = {100 * use.share:.0f}% of the {use.cpus} cores"
        )
        stop_sampler.set()
        th.join()
        end = max((s.changed for s in healthy_sinks), default=t_done)
        if not done:
            end = t_done
        wall = max(end - t0, 1e-9)
        # the system's CPU: until it is idle again (what follows the last delivery is part of the cost)
        t_idle = time.monotonic()
        intake.wait_cpu_idle(lambda: tree_total(tree_snapshot(root_pid)), limit=args.idle_limit)
        res["idle_wait_s"] = time.monotonic() - t_idle
        time.sleep(args.settle)
        snap1 = tree_snapshot(root_pid)
        split = tree_split(snap0, snap1)
        if system == "cmcd":  # the supervisor and its workers, whatever their comm says
            split = {"cmcd": sum(split.values())}
        res["cpu_s"] = sum(split.values())
        res["cpu_split"] = split
        if system == "cmcd":
            assert d is not None
            res["status"] = d.admin("status")
        res["sink_cpu_s"] = sum(s.cpu() for s in peers.all()) - sinkcpu0
        sink_delta = {s.name: s.count - sink0[s.name] for s in peers.all()}
        res.update(
            {
                "complete": done,
                "wall_s": wall,
                "submit_wall_s": sub["wall_s"],
                "submit_to_done_s": t_done - t0,
                "after_submit_s": max(end - (t0 + sub["wall_s"]), 0.0),
                "messages": sub["ok"],
                "healthy_rcpts": exp["healthy_rcpts"],
                "expected_per_sink": exp["per_sink"],
                "sinks": {k: v for k, v in sink_delta.items() if v},
                "backlog_max": backlog["max"],
                "blackhole_connections": peers.blackhole.connections,
            }
        )
        # mixed has one recipient a message: its healthy messages are its healthy recipients
        healthy_msgs = exp["healthy_rcpts"] if shape.key == "mixed" else sub["ok"]
        res["healthy_msgs"] = healthy_msgs
        res["msgs_per_s"] = healthy_msgs / wall
        res["rcpts_per_s"] = exp["healthy_rcpts"] / wall
        res["txn_per_s"] = sum(sink_delta[s.name] for s in healthy_sinks) / wall
        res["accept_per_s"] = sub["ok"] / sub["wall_s"]
        res["cpu_ms_per_msg"] = res["cpu_s"] * 1000 / max(sub["ok"], 1)
        # exact counts
        checks = []
        if system == "cmcd":
            st = res["status"]
            delivered = st["delivery"].get("delivered", 0)
            if delivered != exp["healthy_rcpts"]:
                checks.append(f"delivered {delivered} != {exp['healthy_rcpts']} recipients")
            for name, n in exp["per_sink"].items():
                got = sink_delta.get(name, 0)
                if shape.key == "ten1":  # cmcd, like Postfix, batches a message's recipients of one next hop
                    if not sub["ok"] <= got <= n:
                        checks.append(f"sink {name}: {got} transactions outside {sub['ok']}..{n}")
                elif got != n:
                    checks.append(f"sink {name}: {got} transactions != {n}")
            for k in ("bounced", "expired", "suppressed"):
                if st["delivery"].get(k):
                    checks.append(f"{k}={st['delivery'][k]}")
            if shape.key != "mixed" and st["delivery"].get("deferred"):
                checks.append(f"deferred={st['delivery']['deferred']}")
            res["delivered"] = delivered
        else:
            assert pf is not None
            sent = deferred = 0
            with contextlib.suppress(FileNotFoundError):
                with POSTFIX_LOG.open("rb") as f:
                    f.seek(log_off)
                    text = f.read()
                sent = len(re.findall(rb" status=sent ", text))
                deferred = len(re.findall(rb" status=deferred ", text))
            res["delivered"] = sent
            res["pf_deferred_log"] = deferred
            if sent != exp["healthy_rcpts"]:
                checks.append(f"log status=sent {sent} != {exp['healthy_rcpts']} recipients")
            for name, n in exp["per_sink"].items():
                got = sink_delta.get(name, 0)
                if shape.key == "ten1":  # Postfix batches the recipients of one next hop
                    if not sub["ok"] <= got <= n:
                        checks.append(f"sink {name}: {got} transactions outside {sub['ok']}..{n}")
                elif got != n:
                    checks.append(f"sink {name}: {got} transactions != {n}")
            if shape.key != "mixed" and pf.queued():
                checks.append(f"{pf.queued()} still queued")
        if sub["errors"]:
            checks.append(f"submit errors {sub['errors']}")
        if not done:
            checks.append("INCOMPLETE (timeout or stall)")
        res["checks"] = checks
    finally:
        if d is not None:
            t_stop = time.monotonic()
            rc = d.stop()
            res["stop_s"] = time.monotonic() - t_stop
            res["daemon_rc"] = rc
            res["problems"] = d.problems
            res["problem_count"] = d.problem_count
            if args.keep:
                log(f"kept {d.tmp}")
            else:
                shutil.rmtree(d.tmp, ignore_errors=True)
        if system == "postfix" and pf is not None:
            with contextlib.suppress(Exception):
                pf.purge()
        if shape.key == "mixed":
            peers.blackhole.restart()  # no client of this run stays stuck on it
    return res


# ---------------------------------------------------------------------------------------
# report


def describe(r: dict) -> str:
    if "error" in r:
        return f"    {r['system']:7} ERROR {r['error']}"
    s = (
        f"    {r['system']:7} {r['msgs_per_s']:7.0f} msg/s {r['rcpts_per_s']:7.0f} rcpt/s {r['txn_per_s']:7.0f} txn/s"
        f"  wall {r['wall_s']:6.2f}s (submit {r['submit_wall_s']:.2f}s = {r['accept_per_s']:.0f} msg/s,"
        f" last delivery +{r['after_submit_s']:.2f}s)  cpu {r['cpu_ms_per_msg']:.2f} ms/msg"
        f"  backlog max {r['backlog_max']}"
    )
    s += f"\n            delivered {r['delivered']}/{r['healthy_rcpts']} rcpts; sinks {r['sinks']}"
    cores = lambda c: f"{c:.1f}s ({100 * c / max(r['submit_to_done_s'], 1e-9):.0f}%)"  # noqa: E731
    split = ", ".join(f"{k} {cores(v)}" for k, v in sorted(r["cpu_split"].items(), key=lambda kv: -kv[1]))
    s += f"\n            CPU: {split}; submitter {cores(r['submit']['cpu_s'])}; sinks {cores(r['sink_cpu_s'])}"
    s += f"\n            {r['cpu_describe']}"
    if r["system"] == "cmcd":
        s += f"\n            idle {r['idle_wait_s']:.1f}s after the last delivery, stop took {r.get('stop_s', 0):.1f}s"
        s += f"\n            cmcd code: {r.get('code', '?')}; DKIM signing with: {r.get('dkim') or 'no keys'}"
        st = r.get("status", {})
        s += f"; status delivery={st.get('delivery')} inflight={st.get('inflight')}"
        if r.get("problem_count"):
            s += f"\n            daemon logged {r['problem_count']} warning/error lines, e.g. " + " | ".join(
                r["problems"][:3]
            )
    elif r.get("pf_deferred_log"):
        s += f"\n            Postfix log: {r['pf_deferred_log']} status=deferred lines"
    if r["shape"] == "mixed":
        s += f"\n            black hole connections so far: {r['blackhole_connections']}"
    s += "\n            check: " + ("OK" if not r["checks"] else "; ".join(r["checks"]))
    return s


def med(vals: list[float]) -> float | None:
    return statistics.median(vals) if vals else None


def final_table(results: dict[tuple[str, str], list[dict]], shapes: list[str], systems: list[str]) -> str:
    rows = [
        (
            "shape",
            "system",
            "msg/s",
            "rcpt/s",
            "txn/s",
            "all runs msg/s",
            "accept msg/s",
            "CPU ms/msg",
            "cores used",
            "checks",
        )
    ]
    meds: dict[tuple[str, str], float] = {}
    for sk in shapes:
        for sysname in systems:
            runs = [r for r in results.get((sk, sysname), []) if "error" not in r]
            failed = len(results.get((sk, sysname), [])) - len(runs)
            m = med([r["msgs_per_s"] for r in runs])
            if m is not None:
                meds[(sk, sysname)] = m
            fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
            rows.append(
                (
                    sk,
                    sysname,
                    fmt(m),
                    fmt(med([r["rcpts_per_s"] for r in runs])),
                    fmt(med([r["txn_per_s"] for r in runs])),
                    " ".join(f"{r['msgs_per_s']:.0f}" for r in runs) + (f" (+{failed} failed)" if failed else ""),
                    fmt(med([r["accept_per_s"] for r in runs])),
                    "-" if not runs else f"{statistics.median([r['cpu_ms_per_msg'] for r in runs]):.2f}",
                    "-" if not runs else f"{100 * statistics.median([r['cpu_share'] for r in runs]):.0f}%",
                    "OK"
                    if runs and all(not r["checks"] for r in runs)
                    else f"{sum(bool(r['checks']) for r in runs)} run(s) with problems",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("msg/s, rcpt/s: healthy messages/recipients / (last delivery at the sink - first submission);")
    lines.append(
        "txn/s: transactions the healthy sinks counted / the same time; accept: messages / submitter wall time"
    )
    lines.append(
        f"cores used: CPU from the first submission to completion / (that time x {os.cpu_count()} cores);"
        " cmcd: the supervisor and every worker, Postfix: master and all its children"
    )
    for sk in shapes:
        if (sk, "cmcd") in meds and (sk, "postfix") in meds:
            lines.append(f"ratio cmcd/Postfix, {sk}: {meds[(sk, 'cmcd')] / meds[(sk, 'postfix')]:.2f}")
    if "mixed" in shapes and "one" in shapes:
        for sysname in systems:
            if ("mixed", sysname) in meds and ("one", sysname) in meds:
                lines.append(
                    f"{sysname}: mixed healthy rate / one rate: {meds[('mixed', sysname)] / meds[('one', sysname)]:.2f}"
                )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# driver


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", "-n", type=int, default=5000, help="messages per run (default 5000)")
    ap.add_argument("--runs", "-r", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--shape", default="all", help="one, ten, ten1, ten10, mixed, all, or a comma-separated list")
    ap.add_argument("--systems", default="cmcd,postfix", help="cmcd, postfix or both (default)")
    ap.add_argument("--sessions", type=int, default=SESSIONS, help="parallel submission sessions (default 20)")
    ap.add_argument(
        "--workers",
        type=int,
        default=0,
        help="cmcd's [server] workers (default: the key unset, so cmcd's own default applies)",
    )
    ap.add_argument(
        "--cmcd",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra [delivery] setting for cmcd, TOML value, e.g. --cmcd connection_limit=50 (repeatable)",
    )
    ap.add_argument("--timeout", type=float, default=0.0, help="per-run limit in s (default 120 + N*rcpts/100)")
    ap.add_argument("--stall", type=float, default=60.0, help="give up a run after this long without progress (60 s)")
    ap.add_argument("--settle", type=float, default=1.0, help="wait this long after completion before counting (1 s)")
    ap.add_argument(
        "--idle-limit",
        type=float,
        default=30.0,
        help="CPU is counted until the system is idle, at most this long (30 s)",
    )
    ap.add_argument("--lock-timeout", type=float, default=900.0, help="wait this long for the system Postfix lock")
    ap.add_argument("--keep", action="store_true", help="keep cmcd's temporary directories")
    ap.add_argument("--json", default="", help="also write every run's numbers to this file")
    ap.add_argument("--submit-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.submit_worker:
        submit_worker()
        return 0
    names: list[str] = []
    for part in args.shape.split(","):
        part = part.strip()
        names += {"all": ["one", "ten1", "ten10", "mixed"], "ten": ["ten1", "ten10"]}.get(part, [part])
    if not names or any(n not in SHAPES for n in names):
        ap.error("--shape takes one, ten (= ten1,ten10), ten1, ten10, mixed or all")
    shapes = list(dict.fromkeys(names))
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not systems or not set(systems) <= {"cmcd", "postfix"}:
        ap.error("--systems takes cmcd, postfix or cmcd,postfix")
    args.cmcd_delivery = {}
    for kv in args.cmcd:
        k, sep, v = kv.partition("=")
        if not sep:
            ap.error(f"--cmcd {kv}: expected KEY=VALUE")
        args.cmcd_delivery[k.strip()] = v.strip()
    if not args.timeout:
        args.timeout = 120 + args.messages * 10 / 100
    if args.workers < 0:
        ap.error("--workers must be >= 1")
    if os.geteuid() != 0:
        ap.error("run as root: smtp-sink -u nobody and the system Postfix need it")

    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    print(
        f"# cmcd relay benchmark, {started}; N={args.messages} messages of {MSG_SIZE} B per run, "
        f"{args.sessions} submission sessions, {args.runs} interleaved rounds, shapes {','.join(shapes)}"
    )
    print(f"# cmcd code: {git_state()}; [delivery] overrides: {args.cmcd_delivery or 'none (defaults)'}")
    print(
        "# cmcd workers: "
        + (
            f"{args.workers} ([server] workers = {args.workers})"
            if args.workers
            else f"[server] workers unset: cmcd's default (os.cpu_count() = {os.cpu_count()})"
        )
        + "; each run prints the processes it found and their CPU"
    )
    print(
        f"# host: {os.cpu_count()} CPUs, {os.uname().release}; load average {loadavg()}; Postfix logs to {POSTFIX_LOG}"
    )
    print(
        "# CPU: cmcd supervisor + workers / Postfix master + children (by process name) from the first submission"
        " until idle; per process and share of the cores: from the first submission to completion",
        flush=True,
    )

    def on_term(signum, frame):  # noqa: ARG001 - so that the finally below restores Postfix
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    workdir = Path(tempfile.mkdtemp(prefix="cmcd-bench-relay-main-"))
    results: dict[tuple[str, str], list[dict]] = {}
    peers: Peers | None = None
    pf: PostfixRelay | None = None
    try:
        tls_dir = workdir / "tls"
        subprocess.run(
            [str(VENV_BIN / "python"), "-m", "cmcd.devcert", str(tls_dir)], check=True, cwd=ROOT, capture_output=True
        )
        peers = Peers(
            main=Sink("main"),
            split=[Sink(f"s{i}") for i in range(10)],
            tempfail=Sink("tempfail", ("-r", "rcpt,data")),
            blackhole=BlackHole(),
        )
        log(f"sinks: main 127.0.0.1:{peers.main.port}, tempfail :{peers.tempfail.port}, blackhole :{peers.blackhole.port}, "
            f"s0..s9 :{peers.split[0].port}..")  # fmt: skip
        if "postfix" in systems:
            pf = PostfixRelay(peers, args)
            pf.setup()
            log(f"Postfix smtpd on 127.0.0.1:{pf.port}")
        for i in range(args.runs):
            for sk in shapes:
                shape = SHAPES[sk]
                order = systems if (i + shapes.index(sk)) % 2 == 0 else systems[::-1]
                print(f"round {i + 1}/{args.runs}, {shape.label}", flush=True)
                for sysname in order:
                    log(f"round {i + 1}: {sk} {sysname} (load average {loadavg()})")
                    try:
                        r = run_one(sysname, shape, peers, args, pf, tls_dir)
                    except Exception as exc:  # noqa: BLE001 - one failed run does not end the benchmark
                        r = {"system": sysname, "shape": sk, "error": f"{type(exc).__name__}: {exc}"}
                    r["load"] = loadavg()
                    results.setdefault((sk, sysname), []).append(r)
                    print(describe(r) + f"\n            load average after: {r['load']}", flush=True)
    finally:
        if pf is not None:
            pf.teardown()
        if peers is not None:
            peers.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(final_table(results, shapes, systems))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "started": started,
                    "args": {k: v for k, v in vars(args).items()},
                    "results": {f"{k[0]}/{k[1]}": v for k, v in results.items()},
                },
                indent=1,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
