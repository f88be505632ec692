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
