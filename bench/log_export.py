#!/usr/bin/env python3
"""A million mail-log rows exported through cmcctl: time, and peak memory of the daemon and of cmcctl.

    .venv/bin/python bench/log_export.py [--rows 1000000]

Fills a store with N mail-log rows straight through SQLite (encrypted addresses, as the daemon
writes them), starts cmcd on it, runs `cmcctl log mail --format csv` into /dev/null-like counting,
and reports rows/s and the peak RSS (VmHWM) of both processes. Loopback only.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from queue_idle import Daemon, config  # noqa: E402

from cmcd.store import open_store  # noqa: E402


def hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cmcd-bench-export-") as name:
        tmp = Path(name)
        store = open_store(tmp / "cmcd.db", tmp / "data.key")
        store.tenant_add("bench")
        k = store.keys
        sender = (k.encrypt("sender@bench.test"), k.index("sender@bench.test"))
        t0 = time.monotonic()
        now = time.time() - 86400
        store.conn.execute("BEGIN")
        for i in range(a.rows):
            rcpt = f"r{i}@dst{i % 100}.test"
            store.conn.execute(
                "INSERT INTO mail_log(ts, tenant_id, queue_id, event, sender_enc, sender_hmac, rcpt_enc, rcpt_hmac, "
                "rcpt_domain, status, response, event_key) VALUES (?,1,?,?,?,?,?,?,?,?,?,?)",
                (now + i * 0.05, f"Q{i:012d}", "delivered", *sender, k.encrypt(rcpt), k.index(rcpt),
                 f"dst{i % 100}.test", "delivered", "250 2.0.0 Ok", f"b:{i}"),
            )  # fmt: skip
        store.conn.execute("COMMIT")
        store.close()
        print(f"built {a.rows} rows in {time.monotonic() - t0:.1f}s")
        d = Daemon(config(tmp))
        d.start()
        try:
            t0 = time.monotonic()
            ctl = subprocess.Popen(
                [sys.executable, "-m", "cmcd.admin.cli", "--socket", str(tmp / "admin.sock"), "log", "mail",
                 "--format", "csv"],
                stdout=subprocess.PIPE,
            )  # fmt: skip
            assert ctl.stdout is not None
            lines, ctl_hwm = 0, 0
            for _ in ctl.stdout:
                lines += 1
                if lines % 100_000 == 0:
                    ctl_hwm = max(ctl_hwm, hwm_kb(ctl.pid))
            ctl.wait()
            took = time.monotonic() - t0
            assert d.proc is not None
            print(f"exported {lines - 1} rows in {took:.1f}s ({(lines - 1) / took:.0f} rows/s)")
            print(f"peak RSS: daemon {hwm_kb(d.proc.pid) / 1024:.0f} MB, cmcctl {ctl_hwm / 1024:.0f} MB")
        finally:
            d.stop()


if __name__ == "__main__":
    main()
