#!/usr/bin/env python3
"""API benchmark: a mail merge through POST /v1/emails/bulk next to the same messages through SMTP submission.

    .venv/bin/python bench/api.py [--recipients 100000] [--requests 100] [--sessions 20]
    .venv/bin/python bench/api.py --recipients 2000 --requests 2          # a quick check (~1 min)

Each path gets a fresh daemon (temp dir, `cmcd serve`, tenant `bench`, domain `bench.test` with its
DKIM keys, user `sender1`, an API key) that delivers everything to Postfix's smtp-sink on 127.0.0.1
(`[delivery.routes] "*"`); `[dns] nameservers` point at a closed loopback port, so nothing is ever
looked up and nothing leaves loopback.

  API   R recipients in Q requests of R/Q (merge fields: first_name, last_name, order, amount; a
        ~2 KB text template and a merged subject; an Idempotency-Key per request), sent one after
        another (--api-parallel for more at once) over one HTTPS connection (aiohttp). Printed per
        request: the time from sending it to its 202.
  SMTP  the same R messages, each rendered per recipient by the client (same headers, same body
        size), through K sessions (STARTTLS + AUTH PLAIN, set up before the clock starts), each
        transaction pipelined: MAIL, RCPT and DATA in one write, then the message.

Both clients run in a separate process (`--worker api|smtp`, uvloop). Timed per path: from the
first request (or MAIL) to the last 202 (or 250), and to the last delivery smtp-sink counted;
the rates are messages / those times. Daemon CPU is utime+stime over the same span, of cmcd's
supervisor and every worker ([server] workers from --workers, else cmcd's default), printed per
process and as the share of the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import proctree  # noqa: E402  (bench/proctree.py: CPU per process of a tree)
from intake import VENV_BIN, git_state, loadavg, log  # noqa: E402
from relay import Daemon, Sink, daemon_toml  # noqa: E402

TENANT, DOMAIN, USER, PASSWORD = "bench", "bench.test", "sender1", "bench-password-1"
SENDER = f"sender@{DOMAIN}"
FROM = f"Bench Shop <{SENDER}>"
SUBJECT = "Your order {{order}}, {{first_name}}"
PARAGRAPH = (
    "Thank you for shopping with us. We have received your order and are\n"
    "getting it ready. You can follow its progress in your account at any\n"
    "time; we will write again when it ships. If anything about it is not\n"
    "right, answer this message and a person will read it.\n\n"
)
TEMPLATE = (
    "Dear {{first_name}} {{last_name}},\n\n"
    "your order {{order}} over {{amount}} EUR has been received.\n\n" + PARAGRAPH * 8 + "Regards,\nThe Bench Shop\n"
)


def merge_values(i: int) -> dict[str, str | int | float]:
    return {"first_name": f"First{i}", "last_name": f"Last{i}", "order": 100000 + i, "amount": round(9.5 + i % 90, 2)}


def recipient(i: int) -> str:
    return f"u{i}@rcpt{i % 10}.test"


def fill(template: str, values: dict[str, Any]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: str(values[m.group(1)]), template)


def bulk_body(first: int, count: int) -> dict[str, Any]:
    return {
        "from": FROM,
        "subject": SUBJECT,
        "text": TEMPLATE,
        "tags": ["bench"],
        "recipients": [{"to": recipient(i), "merge": merge_values(i)} for i in range(first, first + count)],
    }


def render(i: int) -> bytes:
    """Recipient I's message as the SMTP client sends it: the API's headers and body, CRLF, dot-stuffed."""
    values = merge_values(i)
    body = fill(TEMPLATE, values)
    head = (
        f"From: {FROM}\r\nTo: {recipient(i)}\r\nSubject: {fill(SUBJECT, values)}\r\n"
        f"Date: {format_datetime(datetime.now(UTC))}\r\n"
        f"Message-ID: {make_msgid(domain=DOMAIN)}\r\nMIME-Version: 1.0\r\n"
        'Content-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: 7bit\r\n\r\n'
    )
    lines = body.split("\n")
    text = "\r\n".join("." + line if line.startswith(".") else line for line in lines)
    return (head + text).encode() + (b"" if text.endswith("\r\n") else b"\r\n")


def _client_tls() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # the daemon's certificate is a dev one
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------------------------------
# the API client (`api.py --worker api`)


async def api_main(p: dict[str, Any]) -> dict[str, Any]:
    import aiohttp  # noqa: PLC0415

    per = p["recipients"] // p["requests"]
    bodies = [json.dumps(bulk_body(n * per, per)).encode() for n in range(p["requests"])]
    url = f"https://127.0.0.1:{p['port']}/v1/emails/bulk"
    headers = {"Authorization": f"Bearer {p['key']}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(ssl=_client_tls(), limit=p["parallel"])
    timeout = aiohttp.ClientTimeout(total=600)
    results: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        async with http.get(f"https://127.0.0.1:{p['port']}/v1/openapi.json") as warm:  # TLS set-up off the clock
            await warm.read()
        _emit({"ready": True, "request_bytes": len(bodies[0])})
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        cpu0, t0 = _cpu(), time.perf_counter()
        queue = list(range(len(bodies)))

        async def one() -> None:
            while queue:
                n = queue.pop(0)
                start = time.perf_counter()
                async with http.post(url, data=bodies[n], headers={**headers, "Idempotency-Key": f"bench-{n}"}) as resp:
                    reply = await resp.json(content_type=None)
                end = time.perf_counter()
                ok = resp.status == 202 and reply.get("count") == per
                row = {"req": n, "status": resp.status, "start": start - t0, "end": end - t0, "ok": ok}
                if not ok:
                    row["reply"] = str(reply)[:300]
                results.append(row)
                _emit(row)

        await asyncio.gather(*(one() for _ in range(p["parallel"])))
        cpu1 = _cpu()
    accepted = sum(per for r in results if r["ok"])
    return {"accepted": accepted, "last_s": max(r["end"] for r in results), "client_cpu_s": cpu1 - cpu0}


# ---------------------------------------------------------------------------------------
# the SMTP client (`api.py --worker smtp`)


async def _reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed by the server")
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            return int(line[:3]), b"".join(lines)


async def _expect(reader: asyncio.StreamReader, want: int, stage: str) -> None:
    code, text = await _reply(reader)
    if code != want:
        raise RuntimeError(f"{stage}: {text[:200]!r}")


async def smtp_main(p: dict[str, Any]) -> dict[str, Any]:
    ctx = _client_tls()
    auth = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
    state: dict[str, Any] = {"next": 0, "ok": 0, "last": 0.0, "errors": {}}
    sessions = []
    for _ in range(p["sessions"]):
        reader, writer = await asyncio.open_connection("127.0.0.1", p["port"])
        await _expect(reader, 220, "banner")
        writer.write(b"EHLO client.bench.test\r\n")
        await _expect(reader, 250, "EHLO")
        writer.write(b"STARTTLS\r\n")
        await _expect(reader, 220, "STARTTLS")
        await writer.start_tls(ctx)
        writer.write(b"EHLO client.bench.test\r\n")
        await _expect(reader, 250, "EHLO")
        writer.write(b"AUTH PLAIN " + auth + b"\r\n")
        await _expect(reader, 235, "AUTH")
        sessions.append((reader, writer))
    _emit({"ready": True, "message_bytes": len(render(0))})
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    cpu0, t0 = _cpu(), time.perf_counter()
    mail = f"MAIL FROM:<{SENDER}>\r\n".encode()

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while state["next"] < p["recipients"]:
            i = state["next"]
            state["next"] += 1
            try:
                writer.write(mail + f"RCPT TO:<{recipient(i)}>\r\n".encode() + b"DATA\r\n")
                await _expect(reader, 250, "MAIL")
                await _expect(reader, 250, "RCPT")
                await _expect(reader, 354, "DATA")
                writer.write(render(i) + b".\r\n")
                await _expect(reader, 250, "end of data")
                state["ok"] += 1
                state["last"] = time.perf_counter() - t0
            except RuntimeError as exc:
                key = str(exc)[:100]
                state["errors"][key] = state["errors"].get(key, 0) + 1
                writer.write(b"RSET\r\n")
                await _reply(reader)
        writer.write(b"QUIT\r\n")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_reply(reader), 5)
        writer.close()

    await asyncio.gather(*(session(r, w) for r, w in sessions))
    return {"accepted": state["ok"], "last_s": state["last"], "errors": state["errors"], "client_cpu_s": _cpu() - cpu0}


def worker(kind: str) -> None:
    params = json.loads(sys.stdin.readline())
    main = api_main if kind == "api" else smtp_main
    try:
        import uvloop  # noqa: PLC0415

        result = uvloop.run(main(params))
    except ImportError:  # pragma: no cover
        result = asyncio.run(main(params))
    _emit({"result": result})


# ---------------------------------------------------------------------------------------
# the daemon and one run


def start_daemon(tls_dir: Path, sink: Sink, args: argparse.Namespace) -> tuple[Daemon, int, str]:
    """A fresh provisioned daemon: (daemon, API port, API key)."""
    tmp = Path(tempfile.mkdtemp(prefix="cmcd-bench-api-"))
    (tmp / "spool").mkdir()
    tuning = "".join(f"{k} = {v}\n" for k, v in args.cmcd_delivery.items())
    (tmp / "cmcd.toml").write_text(
        daemon_toml(
            tmp, tls_dir, hostname="api.bench.local", delivery=tuning, routes={"*": f"127.0.0.1:{sink.port}"},
            smtps_listen=None, api=True, comment='"*" routes every domain', workers=args.workers,
        )
    )  # fmt: skip
    proc = subprocess.Popen(
        [str(VENV_BIN / "python"), "-m", "cmcd.daemon", "serve", "--config", str(tmp / "cmcd.toml")],
        cwd=tmp,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    d = Daemon(tmp, proc)
    if not d.ready.wait(30) or proc.poll() is not None or not d.smtp_port:
        d.stop()
        raise RuntimeError("cmcd did not become ready:\n" + "\n".join(d.lines[-30:]))
    ready = next(line for line in d.lines if "event=ready" in line)
    api_port = int(re.search(r" api=\S+:(\d+)", ready).group(1))  # type: ignore[union-attr]
    d.admin("tenant.add", name=TENANT)
    d.admin("domain.add", tenant=TENANT, domain=DOMAIN)
    d.admin("user.add", tenant=TENANT, login=USER, role="sender", password=PASSWORD)
    key = str(d.admin("apikey.add", tenant=TENANT, login=USER)["token"])
    return d, api_port, key


def run_worker(kind: str, params: dict[str, Any], timeout: float, on_row) -> dict[str, Any]:
    """Start the client process, wait for READY, then go; ON_ROW(row) for every line it prints."""
    errf = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--worker", kind],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=errf,
        text=True,
    )
    assert proc.stdin and proc.stdout
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    result: dict[str, Any] = {}
    try:
        proc.stdin.write(json.dumps(params) + "\n")
        proc.stdin.flush()
        for line in proc.stdout:
            row = json.loads(line)
            if row.get("ready"):
                on_row(row)
                proc.stdin.write("go\n")
                proc.stdin.flush()
            elif "result" in row:
                result = row["result"]
            else:
                on_row(row)
        proc.wait()
    finally:
        killer.cancel()
    if proc.returncode != 0 or not result:
        errf.seek(0)
        raise RuntimeError(
            f"{kind} client failed (rc={proc.returncode}): {errf.read().decode(errors='replace')[-2000:]}"
        )
    return result


def run_path(kind: str, tls_dir: Path, sink: Sink, args: argparse.Namespace) -> dict[str, Any]:
    d, api_port, key = start_daemon(tls_dir, sink, args)
    res: dict[str, Any] = {"path": kind, "problems": []}
    try:
        base = sink.count
        mark: dict[str, float] = {}
        snaps: dict[str, proctree.Snapshot] = {}

        def on_row(row: dict[str, Any]) -> None:
            if row.get("ready"):
                mark["t0"] = time.monotonic()
                snaps["0"] = proctree.snapshot(d.proc.pid, threads=True)
                res.update({k: v for k, v in row.items() if k != "ready"})
            elif "req" in row:
                flag = "" if row["ok"] else f"  FAILED {row['status']} {row.get('reply', '')}"
                print(f"    request {row['req'] + 1:4d}: 202 after {row['end'] - row['start']:6.2f} s "
                      f"(sent at +{row['start']:6.2f} s){flag}", flush=True)  # fmt: skip

        if kind == "api":
            params = {"port": api_port, "key": key, "recipients": args.recipients, "requests": args.requests,
                      "parallel": args.api_parallel}  # fmt: skip
        else:
            params = {"port": d.smtp_port, "recipients": args.recipients, "sessions": args.sessions}
        client = run_worker(kind, params, args.timeout, on_row)
        res.update(client)
        # wait for the sink to count every accepted message (or for progress to stop)
        want, last_n, last_t = client["accepted"], -1, time.monotonic()
        while sink.count - base < want:
            if sink.count != last_n:
                last_n, last_t = sink.count, time.monotonic()
            elif time.monotonic() - last_t > args.stall:
                res["problems"].append(f"stalled: the sink counted {sink.count - base} of {want}")
                break
            time.sleep(0.2)
        res["delivered"] = sink.count - base
        res["delivery_s"] = sink.changed - mark["t0"]
        # the daemon's CPU (supervisor and every worker) from the first request to the last delivery
        use = proctree.usage(
            snaps["0"], proctree.snapshot(d.proc.pid, threads=True), time.monotonic() - mark["t0"], proctree.cmcd_label
        )
        res["daemon_cpu_s"] = use.total_s
        res["cpu_share"] = use.share
        res["cpu_tree"] = use.to_json()
        res["cpu_describe"] = use.describe("cmcd", threads=True)
        status = d.admin("status")
        res["status_delivery"] = status.get("delivery")
        if client.get("errors"):
            res["problems"].append(f"client errors {client['errors']}")
    finally:
        d.stop()
        if d.problem_count:
            res["problems"].append(
                f"daemon logged {d.problem_count} warning/error lines: " + " | ".join(d.problems[:3])
            )
        if args.keep:
            log(f"kept {d.tmp}")
        else:
            shutil.rmtree(d.tmp, ignore_errors=True)
    return res


def table(results: list[dict[str, Any]]) -> str:
    rows = [("path", "messages", "last 202/250 s", "accept msg/s", "last delivery s", "end-to-end msg/s",
             "daemon CPU ms/msg", "cores used", "client CPU s", "delivered")]  # fmt: skip
    for r in results:
        n = r["accepted"]
        rows.append((
            r["label"], str(n), f"{r['last_s']:.2f}", f"{n / r['last_s']:.0f}", f"{r['delivery_s']:.2f}",
            f"{n / r['delivery_s']:.0f}", f"{r['daemon_cpu_s'] * 1000 / max(n, 1):.2f}", f"{100 * r['cpu_share']:.0f}%",
            f"{r['client_cpu_s']:.1f}",
            f"{r['delivered']}/{n}",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if len(results) == 2:
        api, smtp = results
        lines.append(
            f"ratio API/SMTP: accept {(api['accepted'] / api['last_s']) / (smtp['accepted'] / smtp['last_s']):.2f}, "
            f"end-to-end {(api['accepted'] / api['delivery_s']) / (smtp['accepted'] / smtp['delivery_s']):.2f}, "
            f"daemon CPU per message {(api['daemon_cpu_s'] / api['accepted']) / (smtp['daemon_cpu_s'] / smtp['accepted']):.2f}"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--recipients", "-n", type=int, default=100_000, help="messages per path (default 100000)")
    ap.add_argument("--requests", "-q", type=int, default=100, help="API requests to split them into (default 100)")
    ap.add_argument("--api-parallel", type=int, default=1, help="API requests in flight at once (default 1)")
    ap.add_argument("--sessions", "-k", type=int, default=20, help="parallel SMTP sessions (default 20)")
    ap.add_argument("--paths", default="api,smtp", help="api, smtp or both (default)")
    ap.add_argument("--cmcd", action="append", default=[], metavar="KEY=VALUE", help="extra [delivery] setting")
    ap.add_argument(
        "--workers", type=int, default=0, help="cmcd's [server] workers (default: unset, cmcd's own default)"
    )
    ap.add_argument("--timeout", type=float, default=3600.0, help="limit for one client run in s (default 3600)")
    ap.add_argument("--stall", type=float, default=60.0, help="give up waiting for deliveries after this long")
    ap.add_argument("--keep", action="store_true", help="keep the daemons' temporary directories")
    ap.add_argument("--worker", choices=["api", "smtp"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return 0
    if args.requests < 1 or args.recipients % args.requests or not 1 <= args.recipients // args.requests <= 1000:
        ap.error("--recipients must be --requests times 1 to 1000")
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not paths or not set(paths) <= {"api", "smtp"}:
        ap.error("--paths takes api, smtp or api,smtp")
    args.cmcd_delivery = dict(kv.split("=", 1) for kv in args.cmcd)
    if os.geteuid() != 0:
        ap.error("run as root: smtp-sink -u nobody needs it")

    per = args.recipients // args.requests
    print(f"# cmcd API benchmark, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {args.recipients} messages per path; "
          f"API: {args.requests} requests of {per} (in flight: {args.api_parallel}); SMTP: {args.sessions} sessions")  # fmt: skip
    print(f"# cmcd code: {git_state()}; host: {os.cpu_count()} CPUs; load average {loadavg()}", flush=True)
    print(
        "# cmcd workers: "
        + (f"{args.workers} ([server] workers)" if args.workers else f"unset: cmcd's default ({os.cpu_count()})")
        + "; daemon CPU: the supervisor and every worker, from the first request (MAIL) to the last delivery;"
        " cores used: that CPU / (that time x the machine's cores)",
        flush=True,
    )

    def on_term(signum: int, frame: Any) -> None:  # noqa: ARG001 - so that the finally below stops the peers
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    workdir = Path(tempfile.mkdtemp(prefix="cmcd-bench-api-main-"))
    sink: Sink | None = None
    results = []
    try:
        tls_dir = workdir / "tls"
        subprocess.run([str(VENV_BIN / "python"), "-m", "cmcd.devcert", str(tls_dir)], check=True, cwd=ROOT,
                       capture_output=True)  # fmt: skip
        sink = Sink("main")
        for kind in paths:
            label = f"API bulk, {args.requests} x {per}" if kind == "api" else f"SMTP, {args.sessions} sessions"
            print(f"{label} (load average {loadavg()})", flush=True)
            r = run_path(kind, tls_dir, sink, args)
            r["label"] = label
            size = r.get("request_bytes") or r.get("message_bytes")
            what = "request body" if kind == "api" else "message"
            print(f"    last {'202' if kind == 'api' else '250'} at {r['last_s']:.2f} s, last delivery at "
                  f"{r['delivery_s']:.2f} s; {what} {size} bytes; delivered {r['delivered']}/{r['accepted']}; "
                  f"cmcd delivery counters {r['status_delivery']}", flush=True)  # fmt: skip
            print(f"    {r['cpu_describe']}", flush=True)
            for p in r["problems"]:
                print(f"    PROBLEM: {p}", flush=True)
            results.append(r)
    finally:
        if sink is not None:
            sink.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
