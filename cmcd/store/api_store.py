"""The tenant API's rows in the store: API keys, TOTP enrolment, session tokens, message tags.

A mixin of Store (same connection, same single thread). Secrets are never stored in the clear:
API keys and session tokens as SHA-256 digests (they are long random strings, so a plain digest
is enough and lookups stay O(1)); TOTP secrets encrypted with the data key; recovery codes as
digests.

A session ends when the user's credentials or standing change: every store method that changes a
password, the enabled flag, the role or the TOTP enrolment, or deletes the user, calls
_end_sessions in its own transaction, so every door (cmcctl, the API) ends them alike.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from cmcd import crypto
from cmcd.db import transaction
from cmcd.errors import Conflict, NotFound, StoreError
from cmcd.records import Tenant, User

KEY_PREFIX = "cmk_"
SESSION_PREFIX = "cms_"
#: how stale a session's last_used may get before a request writes it again (one write a minute)
SESSION_TOUCH_S = 60.0
#: how stale an API key's last_used may get before a use writes it again (one write an hour a key)
KEY_TOUCH_S = 3600.0
#: roles whose credentials may send mail (over SMTP AUTH as over the API)
_KEY_ID_CHARS = "abcdefghijkmnpqrstuvwxyz23456789"


@dataclass(frozen=True)
class ApiCaller:
    """Who an API request acts for: the user, the tenant and the role of the credential."""

    user_id: int
    tenant_id: int
    tenant: str
    login: str
    role: str
    credential: str  # "key:<key id>" or "session:<session id>"


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def session_id(token_hash: bytes) -> str:
    """A session's public id: the first 8 bytes of its token's SHA-256 digest, in hex. The
    digest of 256 random bits says nothing of the token, and the token is never shown again."""
    return bytes(token_hash[:8]).hex()


def split_api_key(token: str) -> str | None:
    """The key id of a token "cmk_<id>_<secret>", or None if it does not look like one."""
    if not token.startswith(KEY_PREFIX):
        return None
    key_id, sep, secret = token[len(KEY_PREFIX) :].partition("_")
    if not sep or len(key_id) != 12 or not secret:
        return None
    return key_id


class ApiStore:
    """Methods Store gets for the API; see the module docstring."""

    conn: sqlite3.Connection
    keys: crypto.DataKeys

    # provided by Store
    def tenant(self, name: str) -> Tenant:  # pragma: no cover - Store's
        raise NotImplementedError

    def user(self, tenant: str, login: str) -> User:  # pragma: no cover - Store's
        raise NotImplementedError

    # -- API keys ------------------------------------------------------------------------------

    def apikey_add(self, tenant: str, login: str, role: str | None = None) -> tuple[dict[str, Any], str]:
        """A new key for TENANT/LOGIN: (its listing row, the token, shown once). ROLE defaults to the
        user's; only an admin user may hold a key of another role (narrower or not)."""
        u = self.user(tenant, login)
        role = role or u.role
        if role != u.role and u.role != "admin":
            raise StoreError(f"user {login!r} has role {u.role!r}; only an admin user may hold a {role!r} key")
        key_id = "".join(secrets.choice(_KEY_ID_CHARS) for _ in range(12))
        token = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        now = time.time()
        with transaction(self.conn):
            self.conn.execute(
                "INSERT INTO api_keys(tenant_id, user_id, key_id, key_hash, role, created) VALUES (?,?,?,?,?,?)",
                (u.tenant_id, u.id, key_id, digest(token), role, now),
            )
        return {"key_id": key_id, "login": login, "role": role, "created": now, "revoked": None}, token

    def apikeys(self, tenant: str, login: str | None = None) -> list[dict[str, Any]]:
        """TENANT's keys (of LOGIN), oldest first: id, login, role, created, revoked and last_used
        (written at most once every KEY_TOUCH_S, so it is as of that); never the tokens."""
        t = self.tenant(tenant)
        sql = (
            "SELECT k.key_id, u.login, k.role, k.created, k.revoked, k.last_used FROM api_keys k "
            "JOIN users u ON u.id = k.user_id WHERE k.tenant_id = ?"
        )
        args: list[Any] = [t.id]
        if login is not None:
            self.user(tenant, login)
            sql += " AND u.login = ?"
            args.append(login)
        keys = ("key_id", "login", "role", "created", "revoked", "last_used")
        return [dict(zip(keys, r)) for r in self.conn.execute(sql + " ORDER BY k.id", args)]

    def apikey_revoke(self, tenant: str, key_id: str) -> None:
        t = self.tenant(tenant)
        with transaction(self.conn):
            cur = self.conn.execute(
                "UPDATE api_keys SET revoked = ? WHERE tenant_id = ? AND key_id = ? AND revoked IS NULL",
                (time.time(), t.id, key_id),
            )
        if cur.rowcount == 0:
            raise NotFound(f"no active API key {key_id!r} in tenant {tenant!r}")

    def apikey_caller(self, token: str) -> ApiCaller | None:
        """The caller a token names, or None (unknown, wrong secret, revoked, user disabled, or a key
        of a role the user may no longer hold: only an admin may hold a key of another role)."""
        key_id = split_api_key(token)
        if key_id is None:
            return None
        row = self.conn.execute(
            "SELECT k.key_hash, k.revoked, k.role, u.id, u.tenant_id, t.name, u.login, u.enabled, u.role, k.last_used "
            "FROM api_keys k JOIN users u ON u.id = k.user_id JOIN tenants t ON t.id = k.tenant_id WHERE k.key_id = ?",
            (key_id,),
        ).fetchone()
        if row is None or not hmac.compare_digest(bytes(row[0]), digest(token)) or row[1] is not None or not row[7]:
            return None
        if row[2] != row[8] and row[8] != "admin":  # the user's role changed since the key was made
            return None
        now = time.time()
        if row[9] is None or row[9] < now - KEY_TOUCH_S:
            try:  # advisory (cmcctl evidence: keys unused for 90 days): no request fails for it
                with transaction(self.conn):
                    self.conn.execute("UPDATE api_keys SET last_used = ? WHERE key_id = ?", (now, key_id))
            except sqlite3.Error:
                pass
        return ApiCaller(row[3], row[4], row[5], row[6], row[2], f"key:{key_id}")

    # -- TOTP ----------------------------------------------------------------------------------

    def otp_enroll(self, tenant: str, login: str, secret: bytes) -> User:
        """Start (or restart) enrolment; refused once a confirmed enrolment exists (otp_disable first)."""
        u = self.user(tenant, login)
        if u.role == "sender":
            raise StoreError(f"user {login!r} has role 'sender'; only admins and viewers sign in with TOTP")
        row = self.conn.execute("SELECT confirmed FROM otp WHERE user_id = ?", (u.id,)).fetchone()
        if row is not None and row[0]:
            raise Conflict(f"user {login!r} is already enrolled; `user otp-disable` first to enrol again")
        with transaction(self.conn):
            self.conn.execute(
                "INSERT INTO otp(user_id, tenant_id, secret_enc, confirmed, recovery, last_step, created) "
                "VALUES (?,?,?,0,'',0,?) ON CONFLICT(user_id) DO UPDATE SET secret_enc = excluded.secret_enc, "
                "confirmed = 0, recovery = '', last_step = 0, created = excluded.created",
                (u.id, u.tenant_id, self.keys.encrypt_bytes(secret, self._otp_aad(u.id)), time.time()),
            )
            self._end_sessions(u.id)
        return u

    @staticmethod
    def _otp_aad(user_id: int) -> bytes:
        return f"otp:{user_id}".encode()

    def otp_state(self, user_id: int) -> tuple[bytes, bool, list[str], int] | None:
        """(secret, confirmed, recovery code digests, last used step) or None when not enrolled."""
        row = self.conn.execute(
            "SELECT secret_enc, confirmed, recovery, last_step FROM otp WHERE user_id = ?", (user_id,)
        ).fetchone()
        if row is None:
            return None
        secret = self.keys.decrypt_bytes(bytes(row[0]), self._otp_aad(user_id))
        return secret, bool(row[1]), [h for h in row[2].split(",") if h], row[3]

    def otp_enrolled(self, user_id: int) -> bool:
        """True once the user's TOTP enrolment is confirmed: the user signs in as a person, and the
        password alone is no SMTP credential (applications use an API key)."""
        row = self.conn.execute("SELECT confirmed FROM otp WHERE user_id = ?", (user_id,)).fetchone()
        return row is not None and bool(row[0])

    def otp_use_step(self, user_id: int, step: int, *, confirm_with: list[str] | None = None) -> bool:
        """Record STEP as used if it is newer than the last one (so a code works once); with
        CONFIRM_WITH, also confirm the enrolment and store those recovery code digests."""
        with transaction(self.conn):
            if confirm_with is not None:
                cur = self.conn.execute(
                    "UPDATE otp SET last_step = ?, confirmed = 1, recovery = ? WHERE user_id = ? AND last_step < ? "
                    "AND confirmed = 0",
                    (step, ",".join(confirm_with), user_id, step),
                )
            else:
                cur = self.conn.execute(
                    "UPDATE otp SET last_step = ? WHERE user_id = ? AND last_step < ? AND confirmed = 1",
                    (step, user_id, step),
                )
        return cur.rowcount == 1

    def otp_use_recovery(self, user_id: int, code_digest: str) -> bool:
        """Spend one recovery code; True if it was unused."""
        with transaction(self.conn):
            row = self.conn.execute(
                "SELECT recovery FROM otp WHERE user_id = ? AND confirmed = 1", (user_id,)
            ).fetchone()
            if row is None:
                return False
            left = [h for h in row[0].split(",") if h]
            match = next((h for h in left if hmac.compare_digest(h, code_digest)), None)
            if match is None:
                return False
            left.remove(match)
            self.conn.execute("UPDATE otp SET recovery = ? WHERE user_id = ?", (",".join(left), user_id))
        return True

    def otp_disable(self, tenant: str, login: str) -> None:
        u = self.user(tenant, login)
        with transaction(self.conn):
            cur = self.conn.execute("DELETE FROM otp WHERE user_id = ?", (u.id,))
            self._end_sessions(u.id)
        if cur.rowcount == 0:
            raise NotFound(f"user {login!r} of tenant {tenant!r} has no TOTP enrolment")

    # -- session tokens ------------------------------------------------------------------------

    def _end_sessions(self, user_id: int) -> int:
        """End every session of USER_ID; call inside the transaction of the change that ends them."""
        return self.conn.execute("DELETE FROM api_sessions WHERE user_id = ?", (user_id,)).rowcount

    def session_add(self, token: str, user_id: int, tenant_id: int, expires: float) -> str:
        """Record a new session token (as its digest); returns the session's public id."""
        now = time.time()
        token_hash = digest(token)
        with transaction(self.conn):
            self.conn.execute("DELETE FROM api_sessions WHERE expires < ?", (now,))
            self.conn.execute(
                "INSERT INTO api_sessions(token_hash, user_id, tenant_id, expires, created, last_used) "
                "VALUES (?,?,?,?,?,?)",
                (token_hash, user_id, tenant_id, expires, now, now),
            )
        return session_id(token_hash)

    def session_caller(self, token: str, now: float) -> ApiCaller | None:
        token_hash = digest(token)
        row = self.conn.execute(
            "SELECT s.expires, u.id, u.tenant_id, t.name, u.login, u.role, u.enabled, s.last_used FROM api_sessions s "
            "JOIN users u ON u.id = s.user_id JOIN tenants t ON t.id = u.tenant_id WHERE s.token_hash = ? "
            "AND s.kind = 'api'",  # a console cookie is no Bearer token (cmcd/store/console_store.py)
            (token_hash,),
        ).fetchone()
        if row is None or row[0] < now or not row[6]:
            return None
        if row[7] is None or row[7] < now - SESSION_TOUCH_S:
            try:  # advisory (cmcctl session list): a store that cannot be written fails no request for it
                with transaction(self.conn):
                    self.conn.execute("UPDATE api_sessions SET last_used = ? WHERE token_hash = ?", (now, token_hash))
            except sqlite3.Error:
                pass
        return ApiCaller(row[1], row[2], row[3], row[4], row[5], f"session:{session_id(token_hash)}")

    def session_end(self, token: str) -> bool:
        """Sign-out: end the session TOKEN names; False if it was not (or no longer) there."""
        with transaction(self.conn):
            cur = self.conn.execute("DELETE FROM api_sessions WHERE token_hash = ?", (digest(token),))
        return cur.rowcount == 1

    def sessions(self, tenant: str, login: str, now: float | None = None) -> list[dict[str, Any]]:
        """TENANT/LOGIN's live sessions, oldest first: id, created, expires, last_used (never the token)."""
        u = self.user(tenant, login)
        rows = self.conn.execute(
            "SELECT token_hash, created, expires, last_used FROM api_sessions WHERE user_id = ? AND expires >= ? "
            "ORDER BY created, rowid",
            (u.id, time.time() if now is None else now),
        )
        return [
            {"id": session_id(bytes(r[0])), "login": login, "created": r[1], "expires": r[2], "last_used": r[3]}
            for r in rows
        ]

    def session_revoke(self, tenant: str, login: str, sid: str | None) -> int:
        """End one session of TENANT/LOGIN by its id, or all of them (SID None); returns how many
        ended. An id that is not one of this user's sessions is NotFound."""
        u = self.user(tenant, login)
        with transaction(self.conn):
            if sid is None:
                return self._end_sessions(u.id)
            ended = 0
            for (token_hash,) in self.conn.execute(
                "SELECT token_hash FROM api_sessions WHERE user_id = ?", (u.id,)
            ).fetchall():
                if session_id(bytes(token_hash)) == sid.lower():
                    ended += self.conn.execute("DELETE FROM api_sessions WHERE token_hash = ?", (token_hash,)).rowcount
        if not ended:
            raise NotFound(f"user {login!r} of tenant {tenant!r} has no session {sid!r}")
        return ended

    # -- block list (suppressions) through the API -------------------------------------------

    def suppression_page(self, tenant_id: int, after: int, limit: int, address: str | None) -> list[dict[str, Any]]:
        """A page of TENANT_ID's suppressions after row AFTER; each one's stream scope is "all" (every
        stream: a bounce, an operator's or the tenant's block) or "broadcast" (the recipient unsubscribed);
        a bounce's block has its class and when it expires (None: never)."""
        sql = (
            "SELECT id, address_enc, domain, reason_enc, created, stream, bounce_class, expires FROM suppressions "
            "WHERE tenant_id = ? AND id > ?"
        )
        args: list[Any] = [tenant_id, after]
        if address is not None:
            sql += " AND address_hmac = ?"
            args.append(self.keys.index(address))
        rows = self.conn.execute(sql + " ORDER BY id LIMIT ?", (*args, limit))
        return [
            {"id": r[0], "address": self.keys.decrypt(bytes(r[1])), "domain": r[2], "reason": self.keys.open_text(r[3]),
             "created": r[4], "stream": r[5] or "all", "bounce_class": r[6], "expires": r[7]}
            for r in rows
        ]  # fmt: skip

    # -- tags ----------------------------------------------------------------------------------

    def message_tags(self, queue_ids: list[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for i in range(0, len(queue_ids), 500):
            chunk = queue_ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            for qid, tags in self.conn.execute(
                f"SELECT queue_id, tags FROM message_tags WHERE queue_id IN ({marks})", chunk
            ):
                out[qid] = tags.split(",")
        return out
