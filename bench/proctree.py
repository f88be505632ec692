"""CPU of a process tree over a measured window, per process: cmcd's supervisor and each worker, or Postfix.

    before = snapshot(pid); ...load...; after = snapshot(pid)
    use = usage(before, after, wall_s, label=cmcd_label)
    print(use.describe("cmcd"))     # per process: seconds and % of one core; the share of the machine's cores

The tree is the root and its descendants, found through /proc/<pid>/task/<tid>/children (every thread's
children, recursively). A process's CPU is utime+stime of /proc/<pid>/stat (all its threads); a child that
appeared during the window counts from zero, one that ended during it is seen only through its parent's
reaped-children time (cutime+cstime), and one that came and went between the snapshots without being
reaped by a process of the tree is missed. The share of the machine is the sum / (wall * os.cpu_count()).

Used by intake.py, relay.py and api.py. Reads /proc only; never signals, waits for or changes a process.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Proc:
    """One process of a snapshot; CPU in seconds."""

    pid: int
    comm: str
    state: str  # R, S, D, Z (a zombie: ended, not yet waited for), ...
    argv: tuple[str, ...]
    cpu_s: float  # utime+stime, all threads
    reaped_s: float  # cutime+cstime: children that ended and were waited for
    started: int  # starttime (clock ticks after boot): tells a reused pid apart
    threads: dict[int, float] = field(default_factory=dict)  # tid -> utime+stime


def _stat(path: str) -> tuple[str, list[str]]:
    with open(path) as f:
        raw = f.read()
    return raw[raw.index("(") + 1 : raw.rindex(")")], raw.rsplit(")", 1)[1].split()


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out.extend(int(c) for c in f.read().split())
    return out


def tree_pids(root: int) -> list[int]:
    """ROOT and every descendant, root first, then breadth first."""
    out, todo, seen = [], [root], set()
    while todo:
        pid = todo.pop(0)
        if pid in seen:
            continue
        seen.add(pid)
        out.append(pid)
        todo.extend(_children(pid))
    return out


def read_proc(pid: int, *, threads: bool = False) -> Proc | None:
    try:
        comm, fields = _stat(f"/proc/{pid}/stat")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = tuple(a.decode(errors="replace") for a in f.read().split(b"\0") if a)
    except (OSError, ValueError, IndexError):
        return None
    # fields[0] is field 3 (state): utime=14, stime=15, cutime=16, cstime=17, starttime=22
    per_thread: dict[int, float] = {}
    if threads:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    tf = _stat(f"/proc/{pid}/task/{tid}/stat")[1]
                    per_thread[int(tid)] = (int(tf[11]) + int(tf[12])) / CLK_TCK
    return Proc(
        pid=pid,
        comm=comm,
        state=fields[0],
        argv=argv,
        cpu_s=(int(fields[11]) + int(fields[12])) / CLK_TCK,
        reaped_s=(int(fields[13]) + int(fields[14])) / CLK_TCK,
        started=int(fields[19]),
        threads=per_thread,
    )


Snapshot = dict[int, Proc]


def snapshot(root: int, *, threads: bool = False) -> Snapshot:
    """Every process of ROOT's tree now (THREADS: with per-thread CPU as well)."""
    out: Snapshot = {}
    for pid in tree_pids(root):
        p = read_proc(pid, threads=threads)
        if p is not None:
            out[pid] = p
    return out


def total_s(snap: Snapshot) -> float:
    """The tree's CPU so far: every live process plus what their reaped children used."""
    return sum(p.cpu_s + p.reaped_s for p in snap.values())


# ---------------------------------------------------------------------------------------
# labels


def cmcd_label(p: Proc, is_root: bool, has_children: bool) -> str:
    """cmcd's processes: the root is the supervisor when it has children, else the one and only process;
    a child is a worker (with its index when its command line names one) or, failing that, its comm."""
    if is_root:
        return "supervisor" if has_children else "cmcd (one process)"
    line = " ".join(p.argv)
    if "worker" in p.argv or re.search(r"\bworker\b", line):
        m = re.search(r"--(?:index|worker-index|worker|shard|id)[ =](\d+)", line)
        return f"worker {m.group(1)}" if m else "worker"
    return p.comm


def comm_label(p: Proc, is_root: bool, has_children: bool) -> str:  # noqa: ARG001 - same signature as cmcd_label
    return p.comm


Labeler = Callable[[Proc, bool, bool], str]


# ---------------------------------------------------------------------------------------
# usage over a window


@dataclass(frozen=True)
class ProcUse:
    pid: int
    label: str
    cpu_s: float
    main_s: float | None  # the main thread (tid == pid), when threads were snapshotted
    other_threads_s: tuple[float, ...]  # the other threads, largest first (only those above 10 ms)


@dataclass(frozen=True)
class TreeUse:
    wall_s: float
    cpus: int
    procs: tuple[ProcUse, ...]  # the root first, then its descendants by pid
    exited_s: float  # reaped during the window: processes that ended (Postfix's, a restarted worker)

    @property
    def total_s(self) -> float:
        return sum(p.cpu_s for p in self.procs) + self.exited_s

    @property
    def share(self) -> float:
        """The share of the machine's cores used: total / (wall * cpus)."""
        return self.total_s / max(self.wall_s * self.cpus, 1e-9)

    def core_pct(self, cpu_s: float) -> float:
        """CPU_S as % of one core over the window."""
        return 100 * cpu_s / max(self.wall_s, 1e-9)

    @property
    def children(self) -> int:
        return len(self.procs) - 1

    def describe(self, name: str, *, threads: bool = False, top: int = 6) -> str:
        """One line: NAME's CPU per process over the window, and the share of the machine's cores."""
        parts = []
        for p in self.procs:
            s = f"{p.label} [{p.pid}] {p.cpu_s:.2f}s ({self.core_pct(p.cpu_s):.0f}%"
            if threads and p.main_s is not None:
                others = " ".join(f"{t:.2f}" for t in p.other_threads_s[:top])
                s += f"; main thread {p.main_s:.2f}s, others {others or '-'}"
            parts.append(s + ")")
        if self.exited_s > 0.005:
            parts.append(f"exited {self.exited_s:.2f}s ({self.core_pct(self.exited_s):.0f}%)")
        return (
            f"{name} CPU over {self.wall_s:.2f}s (s, % of one core): "
            + ", ".join(parts)
            + f"; total {self.total_s:.2f}s = {100 * self.share:.0f}% of the {self.cpus} cores"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "wall_s": self.wall_s,
            "cpus": self.cpus,
            "total_s": self.total_s,
            "share": self.share,
            "exited_s": self.exited_s,
            "procs": [
                {"pid": p.pid, "label": p.label, "cpu_s": p.cpu_s, "main_s": p.main_s, "others": p.other_threads_s}
                for p in self.procs
            ],
        }


def usage(before: Snapshot, after: Snapshot, wall_s: float, label: Labeler = comm_label) -> TreeUse:
    """What each process of AFTER used since BEFORE (a process not in BEFORE, or a reused pid, counts from 0)."""
    root = next(iter(after), None)  # snapshots are root first
    has_children = len(after) > 1
    procs = []
    exited = 0.0
    for pid, p in after.items():
        b = before.get(pid)
        if b is not None and b.started != p.started:
            b = None  # a different process under a reused pid
        cpu = p.cpu_s - (b.cpu_s if b else 0.0)
        exited += max(p.reaped_s - (b.reaped_s if b else 0.0), 0.0)
        main_s = None
        others: tuple[float, ...] = ()
        if p.threads:
            bt = b.threads if b else {}
            deltas = {t: c - bt.get(t, 0.0) for t, c in p.threads.items()}
            main_s = deltas.get(pid, 0.0)
            others = tuple(sorted((c for t, c in deltas.items() if t != pid and c > 0.01), reverse=True))
        procs.append(ProcUse(pid, label(p, pid == root, has_children), max(cpu, 0.0), main_s, others))
    head, rest = procs[:1], sorted(procs[1:], key=lambda u: u.pid)
    return TreeUse(wall_s=wall_s, cpus=os.cpu_count() or 1, procs=tuple(head + rest), exited_s=exited)
