"""SQLite transactions for connections opened in autocommit mode (isolation_level=None).

In autocommit mode `with conn:` does not open a transaction: every statement would commit (and
fsync) on its own. Everything that changes more than one row goes through transaction().
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK when the body (or the COMMIT) fails.

    Inside a transaction already open on CONN it is a savepoint: the outer transaction commits
    both or neither (a tenancy command wraps a store method, its operation-log row and the
    directory version in one)."""
    if conn.in_transaction:
        with _savepoint(conn):
            yield conn
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


@contextlib.contextmanager
def _savepoint(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("SAVEPOINT nested")
    try:
        yield
        conn.execute("RELEASE nested")
    except BaseException:
        if conn.in_transaction:  # SQLite may have rolled the whole transaction back itself (disk full)
            conn.execute("ROLLBACK TO nested")
            conn.execute("RELEASE nested")
        raise


#: how long the store's connection waits for a lock another process holds (a backup, another worker)
STORE_BUSY_MS = 30_000
#: a write a client waits on (a login's failure count, a quota block) waits at most this long
CLIENT_WAIT_MS = 500


@contextlib.contextmanager
def lock_wait(conn: sqlite3.Connection, ms: int = CLIENT_WAIT_MS) -> Iterator[None]:
    """Inside: a write that finds the file locked by another process waits at most MS (then
    "database is locked"), not the connection's usual wait (STORE_BUSY_MS, or whatever it was
    set to, which it gets back after): for writes a waiting client must not wait for."""
    usual = int(conn.execute("PRAGMA busy_timeout").fetchone()[0])
    conn.execute(f"PRAGMA busy_timeout = {int(ms)}")
    try:
        yield
    finally:
        conn.execute(f"PRAGMA busy_timeout = {usual}")
