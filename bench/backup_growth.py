"""Size of the backup directory over hourly generations of a store whose mail log grows, versus full snapshots.

Builds a store with BASE mail-log rows (inserted with the store's own insert_mail_events, addresses and
replies encrypted with the data key as in production), then takes GENERATIONS hourly backups, each after
inserting PER_HOUR more rows, and prints per generation: the store's size, the bytes the generation added
to backup.dir, and the directory's total. It ends with the per-generation growth (to show it is steady),
a linear extrapolation to 480 generations, and what 480 full snapshots would take.

    .venv/bin/python bench/backup_growth.py [--base 1000000] [--per-hour 50000] [--generations 48] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import zlib
from pathlib import Path

from cmcd.store import backup as bk
from cmcd.store import open_store
from cmcd.store.store import Store

T0 = 1_794_999_600.0


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def add_rows(s: Store, tenants: list[tuple[int, str]], start: int, n: int, batch: int = 20_000) -> None:
    for lo in range(start, start + n, batch):
        rows = []
        for k in range(lo, min(lo + batch, start + n)):
            tid, name = tenants[k % len(tenants)]
            sender = f"noreply@{name}.example"
            rcpt = f"customer{k * 7919 % 5_000_000}@dest{k % 3001}.example"
            rows.append(
                (f"ev-{k:012d}-{os.urandom(6).hex()}", T0 + k * 0.072, tid, f"{k:012X}{os.urandom(2).hex().upper()}",
                 "delivered" if k % 20 else "deferred", s.keys.encrypt(sender), s.keys.index(sender),
                 s.keys.encrypt(rcpt), s.keys.index(rcpt), f"dest{k % 3001}.example", "sent" if k % 20 else "deferred",
                 f"250 2.0.0 Ok: queued as {k:X}" if k % 20 else "451 4.7.1 Try again later", 1 + (k % 20 == 0),
                 f"mx{k % 5}.dest{k % 3001}.example", f"198.51.100.{k % 250}", "TLSv1.3", 0.3 + (k % 100) / 50,
                 2000 + k % 50_000, f"<{k}.{os.urandom(4).hex()}@{name}.example>")
            )  # fmt: skip
        s.insert_mail_events(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=int, default=1_000_000)
    ap.add_argument("--per-hour", type=int, default=50_000)
    ap.add_argument("--generations", type=int, default=48)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one, removed)")
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="cmcd-bench-backup-"))
    root.mkdir(parents=True, exist_ok=True)
    store = open_store(root / "cmcd.db", root / "data.key")
    tenants = [(store.tenant_add(f"tenant{i}").id, f"tenant{i}") for i in range(20)]
    started = time.monotonic()
    add_rows(store, tenants, 0, args.base)
    store.checkpoint()
    print(f"store with {args.base} mail-log rows built in {time.monotonic() - started:.0f}s")
    backups, key = root / "backups", root / "backup.key"
    print("gen  rows        store_MiB  full_MiB  added_MiB  dir_MiB  seconds")
    added: list[int] = []
    fulls: list[int] = []
    total = args.base
    previous = 0
    for g in range(args.generations):
        if g:
            add_rows(store, tenants, total, args.per_hour)
            total += args.per_hour
            store.checkpoint()
        t = time.monotonic()
        bk.take_backup(root / "cmcd.db", backups, key, 480, T0 + 3600 * g, work_dir=root)
        seconds = time.monotonic() - t
        size = du(backups)
        added.append(size - previous)
        previous = size
        store_bytes = (root / "cmcd.db").stat().st_size
        # a version 1 (full) backup's size: the whole store compressed, as take_backup(chunked=False) writes it
        if g in (0, args.generations - 1) or g % 12 == 0:
            comp = zlib.compressobj(3)
            n = 0
            with (root / "cmcd.db").open("rb") as f:
                while block := f.read(1 << 22):
                    n += len(comp.compress(block))
            n += len(comp.flush())
            fulls.append(n)
            full = f"{n / 2**20:8.1f}"
        else:
            full = "       -"
        print(
            f"{g:3d}  {total:10d}  {store_bytes / 2**20:9.1f}  {full}  {added[-1] / 2**20:9.1f}  "
            f"{size / 2**20:7.1f}  {seconds:7.1f}",
            flush=True,
        )
    growth = added[1:]
    mean, sd = statistics.mean(growth), statistics.pstdev(growth)
    half = len(growth) // 2
    first_half, second_half = statistics.mean(growth[:half]), statistics.mean(growth[half:])
    print(f"\nfirst generation: {added[0] / 2**20:.1f} MiB")
    print(f"per later generation: mean {mean / 2**20:.2f} MiB, sd {sd / 2**20:.2f} MiB, "
          f"first half {first_half / 2**20:.2f} MiB, second half {second_half / 2**20:.2f} MiB")  # fmt: skip
    # the manifest of generation k grows with the store (16 bytes a 64 KiB chunk): the slope of the added
    # bytes over k carries it, so extrapolate with a line fitted through the per-generation growth
    ks = list(range(1, len(added)))
    slope, intercept = statistics.linear_regression(ks, growth)
    extrapolated = added[0] + sum(intercept + slope * k for k in range(1, 480))
    print(f"growth per generation fitted: {intercept / 2**20:.3f} MiB + {slope / 2**10:.2f} KiB x generation")
    print(f"480 generations, extrapolated: {extrapolated / 2**30:.2f} GiB")
    bytes_per_row = (fulls[-1] - fulls[0]) / max(1, total - args.base)
    full_480 = sum(fulls[0] + bytes_per_row * args.per_hour * k for k in range(480))
    print(f"480 full snapshots of the first store: {480 * fulls[0] / 2**30:.2f} GiB; "
          f"of the growing store (as version 1 wrote them): {full_480 / 2**30:.2f} GiB")  # fmt: skip
    store.close()
    if args.dir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
