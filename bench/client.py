#!/usr/bin/env python3
"""Does PIPELINING pay? cmcd's delivery client against Postfix's smtp-sink, with and without it.

    .venv/bin/python bench/client.py [--transactions 3000] [--connections 4] [--recipients 1] [--runs 5]

CONNECTIONS clients each send their share of TRANSACTIONS (4 KB, RECIPIENTS each) over one
connection, RSET between transactions: once with PIPELINING (RSET, MAIL, RCPTs and DATA in one
write) and once with it turned off (one round trip per command), interleaved, medians printed.
Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cmcd.deliver.client import SmtpClient  # noqa: E402

BODY = b"From: a@acme.test\r\nSubject: bench\r\n\r\n" + (b"x" * 76 + b"\r\n") * 52


async def one_client(port: int, n: int, rcpts: int, pipelining: bool) -> None:
    client = await SmtpClient.connect("sink", "127.0.0.1", port, connect_timeout=5, command_timeout=30, data_timeout=30)
    assert await client.hello("bench.test", "disabled", None) is None
    if not pipelining:
        client.extensions.pop("PIPELINING", None)
    for i in range(n):
        mail, replies, data = await client.transaction(
            "a@acme.test", [f"r{i}-{j}@dst.test" for j in range(rcpts)], BODY
        )
        assert mail is None and data is not None and data.code == 250
    await client.quit()


async def run(port: int, total: int, conns: int, rcpts: int, pipelining: bool) -> float:
    t0 = time.perf_counter()
    await asyncio.gather(*(one_client(port, total // conns, rcpts, pipelining) for _ in range(conns)))
    return (total // conns * conns) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--transactions", type=int, default=3000)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--recipients", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = subprocess.Popen(["smtp-sink", "-u", "nobody", f"127.0.0.1:{port}", "1000"])
    try:
        time.sleep(0.5)
        import uvloop

        rates: dict[bool, list[float]] = {True: [], False: []}
        for r in range(a.runs):
            for mode in (True, False) if r % 2 == 0 else (False, True):
                rates[mode].append(uvloop.run(run(port, a.transactions, a.connections, a.recipients, mode)))
        on, off = statistics.median(rates[True]), statistics.median(rates[False])
        print(f"{a.connections} connections, {a.recipients} recipient(s), 4 KB, median of {a.runs} runs")
        print(f"  with PIPELINING:    {on:8.0f} transactions/s  (runs: {', '.join(f'{x:.0f}' for x in rates[True])})")
        print(f"  without PIPELINING: {off:8.0f} transactions/s  (runs: {', '.join(f'{x:.0f}' for x in rates[False])})")
        print(f"  ratio with/without: {on / off:.2f}")
    finally:
        sink.terminate()
        sink.wait()


if __name__ == "__main__":
    main()
