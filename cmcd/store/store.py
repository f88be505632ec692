"""Tenants, users, credentials, domains, suppression and the logs, in one SQLite file.

Every method is blocking: callers on the event loop go through AsyncStore, which runs
them on the store's single thread. Addresses are stored encrypted with an HMAC index; remote
replies (mail_log.response_enc) and suppression reasons (suppressions.reason_enc) are encrypted
too, as a reply echoes the address, and decrypted on read for cmcctl, the API and webhooks.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import sqlite_utils

from cmcd import crypto
from cmcd.db import transaction
from cmcd.errors import Conflict, KeyFileError, NotFound, StoreError, UntrustedFileError
from cmcd.records import Domain, IpCredential, Tenant, User
from cmcd.store.api_store import ApiStore
from cmcd.store.integrity import RESTORE_STORE, check_database
from cmcd.store.quota_store import QuotaStore
from cmcd.store.schema import migrate, schema_version
from cmcd.store.webhook_store import WebhookStore

#: The widest networks an IP credential may name (a /0 would be an open relay for the tenant).
MIN_IPCRED_PREFIX = {4: 16, 6: 48}
_KEY_CHECK = "cmcd key check"


def open_store(path: Path, key_file: Path, create_key: bool = True) -> Store:
    """Open (creating if new) the store; a new store with no key file gets a new key.

    An existing store never gets a new key: its key file must be present, private and
    the one the store was written with. A key file without its store, or a store that is
    empty, garbled or fails SQLite's quick_check, raises UntrustedFileError (blocking: the
    check reads every page).
    """
    is_new = not path.exists()
    if is_new and key_file.exists():
        crypto.read_key_file(key_file)  # an unsafe key file is reported as such first
        raise UntrustedFileError(
            f"{path}: the store is missing, but its data key {key_file} exists; {RESTORE_STORE}, "
            "or, for a new installation, remove the key file (a new store gets a new key)"
        )
    if is_new and create_key:
        crypto.generate_key_file(key_file)
    keys = crypto.read_key_file(key_file)
    if not is_new:
        check_database(path, "store", RESTORE_STORE)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return Store(path, keys)
    except sqlite3.OperationalError as exc:  # the file is whole but cannot be written (mode, owner, disk)
        raise UntrustedFileError(f"{path}: cannot open the store ({exc}); check its owner, mode and disk") from None
    except sqlite3.DatabaseError as exc:  # passed quick_check, yet unusable (an alien schema)
        raise UntrustedFileError(f"{path}: cannot open the store ({exc}); {RESTORE_STORE}") from None


def delete_tenant_rows(conn: sqlite3.Connection, tenant_id: int) -> dict[str, int]:
    """Delete tenant TENANT_ID and every row of it (users, IP credentials, domains and their keys,
    suppressions, API keys, webhooks, daily counts, mail, login and operation log rows, and failed logins
    with one of its login names) inside the caller's transaction; tables an older schema lacks are skipped.
    Used by tenant_purge() on the store and by the purge of a tenant from backups."""
    present = {str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    logins = [r[0] for r in conn.execute("SELECT login FROM users WHERE tenant_id = ?", (tenant_id,))]
    counts: dict[str, int] = {}
    c = conn.execute
    if {"dkim_keys", "domains"} <= present:
        counts["dkim_keys"] = c(
            "DELETE FROM dkim_keys WHERE domain_id IN (SELECT id FROM domains WHERE tenant_id = ?)", (tenant_id,)
        ).rowcount
    for table in ("api_keys", "otp", "api_sessions", "message_tags", "webhooks", "ip_credentials", "users", "domains",
                  "suppressions", "daily_counts", "mail_log", "login_log", "ops_log"):  # fmt: skip
        if table in present:
            counts[table] = c(f"DELETE FROM {table} WHERE tenant_id = ?", (tenant_id,)).rowcount
    # failed logins with one of its login names were logged without a tenant
    counts["login_log"] = counts.get("login_log", 0) + sum(
        c("DELETE FROM login_log WHERE tenant_id IS NULL AND login = ?", (login,)).rowcount for login in logins
    )
    c("DELETE FROM tenants WHERE id = ?", (tenant_id,))
    return counts


def new_event_key() -> str:
    """A unique key for a log row, so a row shipped twice (at-least-once) is stored once."""
    return secrets.token_hex(12)


@dataclass(frozen=True)
class LoginRecord:
    ts: float
    login: str
    client_ip: str
    mechanism: str
    result: str
    tenant_id: int | None = None
    detail: str = ""
    event_key: str = field(default_factory=new_event_key)


@dataclass(frozen=True)
class OpRecord:
    """One operation-log row: who (uid and name), did what, to what, with which result."""

    ts: float
    actor_uid: int | None
    actor: str
    action: str
    target: str
    result: str
    tenant_id: int | None = None
    detail: str = ""
    event_key: str = field(default_factory=new_event_key)


@dataclass(frozen=True)
class NewKey:
    """A DKIM key to store: its selector, algorithm, private PEM (encrypted before it is written) and TXT value."""

    selector: str
    algorithm: str
    private_pem: bytes = field(repr=False)
    public_txt: str


class Store(ApiStore, WebhookStore, QuotaStore):
    def __init__(self, path: Path, keys: crypto.DataKeys):
        self.path = path
        self.keys = keys
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA secure_delete=ON")
        self.conn = conn
        self.db = sqlite_utils.Database(conn)
        if schema_version(self.db) > 0:
            self._check_key()  # before a migration encrypts anything with it
        rewritten = migrate(self.db, keys)
        self._check_key()
        if rewritten:  # plaintext replies were encrypted: no page of the file or its WAL keeps them
            self.finish_erase()

    def close(self) -> None:
        self.conn.close()

    def _check_key(self) -> None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'key_check'").fetchone()
        if row is None:
            blob = self.keys.encrypt(_KEY_CHECK).hex()
            with transaction(self.conn):
                self.conn.execute("INSERT INTO meta(key, value) VALUES ('key_check', ?)", (blob,))
            return
        try:
            ok = self.keys.decrypt(bytes.fromhex(row[0])) == _KEY_CHECK
        except KeyFileError:
            ok = False
        if not ok:
            raise KeyFileError(
                f"{self.path}: store.key_file is not the key this store was written with; restore the original key file"
            )

    # -- the directory: what in-memory caches are built from (cmcd.tenancy.directory) -----------

    def bump_directory(self) -> int:
        """Inside a tenancy command's transaction: the store-wide directory version moves on."""
        self.conn.execute("UPDATE directory SET version = version + 1 WHERE id = 1")
        return int(self.conn.execute("SELECT version FROM directory WHERE id = 1").fetchone()[0])

    def directory_state(self) -> tuple[int, int]:
        """(directory version, highest suppression row id): two indexed reads, to tell whether
        caches are current (a hard bounce adds a suppression row without a command)."""
        version = self.conn.execute("SELECT version FROM directory WHERE id = 1").fetchone()[0]
        top = self.conn.execute("SELECT COALESCE(MAX(id), 0) FROM suppressions").fetchone()[0]
        return int(version), int(top)

    def directory_rows(self) -> dict[str, Any]:
        """Everything the in-memory directory holds, read in one transaction (a consistent cut)."""
        self.conn.execute("BEGIN")  # deferred: a read snapshot, no write lock
        try:
            version, top = self.directory_state()
            return {
                "version": version,
                "suppression_top": top,
                "tenants": self.tenants(),
                "domains": self.domains(),
                "ipcreds": self.ipcreds(),
                "enabled": {r[0] for r in self.conn.execute("SELECT id FROM users WHERE enabled = 1")},
                "dkim": self.dkim_signing_keys(),
                "settings": self.tenant_settings(),
                "suppressions": self.suppression_index(),
            }
        finally:
            self.conn.execute("COMMIT")

    def suppressions_after(self, after_id: int) -> tuple[int, list[tuple[int, bytes]]]:
        """Suppression rows added since row AFTER_ID (hard bounces): (new top id, (tenant, HMAC) pairs)."""
        rows = self.conn.execute(
            "SELECT id, tenant_id, address_hmac FROM suppressions WHERE id > ? ORDER BY id", (after_id,)
        ).fetchall()
        return (rows[-1][0] if rows else after_id), [(r[1], bytes(r[2])) for r in rows]

    # -- tenants ---------------------------------------------------------------------------

    def tenant_add(self, name: str) -> Tenant:
        try:
            with transaction(self.conn):
                cur = self.conn.execute("INSERT INTO tenants(name, created) VALUES (?, ?)", (name, time.time()))
        except sqlite3.IntegrityError:
            raise Conflict(f"tenant {name!r} already exists") from None
        return Tenant(id=int(cur.lastrowid or 0), name=name)

    def tenant(self, name: str) -> Tenant:
        row = self.conn.execute("SELECT id, name FROM tenants WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no tenant {name!r}")
        return Tenant(id=row[0], name=row[1])

    def tenants(self) -> list[Tenant]:
        return [Tenant(id=r[0], name=r[1]) for r in self.conn.execute("SELECT id, name FROM tenants ORDER BY name")]

    def tenant_summary(self, name: str) -> dict[str, Any]:
        t = self.tenant(name)
        count = self.conn.execute
        return {
            "name": t.name,
            "id": t.id,
            "users": count("SELECT COUNT(*) FROM users WHERE tenant_id = ?", (t.id,)).fetchone()[0],
            "domains": [d.name for d in self.domains(name)],
            "ip_credentials": count("SELECT COUNT(*) FROM ip_credentials WHERE tenant_id = ?", (t.id,)).fetchone()[0],
            "dsn": bool(count("SELECT dsn FROM tenants WHERE id = ?", (t.id,)).fetchone()[0]),
            "suppressed_rcpt": count("SELECT suppressed_rcpt FROM tenants WHERE id = ?", (t.id,)).fetchone()[0],
            "suppressions": count("SELECT COUNT(*) FROM suppressions WHERE tenant_id = ?", (t.id,)).fetchone()[0],
        }

    # -- users -----------------------------------------------------------------------------

    def user_add(self, tenant: str, login: str, role: str, password_hash: str) -> User:
        t = self.tenant(tenant)
        now = time.time()
        try:
            with transaction(self.conn):
                cur = self.conn.execute(
                    "INSERT INTO users(tenant_id, login, role, password_hash, enabled, created) VALUES (?,?,?,?,1,?)",
                    (t.id, login, role, password_hash, now),
                )
        except sqlite3.IntegrityError:
            raise Conflict(f"login {login!r} already exists") from None
        return User(int(cur.lastrowid or 0), t.id, t.name, login, role, enabled=True, created=now)

    _USER_SQL = (
        "SELECT u.id, u.tenant_id, t.name, u.login, u.role, u.enabled, u.password_hash, u.created "
        "FROM users u JOIN tenants t ON t.id = u.tenant_id "
    )

    @staticmethod
    def _user(row: tuple[Any, ...]) -> User:
        return User(
            id=row[0], tenant_id=row[1], tenant=row[2], login=row[3], role=row[4], enabled=bool(row[5]), created=row[7]
        )

    def user(self, tenant: str, login: str) -> User:
        row = self.conn.execute(self._USER_SQL + "WHERE t.name = ? AND u.login = ?", (tenant, login)).fetchone()
        if row is None:
            raise NotFound(f"no user {login!r} in tenant {tenant!r}")
        return self._user(row)

    def users(self, tenant: str) -> list[User]:
        t = self.tenant(tenant)
        rows = self.conn.execute(self._USER_SQL + "WHERE u.tenant_id = ? ORDER BY u.login", (t.id,))
        return [self._user(r) for r in rows]

    def user_for_login(self, login: str) -> tuple[User, str] | None:
        """The user and password hash for an AUTH login, or None."""
        row = self.conn.execute(self._USER_SQL + "WHERE u.login = ?", (login,)).fetchone()
        return None if row is None else (self._user(row), row[6])

    def user_update(
        self,
        tenant: str,
        login: str,
        *,
        password_hash: str | None = None,
        enabled: bool | None = None,
        role: str | None = None,
    ) -> User:
        """Change a user's password, enabled flag or role; any of them ends the user's API sessions
        in the same transaction (a session never outlives the standing it was opened with)."""
        u = self.user(tenant, login)
        with transaction(self.conn):
            if password_hash is not None:
                self.conn.execute("UPDATE users SET password_hash = ? WHERE id = ?", (password_hash, u.id))
            if enabled is not None:
                self.conn.execute("UPDATE users SET enabled = ? WHERE id = ?", (int(enabled), u.id))
            if role is not None:
                self.conn.execute("UPDATE users SET role = ? WHERE id = ?", (role, u.id))
            self._end_sessions(u.id)
        return self.user(tenant, login)

    def user_delete(self, tenant: str, login: str) -> None:
        u = self.user(tenant, login)
        with transaction(self.conn):
            self._end_sessions(u.id)
            for table in ("ip_credentials", "api_keys", "otp"):
                self.conn.execute(f"DELETE FROM {table} WHERE user_id = ?", (u.id,))
            self.conn.execute("DELETE FROM users WHERE id = ?", (u.id,))

    # -- IP credentials --------------------------------------------------------------------

    def ipcred_add(self, tenant: str, login: str, cidr: str) -> IpCredential:
        u = self.user(tenant, login)
        try:
            net = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise StoreError(f"{cidr!r} is not an address or CIDR network (like 192.0.2.0/24)") from None
        shortest = MIN_IPCRED_PREFIX[net.version]
        if net.prefixlen < shortest:
            raise StoreError(
                f"{net} is too wide for an IP credential: it would let every host in it send without a "
                f"password; use /{shortest} or narrower"
            )
        for other in self.ipcreds():
            theirs = ipaddress.ip_network(other.cidr)
            if other.tenant_id != u.tenant_id and theirs.version == net.version and theirs.overlaps(net):
                raise Conflict(f"{net} overlaps {theirs}, an IP credential of another tenant")
        try:
            with transaction(self.conn):
                self.conn.execute(
                    "INSERT INTO ip_credentials(tenant_id, user_id, cidr, created) VALUES (?,?,?,?)",
                    (u.tenant_id, u.id, str(net), time.time()),
                )
        except sqlite3.IntegrityError:
            raise Conflict(f"{net} is already a credential of {login!r}") from None
        return IpCredential(tenant=tenant, login=login, cidr=str(net), user_id=u.id, tenant_id=u.tenant_id)

    def ipcreds(self, tenant: str | None = None) -> list[IpCredential]:
        sql = (
            "SELECT t.name, u.login, c.cidr, u.id, t.id FROM ip_credentials c "
            "JOIN users u ON u.id = c.user_id JOIN tenants t ON t.id = c.tenant_id"
        )
        args: tuple[Any, ...] = ()
        if tenant is not None:
            sql += " WHERE t.id = ?"
            args = (self.tenant(tenant).id,)
        return [IpCredential(*r) for r in self.conn.execute(sql + " ORDER BY t.name, u.login, c.cidr", args)]

    def ipcred_delete(self, tenant: str, login: str, cidr: str) -> None:
        u = self.user(tenant, login)
        try:
            net = str(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            raise StoreError(f"{cidr!r} is not an address or CIDR network") from None
        with transaction(self.conn):
            cur = self.conn.execute("DELETE FROM ip_credentials WHERE user_id = ? AND cidr = ?", (u.id, net))
        if cur.rowcount == 0:
            raise NotFound(f"{login!r} in tenant {tenant!r} has no credential {net}")

    # -- domains ---------------------------------------------------------------------------

    def domain_add(self, tenant: str, name: str, keys: list[NewKey] | None = None) -> Domain:
        """Register NAME for TENANT, with its first DKIM keys (active) in the same transaction."""
        t = self.tenant(tenant)
        name = name.strip().lower().rstrip(".")
        try:
            with transaction(self.conn):
                cur = self.conn.execute(
                    "INSERT INTO domains(tenant_id, name, created) VALUES (?,?,?)", (t.id, name, time.time())
                )
                domain_id = int(cur.lastrowid or 0)
                for k in keys or []:
                    self._insert_key(domain_id, name, k, "active")
        except sqlite3.IntegrityError:
            raise Conflict(f"domain {name!r} is already registered") from None
        return Domain(id=domain_id, tenant_id=t.id, tenant=t.name, name=name)

    def domain(self, tenant: str, name: str) -> Domain:
        """TENANT's domain NAME; another tenant's domain is "not found" like a missing one."""
        t = self.tenant(tenant)
        name = name.strip().lower().rstrip(".")
        row = self.conn.execute("SELECT id FROM domains WHERE tenant_id = ? AND name = ?", (t.id, name)).fetchone()
        if row is None:
            raise NotFound(f"tenant {tenant!r} has no domain {name!r}")
        return Domain(id=row[0], tenant_id=t.id, tenant=t.name, name=name)

    # -- DKIM keys -------------------------------------------------------------------------

    @staticmethod
    def _key_aad(domain: str, selector: str) -> bytes:
        return f"dkim:{domain}:{selector}".encode()

    def _insert_key(self, domain_id: int, domain: str, k: NewKey, state: str) -> None:
        now = time.time()
        try:
            self.conn.execute(
                "INSERT INTO dkim_keys(domain_id, selector, algorithm, private_enc, public_txt, state, created, changed) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (domain_id, k.selector, k.algorithm, self.keys.encrypt_bytes(k.private_pem, self._key_aad(domain, k.selector)),
                 k.public_txt, state, now, now),
            )  # fmt: skip
        except sqlite3.IntegrityError:
            raise Conflict(f"domain {domain!r} already has a key with selector {k.selector!r}") from None

    def dkim_keys(self, tenant: str, domain: str) -> list[dict[str, Any]]:
        """The domain's keys without their private parts, newest first."""
        d = self.domain(tenant, domain)
        rows = self.conn.execute(
            "SELECT selector, algorithm, public_txt, state, dns_state, created, changed FROM dkim_keys "
            "WHERE domain_id = ? ORDER BY id DESC",
            (d.id,),
        )
        keys = ("selector", "algorithm", "public_txt", "state", "dns_state", "created", "changed")
        return [dict(zip(keys, r)) | {"domain": d.name} for r in rows]

    def dkim_add(self, tenant: str, domain: str, keys: list[NewKey], state: str) -> None:
        d = self.domain(tenant, domain)
        with transaction(self.conn):
            for k in keys:
                self._insert_key(d.id, d.name, k, state)

    def dkim_transition(
        self, tenant: str, domain: str, moves: dict[str, str], selectors: set[str] | None = None
    ) -> int:
        """Move keys from state to state (e.g. {"active": "standby", "pending": "active"}), in one
        transaction; SELECTORS limits it to those keys. Retired keys lose their private part."""
        d = self.domain(tenant, domain)
        now = time.time()
        rows = self.conn.execute("SELECT id, selector, state FROM dkim_keys WHERE domain_id = ?", (d.id,)).fetchall()
        changed = 0
        with transaction(self.conn):
            for key_id, selector, state in rows:
                target = moves.get(state)
                if target is None or (selectors is not None and selector not in selectors):
                    continue
                if target == "retired":
                    self.conn.execute(
                        "UPDATE dkim_keys SET state = 'retired', private_enc = X'', changed = ? WHERE id = ?",
                        (now, key_id),
                    )
                else:
                    self.conn.execute("UPDATE dkim_keys SET state = ?, changed = ? WHERE id = ?", (target, now, key_id))
                changed += 1
        return changed

    def dkim_set_dns(self, tenant: str, domain: str, results: dict[str, str]) -> None:
        """Record what a DNS check found per selector: published, missing or mismatch."""
        d = self.domain(tenant, domain)
        with transaction(self.conn):
            self.conn.executemany(
                "UPDATE dkim_keys SET dns_state = ? WHERE domain_id = ? AND selector = ?",
                [(state, d.id, selector) for selector, state in results.items()],
            )

    def dkim_signing_keys(self) -> list[tuple[str, str, str, bytes]]:
        """(domain, selector, algorithm, private PEM) of every key that signs: active, and not known
        to be missing from (or wrong in) DNS."""
        rows = self.conn.execute(
            "SELECT d.name, k.selector, k.algorithm, k.private_enc FROM dkim_keys k JOIN domains d ON d.id = k.domain_id "
            "WHERE k.state = 'active' AND k.dns_state NOT IN ('missing', 'mismatch') ORDER BY d.name, k.algorithm DESC"
        ).fetchall()
        return [(r[0], r[1], r[2], self.keys.decrypt_bytes(bytes(r[3]), self._key_aad(r[0], r[1]))) for r in rows]

    def domains(self, tenant: str | None = None) -> list[Domain]:
        sql = "SELECT d.id, d.tenant_id, t.name, d.name FROM domains d JOIN tenants t ON t.id = d.tenant_id"
        args: tuple[Any, ...] = ()
        if tenant is not None:
            sql += " WHERE d.tenant_id = ?"
            args = (self.tenant(tenant).id,)
        return [Domain(*r) for r in self.conn.execute(sql + " ORDER BY d.name", args)]

    # -- logs ------------------------------------------------------------------------------

    def _purged(self, tenant_ids: set[int | None]) -> set[int | None]:
        """Those of TENANT_IDS that name no tenant (any more): their rows were purged with it."""
        named = {t for t in tenant_ids if t is not None}
        if not named:
            return set()
        marks = ",".join("?" * len(named))
        have = {r[0] for r in self.conn.execute(f"SELECT id FROM tenants WHERE id IN ({marks})", tuple(named))}
        return {t for t in named if t not in have}

    def log_logins(self, records: list[LoginRecord]) -> int:
        """Add login-log rows; a row whose event_key is already present (shipped again from the
        spool's outbox) or whose tenant was purged meanwhile is skipped. Returns how many were new."""
        with transaction(self.conn):
            gone = self._purged({r.tenant_id for r in records})
            before = self.conn.total_changes
            self.conn.executemany(
                "INSERT OR IGNORE INTO login_log(ts, tenant_id, login, client_ip, mechanism, result, detail, event_key) "
                "VALUES (?,?,?,?,?,?,?,?)",
                [(r.ts, r.tenant_id, r.login, r.client_ip, r.mechanism, r.result, r.detail, r.event_key)
                 for r in records if r.tenant_id not in gone],
            )  # fmt: skip
            return self.conn.total_changes - before

    def log_ops(self, records: list[OpRecord]) -> int:
        """Add operation-log rows, skipping keys already present and purged tenants' rows, like log_logins."""
        with transaction(self.conn):
            return self._insert_ops(records)

    def _insert_ops(self, records: list[OpRecord]) -> int:
        gone = self._purged({r.tenant_id for r in records})
        before = self.conn.total_changes
        self.conn.executemany(
            "INSERT OR IGNORE INTO ops_log(ts, actor_uid, actor, tenant_id, action, target, result, detail, event_key) "
            "VALUES (?,?,?,?,?,?,?,?,?)",
            [(r.ts, r.actor_uid, r.actor, r.tenant_id, r.action, r.target, r.result, r.detail, r.event_key)
             for r in records if r.tenant_id not in gone],
        )  # fmt: skip
        return self.conn.total_changes - before

    def log_op(
        self,
        *,
        actor_uid: int | None,
        actor: str,
        action: str,
        target: str,
        result: str,
        tenant_id: int | None = None,
        detail: str = "",
    ) -> None:
        """One operation-log row, now (callers that must not lose it when the store cannot be
        written go through cmcd.queue.audit.AuditLog instead)."""
        self.log_ops([OpRecord(time.time(), actor_uid, actor, action, target, result, tenant_id, detail)])

    MAIL_EVENT_COLUMNS = (
        "event_key", "ts", "tenant_id", "queue_id", "event", "sender_enc", "sender_hmac", "rcpt_enc", "rcpt_hmac",
        "rcpt_domain", "status", "response_enc", "attempt", "mx", "ip", "tls", "delay", "size", "message_id",
    )  # fmt: skip

    def insert_mail_events(self, rows: list[tuple[Any, ...]]) -> int:
        """Add mail-log rows (addresses already encrypted, in MAIL_EVENT_COLUMNS order, then a
        suppress flag and the message's tags); a row whose event_key is already present is skipped.
        The reply comes encrypted (bytes or None, from the spool's outbox) or as text, encrypted here.
        A row flagged suppress puts its recipient on the tenant's suppression list, and the tags of
        an accepted message are kept for filtering, in the same transaction. Returns how many rows
        were new."""
        n = len(self.MAIL_EVENT_COLUMNS)
        cols = ", ".join(self.MAIL_EVENT_COLUMNS)
        marks = ", ".join("?" for _ in self.MAIL_EVENT_COLUMNS)
        i = {c: k for k, c in enumerate(self.MAIL_EVENT_COLUMNS)}
        reply = i["response_enc"]
        rows = [
            (*r[:reply], self.keys.seal_text(r[reply]), *r[reply + 1 :]) if isinstance(r[reply], str) else r
            for r in rows
        ]
        with transaction(self.conn):
            # a tenant purged meanwhile gets none of its in-flight events back
            tenants = {r[0] for r in self.conn.execute("SELECT id FROM tenants")}
            rows = [r for r in rows if r[i["tenant_id"]] in tenants]
            before = self.conn.total_changes
            self.conn.executemany(f"INSERT OR IGNORE INTO mail_log({cols}) VALUES ({marks})", [r[:n] for r in rows])
            added = self.conn.total_changes - before
            self.conn.executemany(
                "INSERT OR IGNORE INTO suppressions(tenant_id, address_enc, address_hmac, domain, reason, reason_enc, "
                "created) VALUES (?,?,?,?,'',?,?)",
                [
                    (r[i["tenant_id"]], r[i["rcpt_enc"]], r[i["rcpt_hmac"]], r[i["rcpt_domain"]], r[reply],
                     r[i["ts"]])
                    for r in rows
                    if len(r) > n and r[n]
                ],
            )  # fmt: skip
            self.conn.executemany(
                "INSERT OR IGNORE INTO message_tags(queue_id, tenant_id, tags, ts) VALUES (?,?,?,?)",
                [
                    (r[i["queue_id"]], r[i["tenant_id"]], r[n + 1], r[i["ts"]])
                    for r in rows
                    if len(r) > n + 1 and r[n + 1]
                ],
            )
            return added

    # -- suppression and tenant settings ------------------------------------------------------

    def suppression_index(self) -> list[tuple[int, bytes]]:
        """(tenant id, address HMAC) of every suppressed address, for the in-memory set."""
        return [(r[0], bytes(r[1])) for r in self.conn.execute("SELECT tenant_id, address_hmac FROM suppressions")]

    def suppressions(self, tenant: str, limit: int = 1000) -> list[dict[str, Any]]:
        t = self.tenant(tenant)
        rows = self.conn.execute(
            "SELECT address_enc, domain, reason_enc, created FROM suppressions WHERE tenant_id = ? ORDER BY id LIMIT ?",
            (t.id, limit),
        )
        return [
            {"address": self.keys.decrypt(bytes(r[0])), "domain": r[1], "reason": self.keys.open_text(r[2]),
             "created": r[3]}
            for r in rows
        ]  # fmt: skip

    def suppression_add(self, tenant: str, address: str, reason: str) -> bool:
        t = self.tenant(tenant)
        domain = address.rpartition("@")[2].lower()
        with transaction(self.conn):
            cur = self.conn.execute(
                "INSERT OR IGNORE INTO suppressions(tenant_id, address_enc, address_hmac, domain, reason, reason_enc, "
                "created) VALUES (?,?,?,?,'',?,?)",
                (
                    t.id,
                    self.keys.encrypt(address),
                    self.keys.index(address),
                    domain,
                    self.keys.seal_text(reason),
                    time.time(),
                ),
            )
        return cur.rowcount == 1

    def suppression_delete(self, tenant: str, address: str) -> None:
        t = self.tenant(tenant)
        with transaction(self.conn):
            cur = self.conn.execute(
                "DELETE FROM suppressions WHERE tenant_id = ? AND address_hmac = ?", (t.id, self.keys.index(address))
            )
        if cur.rowcount == 0:
            raise NotFound(f"{address!r} is not on tenant {tenant!r}'s suppression list")

    def tenant_settings(self) -> dict[int, tuple[bool, str]]:
        """tenant id -> (send bounces, what RCPT does with a suppressed address: accept or refuse)."""
        return {r[0]: (bool(r[1]), r[2]) for r in self.conn.execute("SELECT id, dsn, suppressed_rcpt FROM tenants")}

    def tenant_set(self, name: str, *, dsn: bool | None = None, suppressed_rcpt: str | None = None) -> None:
        t = self.tenant(name)
        with transaction(self.conn):
            if dsn is not None:
                self.conn.execute("UPDATE tenants SET dsn = ? WHERE id = ?", (int(dsn), t.id))
            if suppressed_rcpt is not None:
                self.conn.execute("UPDATE tenants SET suppressed_rcpt = ? WHERE id = ?", (suppressed_rcpt, t.id))

    # -- log queries (paged by id, so an export of any size never sits in memory) ---------------

    _LOG_QUERIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
        "mail": (
            "mail_log",
            "SELECT x.id, x.ts, t.name, x.queue_id, x.event, x.sender_enc, x.rcpt_enc, x.rcpt_domain, x.status, "
            "x.response_enc, x.attempt, x.mx, x.ip, x.tls, x.delay, x.size, x.message_id FROM mail_log x "
            "LEFT JOIN tenants t ON t.id = x.tenant_id",
            ("id", "ts", "tenant", "queue_id", "event", "sender", "rcpt", "rcpt_domain", "status", "response",
             "attempt", "mx", "ip", "tls", "delay", "size", "message_id"),
        ),
        "login": (
            "login_log",
            "SELECT x.id, x.ts, t.name, x.login, x.client_ip, x.mechanism, x.result, x.detail FROM login_log x "
            "LEFT JOIN tenants t ON t.id = x.tenant_id",
            ("id", "ts", "tenant", "login", "client_ip", "mechanism", "result", "detail"),
        ),
        "ops": (
            "ops_log",
            "SELECT x.id, x.ts, t.name, x.actor_uid, x.actor, x.action, x.target, x.result, x.detail FROM ops_log x "
            "LEFT JOIN tenants t ON t.id = x.tenant_id",
            ("id", "ts", "tenant", "actor_uid", "actor", "action", "target", "result", "detail"),
        ),
    }  # fmt: skip

    def log_page(
        self,
        kind: str,
        *,
        tenant_id: int | None = None,
        since: float | None = None,
        until: float | None = None,
        rcpt: str | None = None,
        sender: str | None = None,
        queue_id: str | None = None,
        status: str | None = None,
        events: tuple[str, ...] | None = None,
        tag: str | None = None,
        after: int = 0,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        """One page of log rows in id (time) order after id AFTER; addresses found through their
        HMAC index and returned decrypted."""
        table, select, keys = self._LOG_QUERIES[kind]
        if since is not None and after == 0:  # start at the first row of the window (ts index), not at row 1
            first = self.conn.execute(f"SELECT MIN(id) FROM {table} WHERE ts >= ?", (since,)).fetchone()[0]
            if first is None:
                return []
            after = first - 1
        where: list[str] = ["x.id > ?"]
        args: list[Any] = [after]
        for column, value in (("x.tenant_id", tenant_id), ("x.queue_id", queue_id)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if since is not None:
            where.append("x.ts >= ?")
            args.append(since)
        if until is not None:
            where.append("x.ts < ?")
            args.append(until)
        if rcpt is not None:
            where.append("x.rcpt_hmac = ?")
            args.append(self.keys.index(rcpt))
        if sender is not None:
            where.append("x.sender_hmac = ?")
            args.append(self.keys.index(sender))
        if status is not None:
            where.append("(x.event = ? OR x.status = ?)" if kind == "mail" else "x.result = ?")
            args += [status, status] if kind == "mail" else [status]
        if events is not None and kind == "mail":
            where.append(f"x.event IN ({','.join('?' * len(events))})")
            args += events
        if tag is not None and kind == "mail":
            where.append(
                "x.queue_id IN (SELECT queue_id FROM message_tags WHERE tenant_id = x.tenant_id "
                "AND ',' || tags || ',' LIKE ? ESCAPE '\\')"
            )
            args.append("%," + tag.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + ",%")
        sql = f"{select} WHERE {' AND '.join(where)} ORDER BY x.id LIMIT ?"
        out = []
        for r in self.conn.execute(sql, (*args, limit)):
            row = dict(zip(keys, r))
            if kind == "mail":
                row["sender"] = self.keys.decrypt(bytes(r[5])) if r[5] is not None else ""
                row["rcpt"] = self.keys.decrypt(bytes(r[6])) if r[6] is not None else ""
                row["response"] = self.keys.open_text(r[9])
            out.append(row)
        return out

    # -- tenant purge --------------------------------------------------------------------------

    def purge_begin(self, name: str, actor: str, actor_uid: int | None) -> Tenant:
        """Mark TENANT as being purged (committed before its queue is touched), so a purge cut
        short by a crash is found by purges_pending() and finished at the next start."""
        t = self.tenant(name)
        value = json.dumps({"name": t.name, "actor": actor, "actor_uid": actor_uid})
        with transaction(self.conn):
            self.conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (f"purge:{t.id}", value))
        return t

    def purges_pending(self) -> list[dict[str, Any]]:
        """Purges begun and not committed: [{"tenant_id", "name", "actor", "actor_uid"}]."""
        rows = self.conn.execute("SELECT key, value FROM meta WHERE key LIKE 'purge:%' ORDER BY key")
        return [{"tenant_id": int(k.partition(":")[2])} | json.loads(v) for k, v in rows]

    def tenant_purge(self, name: str, op: OpRecord | None = None) -> dict[str, int]:
        """Delete TENANT and everything of it: users, IP credentials, domains and their keys,
        suppression list, mail, login and operation log rows. One transaction, which also clears
        the purge_begin() mark, writes OP (its detail followed by the counts) and marks the store
        for finish_erase(), which the caller runs next (and the next start, after a crash)."""
        t = self.tenant(name)
        with transaction(self.conn):
            counts = delete_tenant_rows(self.conn, t.id)
            c = self.conn.execute
            c("DELETE FROM meta WHERE key = ?", (f"purge:{t.id}",))
            c("INSERT OR REPLACE INTO meta(key, value) VALUES ('erase_pending', '1')")
            if op is not None:
                detail = " ".join([op.detail, *(f"{k}={v}" for k, v in counts.items())]).strip()
                self._insert_ops([replace(op, detail=detail)])
        return counts

    def finish_erase(self) -> bool:
        """After a purge: checkpoint and vacuum, so no page of the file or its WAL keeps the deleted
        rows, then clear the mark tenant_purge() set. False when no erase was pending."""
        if self.conn.execute("SELECT 1 FROM meta WHERE key = 'erase_pending'").fetchone() is None:
            return False
        self.checkpoint(vacuum=True)
        with transaction(self.conn):
            self.conn.execute("DELETE FROM meta WHERE key = 'erase_pending'")
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return True

    # -- retention ---------------------------------------------------------------------------

    def expire_rows(self, table: str, cutoff: float, batch: int = 5000) -> int:
        """Delete up to BATCH rows of TABLE older than CUTOFF in one transaction (secure_delete is on);
        the caller repeats until it returns less than BATCH, so no transaction holds the store long."""
        if table not in ("mail_log", "login_log", "ops_log", "message_tags"):
            raise StoreError(f"no log table {table!r}")
        with transaction(self.conn):
            cur = self.conn.execute(
                f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} WHERE ts < ? ORDER BY ts LIMIT ?)",
                (cutoff, batch),
            )
        return cur.rowcount

    def checkpoint(self, vacuum: bool = False) -> None:
        """Move the WAL into the database and truncate it (and rewrite the file, with VACUUM), so no
        page of either still holds deleted rows."""
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if vacuum:
            self.conn.execute("VACUUM")
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def ops_log(self, limit: int = 100) -> Iterator[dict[str, Any]]:
        cur = self.conn.execute(
            "SELECT o.ts, o.actor_uid, o.actor, t.name, o.action, o.target, o.result, o.detail FROM ops_log o "
            "LEFT JOIN tenants t ON t.id = o.tenant_id ORDER BY o.id DESC LIMIT ?",
            (limit,),
        )
        keys = ("ts", "actor_uid", "actor", "tenant", "action", "target", "result", "detail")
        return (dict(zip(keys, r)) for r in cur)
