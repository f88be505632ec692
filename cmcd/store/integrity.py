"""Start-up checks of a SQLite file: check_database() says whether a file is a whole SQLite
database (not empty, a SQLite header, `PRAGMA quick_check` clean) and raises UntrustedFileError,
one line naming the file and the way out, when it is not. Never repairs a file, never deletes one.
(What the store knows about a lost spool is in cmcd.store.lost.)
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from cmcd.errors import UntrustedFileError

SQLITE_HEADER = b"SQLite format 3\x00"
#: the way out for a store that cannot be trusted: --accept-loss has nothing safe to start from
RESTORE_STORE = (
    "restore the store from a backup with `cmcd restore BACKUP` (cmcd serve --accept-loss cannot replace a store)"
)


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def database_problem(path: Path, what: str) -> str:
    """What is wrong with PATH (which exists) as a SQLite database, or "" when it is whole; WHAT
    names it ("store", "spool"). A file that cannot be read at all raises UntrustedFileError.
    Blocking: quick_check reads every page."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except OSError as exc:  # not a damaged file: a backup is not the answer
        raise UntrustedFileError(
            f"{path}: cannot read the {what}: {exc.strerror or exc}; check the path, its owner and mode"
        ) from None
    if size == 0:
        return f"the {what} is empty (0 bytes)"
    if head != SQLITE_HEADER:
        return f"the {what} is not a SQLite database (its header is garbled)"
    try:
        conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=30)
    except sqlite3.Error as exc:
        return f"cannot open the {what} ({_one_line(str(exc))})"
    try:
        rows = conn.execute("PRAGMA quick_check").fetchall()
    except sqlite3.Error as exc:
        return f"the {what} fails SQLite's quick_check ({_one_line(str(exc))})"
    finally:
        conn.close()
    if [r[0] for r in rows] != ["ok"]:
        return f"the {what} fails SQLite's quick_check ({_one_line('; '.join(str(r[0]) for r in rows[:3]))})"
    return ""


def check_database(path: Path, what: str, way_out: str) -> None:
    """Raise UntrustedFileError ("PATH: what is wrong; WAY_OUT") unless PATH is a whole SQLite database."""
    problem = database_problem(path, what)
    if problem:
        raise UntrustedFileError(f"{path}: {problem}; {way_out}")
