"""Failed logins in the store, counted by every worker process together: the login throttles of
cmcd/submit/auth.py and the pause of a user after bad one-time codes (cmcd/api/sessions.py);
never decides which keys a login counts against or what the limits are, and never writes the
login log (log_store's; a login-log row is the record, a row here only a count).

A mixin of Store (same connection, same single thread). One row per failure and per key it counts
against (an address, one login from an address, one user's one-time codes): the key as an HMAC
under the data key's index key (the store is backed up: no address or login in the clear here),
the time of the failure and the time it stops counting (until), so rows of different windows
share the table. A count is of one key's rows newer than the window (the (key_hmac, ts) index:
one short range, however busy the host). Rows past their until are dropped by the next write.

A check that takes time (scrypt) claims its rows before it runs: failure_claim() counts and adds
in one write transaction, so concurrent checks in every worker see each other, and no check runs
once a limit is reached. A check that succeeds gives its rows back (failure_release); one that
fails, or is cut short, leaves them as its failure. A tenant's purge leaves its rows to age out:
they hold no name, and they go within the window.
"""

from __future__ import annotations

import hmac
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from cmcd import crypto
from cmcd.db import lock_wait, transaction


@dataclass(frozen=True)
class FailureClaim:
    """What failure_claim() did: HELD, the index of the first limit already reached (nothing was
    added), or None and the ROWS it added; COUNTS, each key's failures with them."""

    held: int | None
    rows: tuple[int, ...]
    counts: tuple[int, ...]
    #: with pending claims: nothing added because checks under way would reach the limit of
    #: this key if they failed (the index); ask again once they are settled
    busy: int | None = None


class ThrottleStore:
    """Methods Store gets for failed-login counts; see the module docstring."""

    conn: sqlite3.Connection
    keys: crypto.DataKeys

    def _failure_key(self, key: str) -> bytes:
        return hmac.digest(self.keys.index_key, b"login-failure\0" + key.encode("utf-8", "surrogateescape"), "sha256")[
            :16
        ]

    def _failure_counts(self, digests: Sequence[bytes], since: float, *, pending: bool = False) -> tuple[int, ...]:
        """Each key's failures since SINCE; PENDING: its checks under way instead."""
        return tuple(
            int(
                self.conn.execute(
                    "SELECT COUNT(*) FROM login_failures WHERE key_hmac = ? AND ts > ? AND pending = ?",
                    (digest, since, int(pending)),
                ).fetchone()[0]
            )
            for digest in digests
        )

    def failure_counts(self, keys: Sequence[str], window_s: float, now: float) -> tuple[int, ...]:
        """Each of KEYS's failures within the last WINDOW_S seconds before NOW (a read, no lock)."""
        return self._failure_counts([self._failure_key(k) for k in keys], now - window_s)

    def failure_claim(
        self,
        limits: Sequence[tuple[str, int]],
        window_s: float,
        now: float,
        *,
        instead: str | None = None,
        pending: bool = False,
    ) -> FailureClaim:
        """In one write transaction: unless a key of LIMITS ((key, limit); a limit of 0 or less is
        none) already has its limit of failures within WINDOW_S, add one failure at NOW to every
        key. A reached limit adds nothing, or, with INSTEAD, one row under that key (counted for no
        one), so the transaction writes the same whether a limit held or not.

        PENDING: the rows are checks under way (a password being checked), failures only once
        failure_confirm() says so, and nothing is added while the checks already under way would
        reach a limit if they all failed (busy: ask again when they are settled). So logins that
        run at once are never refused for each other's claims, and guesses that run at once on
        every worker still get no more checks than the limit."""
        digests = [self._failure_key(k) for k, _ in limits]
        with lock_wait(self.conn), transaction(self.conn):
            self.conn.execute("DELETE FROM login_failures WHERE until < ?", (now,))
            counts = self._failure_counts(digests, now - window_s)
            under_way = self._failure_counts(digests, now - window_s, pending=True)
            if not pending:  # a claim that is its failure at once: what is under way counts too
                counts = tuple(a + b for a, b in zip(counts, under_way, strict=True))
            held = next((i for i, (n, (_, limit)) in enumerate(zip(counts, limits)) if 0 < limit <= n), None)
            if held is not None:
                if instead is not None:
                    self._add_failures([self._failure_key(instead)], window_s, now)
                return FailureClaim(held, (), counts)
            if pending:
                busy = next(
                    (i for i, (n, w, (_, limit)) in enumerate(zip(counts, under_way, limits)) if 0 < limit <= n + w),
                    None,
                )
                if busy is not None:
                    return FailureClaim(None, (), counts, busy=busy)
            rows = self._add_failures(digests, window_s, now, pending=pending)
        return FailureClaim(None, rows, tuple(n + w + 1 for n, w in zip(counts, under_way, strict=True)))

    def failure_confirm(self, rows: Sequence[int]) -> None:
        """Checks claimed pending (ROWS) failed: they count as failures now."""
        if not rows:
            return
        with lock_wait(self.conn), transaction(self.conn):
            self.conn.executemany("UPDATE login_failures SET pending = 0 WHERE id = ?", [(r,) for r in rows])

    def failure_add(self, keys: Sequence[str], window_s: float, now: float) -> tuple[int, ...]:
        """One failure at NOW for each of KEYS, whatever the counts: a failure found after the fact.
        Returns each key's failures within WINDOW_S, this one included."""
        digests = [self._failure_key(k) for k in keys]
        with lock_wait(self.conn), transaction(self.conn):
            self.conn.execute("DELETE FROM login_failures WHERE until < ?", (now,))
            self._add_failures(digests, window_s, now)
            return self._failure_counts(digests, now - window_s)

    def failure_release(self, rows: Sequence[int]) -> None:
        """A check that claimed ROWS succeeded: they count no more."""
        if not rows:
            return
        with lock_wait(self.conn), transaction(self.conn):
            self.conn.executemany("DELETE FROM login_failures WHERE id = ?", [(r,) for r in rows])

    def _add_failures(
        self, digests: Sequence[bytes], window_s: float, now: float, *, pending: bool = False
    ) -> tuple[int, ...]:
        rows = []
        for digest in digests:
            cur = self.conn.execute(
                "INSERT INTO login_failures(key_hmac, ts, until, pending) VALUES (?,?,?,?)",
                (digest, now, now + window_s, int(pending)),
            )
            assert cur.lastrowid is not None
            rows.append(cur.lastrowid)
        return tuple(rows)
