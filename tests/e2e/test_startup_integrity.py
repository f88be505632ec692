"""Start-up refuses a store or spool it cannot trust, in one line naming the file and the way out.

One daemon run makes a store, a data key and a spool holding three queued messages (four
recipients, in the shard of the worker that took the one session; delivery is off). Each test copies
those files (every shard) into a directory of its own, damages one, and runs the real `cmcd serve`:
exit status 1, one line on stderr that names the file, no traceback, nothing ready. For a bad spool
(the shard holding the messages), `cmcd serve --accept-loss` then starts: the bad file is kept aside
as FILE.lost-TIME, and `cmcctl log mail` shows each of the four recipients as lost.
"""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Cmcd, message, queue_id

RECIPIENTS = (["one@dst.test", "two@dst.test"], ["three@dst.test"], ["four@other.test"])
BODY_BYTES = 2000  # over half a page, under one: one message a leaf page, so the table has an interior page


@dataclass(frozen=True)
class Pristine:
    root: Path
    queued: dict[str, list[str]]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, ca) -> Pristine:  # type: ignore[no-untyped-def]
    """A first start on an empty directory (as easy as ever), three messages queued, a clean stop."""
    d = Cmcd(tmp_path_factory.mktemp("pristine"), ca)
    assert not (d.root / "cmcd.db").exists() and not (d.root / "data.key").exists()
    d.start().provision()
    queued: dict[str, list[str]] = {}
    with d.smtp() as c:
        for n, rcpts in enumerate(RECIPIENTS):
            c.mail("alice@acme.test")
            for r in rcpts:
                c.rcpt(r)
            queued[queue_id(c.data(message(subject=f"m{n}", body="x" * BODY_BYTES)))] = rcpts
    assert d.stop() == 0
    assert len({d.shard_file(q) for q in queued}) == 1  # one session: one worker's shard
    # the store knows every shard of its spool, and each shard carries the same id
    for path in d.shards():
        shard = path.stem.partition("-")[2]
        key = f"spool_id.{shard}" if shard else "spool_id"
        assert _meta(d.root / "cmcd.db", key) == _meta(path, "spool_id") is not None, path
    return Pristine(d.root, queued)


def _meta(path: Path, key: str) -> str | None:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    finally:
        conn.close()
    return None if row is None else str(row[0])


@pytest.fixture
def copy(pristine: Pristine, tmp_path: Path, ca) -> Cmcd:  # type: ignore[no-untyped-def]
    """A daemon (not started) over a copy of the pristine store, key and spool."""
    d = Cmcd(tmp_path / "cmcd", ca)
    for name in ("cmcd.db", "data.key"):
        shutil.copy2(pristine.root / name, d.root / name)
    (d.root / "spool").mkdir()
    for shard in (pristine.root / "spool").glob("queue*.db"):  # every worker's shard
        shutil.copy2(shard, d.root / "spool" / shard.name)
    return d


def _held(d: Cmcd, pristine: Pristine) -> Path:
    """The shard file of D that holds the pristine messages."""
    return d.shard_file(next(iter(pristine.queued)))


def _spool_bytes(d: Cmcd) -> dict[str, bytes]:
    """File name -> content of every shard of D's spool."""
    return {p.name: p.read_bytes() for p in d.shards()}


def _serve(d: Cmcd, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-m", "cmcd.daemon", "serve", "--config", str(d.config_path), *args],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=d.root,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("cmcd serve started on a file it cannot trust")


def _assert_refused(out: subprocess.CompletedProcess[str], file: Path, *words: str) -> str:
    """Exit status 1, and stderr is one line "cmcd: FILE: ..." with WORDS in it; no traceback, not ready."""
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert "event=ready" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"cmcd: {file}: "), lines[0]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def _start(d: Cmcd, *args: str) -> None:
    """As Cmcd.start, with extra arguments to `cmcd serve`."""
    ready = d._ready = threading.Event()
    d.proc = subprocess.Popen(
        [sys.executable, "-m", "cmcd.daemon", "serve", "--config", str(d.config_path), *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=d.root,
    )
    threading.Thread(target=d._drain, args=(d.proc, ready), daemon=True).start()
    if not ready.wait(20) or d.proc.poll() is not None:
        d.proc.kill()
        raise RuntimeError("cmcd did not become ready:\n" + "\n".join(d.log[-30:]))


def _cmcctl(d: Cmcd, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "cmcd.admin.cli", "--socket", str(d.root / "admin.sock"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# -- damage ---------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(b"")


def _garble_header(path: Path) -> None:
    with path.open("r+b") as f:
        f.write(bytes((i * 37 + 11) % 256 for i in range(100)))


def _corrupt_page(path: Path, interior: bool = False) -> None:
    """Overwrite the b-tree header of a page in the middle of the file: an interior page if INTERIOR (or
    if the file has one), else any b-tree page past the first; then check that quick_check fails."""
    raw = bytearray(path.read_bytes())
    page_size = int.from_bytes(raw[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = len(raw) // page_size
    btree = {n: raw[n * page_size] for n in range(1, pages) if raw[n * page_size] in (0x02, 0x05, 0x0A, 0x0D)}
    inner = [n for n, kind in btree.items() if kind in (0x02, 0x05)]
    candidates = inner or ([] if interior else list(btree))
    assert candidates, "no b-tree page to corrupt"
    n = candidates[len(candidates) // 2]
    raw[n * page_size : n * page_size + 12] = b"\xff" * 12
    path.write_bytes(bytes(raw))
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        result = [r[0] for r in conn.execute("PRAGMA quick_check")]
    except sqlite3.DatabaseError:
        result = ["malformed"]
    finally:
        conn.close()
    assert result != ["ok"], "the corruption must make quick_check fail"


def _foreign_id(path: Path) -> None:
    conn = sqlite3.connect(str(path))
    with conn:
        conn.execute("UPDATE meta SET value = 'another-spool' WHERE key = 'spool_id'")
    conn.close()


# -- a store it cannot trust: refused, --accept-loss or not ---------------------------------------


def _unlink(path: Path) -> None:
    path.unlink()


STORE_CASES: list[tuple[str, Callable[[Cmcd], Path], tuple[str, ...]]] = [
    ("store-deleted", lambda d: _do(d.root / "cmcd.db", _unlink), ("store is missing", "holds 3 messages")),
    ("store-truncated", lambda d: _do(d.root / "cmcd.db", _truncate), ("empty (0 bytes)",)),
    ("store-header-garbled", lambda d: _do(d.root / "cmcd.db", _garble_header), ("not a SQLite database",)),
    ("store-page-corrupt", lambda d: _do(d.root / "cmcd.db", _corrupt_page), ("store fails SQLite's quick_check",)),
    (
        "key-without-store",
        lambda d: _do(d.root / "cmcd.db", _unlink, also=d.shards()),
        ("store is missing", "data key", "remove the key file"),
    ),
]


def _do(path: Path, damage: Callable[[Path], None], also: list[Path] | None = None) -> Path:
    damage(path)
    for p in also or []:
        p.unlink()
    return path


@pytest.mark.parametrize(("damage", "words"), [c[1:] for c in STORE_CASES], ids=[c[0] for c in STORE_CASES])
def test_a_store_it_cannot_trust_stops_start_up(copy: Cmcd, damage, words) -> None:  # type: ignore[no-untyped-def]
    file = damage(copy)
    before = file.read_bytes() if file.exists() else None
    spool_before = _spool_bytes(copy)
    line = _assert_refused(_serve(copy), file, *words)
    assert "cmcd restore" in line
    # --accept-loss cannot stand in for a store: refused the same way
    _assert_refused(_serve(copy, "--accept-loss"), file, *words)
    # and nothing was changed or created
    assert (file.read_bytes() if file.exists() else None) == before
    assert _spool_bytes(copy) == spool_before
    assert (copy.root / "data.key").exists()


# -- a spool it cannot trust: refused, then --accept-loss records the loss ------------------------

SPOOL_CASES: list[tuple[str, Callable[[Path], None] | None, tuple[str, ...]]] = [
    ("spool-deleted", _unlink, ("spool is missing",)),
    ("spool-truncated", _truncate, ("empty (0 bytes)",)),
    ("spool-page-corrupt", lambda p: _corrupt_page(p, interior=True), ("spool fails SQLite's quick_check",)),
    ("spool-of-another-store", _foreign_id, ("not the spool of the store",)),
]


@pytest.mark.parametrize(("damage", "words"), [c[1:] for c in SPOOL_CASES], ids=[c[0] for c in SPOOL_CASES])
def test_a_spool_it_cannot_trust_stops_start_up_until_the_loss_is_accepted(  # type: ignore[no-untyped-def]
    copy: Cmcd, pristine: Pristine, damage, words
) -> None:
    spool = _held(copy, pristine)
    damage(spool)
    before = spool.read_bytes() if spool.exists() else None
    line = _assert_refused(_serve(copy), spool, *words)
    assert "--accept-loss" in line
    assert (spool.read_bytes() if spool.exists() else None) == before, "a refused start changed the spool"

    _start(copy, "--accept-loss")
    try:
        aside = sorted(spool.parent.glob(f"{spool.name}.lost-*"))
        if before is None:
            assert aside == []
        else:
            assert [p.name for p in aside if not p.name.endswith(("-wal", "-shm"))] == [aside[0].name]
            assert aside[0].read_bytes() == before, "the bad spool must be kept aside as it was"
        rows = json.loads(_cmcctl(copy, "log", "mail", "--status", "lost", "--format", "json"))
        got = sorted((r["queue_id"], r["rcpt"]) for r in rows)
        assert got == sorted((q, r) for q, rcpts in pristine.queued.items() for r in rcpts)
        assert all(r["event"] == "lost" and r["status"] == "lost" and str(spool) in r["response"] for r in rows)
        lost_lines = [line for line in copy.log if "event=message_lost" in line]
        assert sorted(line.split("queue_id=")[1].split()[0] for line in lost_lines) == sorted(pristine.queued)
        assert copy.wait_log("event=spool_loss_accepted messages=3 recipients=4")
    finally:
        assert copy.stop(signal.SIGTERM) == 0
    # the new spool is the store's own now: a plain start works, and nothing more is lost
    copy.log.clear()
    copy.start()
    try:
        rows = json.loads(_cmcctl(copy, "log", "mail", "--status", "lost", "--format", "json"))
        assert len(rows) == 4
        assert not [line for line in copy.log if "event=message_lost" in line]
    finally:
        assert copy.stop() == 0


def test_accept_loss_on_an_intact_spool_loses_nothing(copy: Cmcd, pristine: Pristine) -> None:
    _start(copy, "--accept-loss")
    try:
        assert json.loads(_cmcctl(copy, "log", "mail", "--status", "lost", "--format", "json")) == []
        assert copy.wait_log("event=accept_loss_unused")
        assert not list((copy.root / "spool").glob("queue*.db.lost-*"))
    finally:
        assert copy.stop() == 0
    assert set(copy.spooled()) == set(pristine.queued)
