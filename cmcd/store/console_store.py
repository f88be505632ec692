"""What the tenant console keeps in the store: its sign-in sessions (a row of api_sessions of kind
'console', at a stage until the one-time code or the TOTP enrolment is done), the tenant settings
it shows (one-time passwords for every console user, the time zone of its pages), and the
aggregates its dashboard draws from the mail log.

A console session is never an API session: the API's Bearer check (api_store.session_caller) takes
only kind 'api', and this module's check only kind 'console'. Tokens are kept as digests, as API
session tokens are. Never speaks HTTP.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from cmcd import crypto
from cmcd.db import transaction
from cmcd.records import Tenant, User
from cmcd.store.api_store import SESSION_TOUCH_S, ApiCaller, digest, session_id

#: the stages of a console sign-in before it is complete ("" once it is)
STAGE_CODE = "code"  # the password was right; the one-time code (or a recovery code) is next
STAGE_ENROL = "enrol"  # the password was right; one-time passwords are required and not set up yet
STAGES = ("", STAGE_CODE, STAGE_ENROL)
#: mail-log events the dashboard counts, in the order it shows them
DASHBOARD_EVENTS = ("accepted", "delivered", "deferred", "bounced", "suppressed")


@dataclass(frozen=True)
class ConsoleSession:
    """Who a console cookie signs in, and how far the sign-in got."""

    caller: ApiCaller
    stage: str
    #: the session's public id (a prefix of its token's digest), for the login log and sign-out
    sid: str
    #: when the sign-in checked the password (every session it goes on in ends by signed_in + the
    #: console's session lifetime), and when this one ends
    signed_in: float = 0.0
    expires: float = 0.0
    #: the tenant's time zone for its pages ("": the server's)
    timezone: str = ""


class ConsoleStore:
    """Methods Store gets for the console; see the module docstring."""

    conn: sqlite3.Connection
    keys: crypto.DataKeys

    # provided by Store
    def tenant(self, name: str) -> Tenant:  # pragma: no cover - Store's
        raise NotImplementedError

    def user(self, tenant: str, login: str) -> User:  # pragma: no cover - Store's
        raise NotImplementedError

    # -- sessions ------------------------------------------------------------------------------

    def console_session_add(
        self, token: str, user_id: int, tenant_id: int, expires: float, stage: str = "", signed_in: float = 0.0
    ) -> str:
        """Record a console session at STAGE for TOKEN (as its digest) of the sign-in that checked
        the password at SIGNED_IN (0: now); returns its public id."""
        if stage not in STAGES:
            raise ValueError(f"unknown console sign-in stage {stage!r}")
        now = time.time()
        token_hash = digest(token)
        with transaction(self.conn):
            self.conn.execute("DELETE FROM api_sessions WHERE expires < ?", (now,))
            self.conn.execute(
                "INSERT INTO api_sessions(token_hash, user_id, tenant_id, expires, created, last_used, kind, stage, "
                "signed_in) VALUES (?,?,?,?,?,?,'console',?,?)",
                (token_hash, user_id, tenant_id, expires, now, now, stage, signed_in or now),
            )
        return session_id(token_hash)

    def console_session(self, token: str, now: float, idle_s: float) -> ConsoleSession | None:
        """The console session TOKEN names, or None when there is none, it expired, it was idle
        for IDLE_S, or its user is disabled or deleted. Marks it used (at most once a minute).

        A signed-in session whose user must have TOTP and has none (an admin, or one-time
        passwords required of the user or of the whole tenant since it signed in) is at the
        enrolment stage: a requirement holds from the next request, not from the next sign-in."""
        token_hash = digest(token)
        row = self.conn.execute(
            "SELECT s.expires, u.id, u.tenant_id, t.name, u.login, u.role, u.enabled, s.last_used, s.stage, "
            "s.signed_in, (u.role = 'admin' OR u.otp_required OR t.console_otp) AND COALESCE(o.confirmed, 0) = 0, "
            "t.timezone "
            "FROM api_sessions s JOIN users u ON u.id = s.user_id JOIN tenants t ON t.id = u.tenant_id "
            "LEFT JOIN otp o ON o.user_id = u.id WHERE s.token_hash = ? AND s.kind = 'console'",
            (token_hash,),
        ).fetchone()
        if row is None or row[0] < now or not row[6] or (row[7] or 0) < now - idle_s:
            return None
        if row[7] < now - SESSION_TOUCH_S:
            try:  # a store that cannot be written fails no page for it (the idle clock runs on)
                with transaction(self.conn):
                    self.conn.execute("UPDATE api_sessions SET last_used = ? WHERE token_hash = ?", (now, token_hash))
            except sqlite3.Error:
                pass
        sid = session_id(token_hash)
        caller = ApiCaller(row[1], row[2], row[3], row[4], row[5], f"console:{sid}")
        stage = STAGE_ENROL if row[8] == "" and row[10] else row[8]
        return ConsoleSession(caller, stage, sid, row[9] or 0.0, row[0], row[11])

    def console_session_end(self, token: str) -> bool:
        """Sign-out: end the console session TOKEN names; False if it was not there."""
        with transaction(self.conn):
            cur = self.conn.execute(
                "DELETE FROM api_sessions WHERE token_hash = ? AND kind = 'console'", (digest(token),)
            )
        return cur.rowcount == 1

    # -- settings ------------------------------------------------------------------------------

    def console_settings(self, tenant_id: int) -> tuple[bool, str]:
        """(one-time passwords required of every console user, the tenant's time zone or "")."""
        row = self.conn.execute("SELECT console_otp, timezone FROM tenants WHERE id = ?", (tenant_id,)).fetchone()
        return (bool(row[0]), row[1]) if row is not None else (False, "")

    def console_otp_needed(self, user_id: int) -> bool:
        """Whether USER_ID signs in to the console only with TOTP: an admin always (as the API's
        session login), anyone whose tenant or admin requires one-time passwords."""
        row = self.conn.execute(
            "SELECT u.role = 'admin' OR u.otp_required OR t.console_otp FROM users u JOIN tenants t ON t.id = u.tenant_id "
            "WHERE u.id = ?",
            (user_id,),
        ).fetchone()
        return row is not None and bool(row[0])

    def user_set_otp_required(self, tenant: str, login: str, required: bool) -> User:
        u = self.user(tenant, login)
        with transaction(self.conn):
            self.conn.execute("UPDATE users SET otp_required = ? WHERE id = ?", (int(required), u.id))
        return u

    def users_otp(self, tenant_id: int) -> dict[int, tuple[bool, bool]]:
        """user id -> (TOTP enrolled and confirmed, one-time passwords required of the user)."""
        rows = self.conn.execute(
            "SELECT u.id, COALESCE(o.confirmed, 0), u.otp_required FROM users u LEFT JOIN otp o ON o.user_id = u.id "
            "WHERE u.tenant_id = ?",
            (tenant_id,),
        )
        return {r[0]: (bool(r[1]), bool(r[2])) for r in rows}


# -- dashboard: reads over any connection (AsyncStore.report's read-only one) ----------------------


def mail_counts(
    conn: sqlite3.Connection, tenant_id: int, since: float, until: float, bucket_s: int, offset_s: int
) -> list[Any]:
    """TENANT_ID's mail-log events per bucket of BUCKET_S seconds (a bucket starts where local
    time, UTC + OFFSET_S, is a multiple of it): rows (bucket start, event, count), events of
    DASHBOARD_EVENTS only, between SINCE and UNTIL."""
    marks = ",".join("?" * len(DASHBOARD_EVENTS))
    return conn.execute(
        f"SELECT CAST((ts + ?) / ? AS INTEGER) * ? - ?, event, COUNT(*) FROM mail_log "
        f"WHERE tenant_id = ? AND ts >= ? AND ts < ? AND event IN ({marks}) GROUP BY 1, 2 ORDER BY 1",
        (offset_s, bucket_s, bucket_s, offset_s, tenant_id, since, until, *DASHBOARD_EVENTS),
    ).fetchall()


def top_bouncing_domains(
    conn: sqlite3.Connection, tenant_id: int, since: float, until: float, limit: int = 10
) -> list[Any]:
    """(recipient domain, bounces) of TENANT_ID between SINCE and UNTIL, most first."""
    return conn.execute(
        "SELECT rcpt_domain, COUNT(*) FROM mail_log WHERE tenant_id = ? AND ts >= ? AND ts < ? "
        "AND event IN ('bounced', 'expired') AND rcpt_domain IS NOT NULL GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT ?",
        (tenant_id, since, until, limit),
    ).fetchall()
