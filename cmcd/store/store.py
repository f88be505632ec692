"""The store: opening it (key check, migrations), tenants, users, IP credentials, suppression and
tenant settings, and the directory reads in-memory caches are built from; never validates a name
or touches the queue.

Every method is blocking: callers on the event loop go through AsyncStore, which runs
them on the store's single thread. Addresses are stored encrypted with an HMAC index; remote
replies (mail_log.response_enc) and suppression reasons (suppressions.reason_enc) are encrypted
too, as a reply echoes the address, and decrypted on read for cmcctl, the API and webhooks.
Store is this module's rows plus its mixins, one per group of tables: API keys and sessions
(api_store), Idempotency-Key claims (request_store), failed-login counts (throttle_store),
webhooks (webhook_store), daily counts (quota_store), domains and DKIM keys (domain_store), the
logs (log_store), a tenant's purge and erasure (purge_store).
"""

from __future__ import annotations

import ipaddress
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sqlite_utils

from cmcd import crypto
from cmcd.bounces import apply_tenant_actions, parse_tenant_actions, tenant_actions_text
from cmcd.db import STORE_BUSY_MS, transaction
from cmcd.errors import Conflict, KeyFileError, NotFound, StoreError, UntrustedFileError
from cmcd.records import IpCredential, Tenant, User
from cmcd.store.api_store import ApiStore
from cmcd.store.console_store import ConsoleStore
from cmcd.store.domain_store import DomainStore
from cmcd.store.integrity import RESTORE_STORE, check_database
from cmcd.store.log_store import LogStore, new_event_key
from cmcd.store.purge_store import PurgeStore
from cmcd.store.quota_store import QuotaStore
from cmcd.store.request_store import RequestStore
from cmcd.store.schema import migrate, schema_version
from cmcd.store.throttle_store import ThrottleStore
from cmcd.store.webhook_store import WebhookStore

# the records callers pass to Store methods, importable from here as from their own modules
__all__ = ["KEY_CHECK", "MIN_IPCRED_PREFIX", "Store", "open_store"]

#: The widest networks an IP credential may name (a /0 would be an open relay for the tenant).
MIN_IPCRED_PREFIX = {4: 16, 6: 48}
#: the plaintext of meta.key_check, sealed with the data key: tells a wrong key file (and a backup's)
KEY_CHECK = "cmcd key check"


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


class Store(
    ApiStore, ConsoleStore, RequestStore, ThrottleStore, WebhookStore, QuotaStore, DomainStore, LogStore, PurgeStore
):
    def __init__(self, path: Path, keys: crypto.DataKeys):
        self.path = path
        self.keys = keys
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=STORE_BUSY_MS / 1000)
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
            blob = self.keys.encrypt(KEY_CHECK).hex()
            with transaction(self.conn):
                self.conn.execute("INSERT INTO meta(key, value) VALUES ('key_check', ?)", (blob,))
            return
        try:
            ok = self.keys.decrypt(bytes.fromhex(row[0])) == KEY_CHECK
        except KeyFileError:
            ok = False
        if not ok:
            raise KeyFileError(
                f"{self.path}: store.key_file is not the key this store was written with; restore the original key file"
            )

    # -- the directory: what in-memory caches are built from (cmcd.tenancy.directory) -----------

    def bump_directory(self, *, accounts: bool = True, removals: bool = False) -> None:
        """Inside a tenancy command's transaction: the store-wide directory version moves on
        (ACCOUNTS: tenants, users, credentials, domains, keys, settings; REMOVALS: suppressions
        were removed — an added suppression needs no bump, its row id is newer)."""
        self.conn.execute(
            "UPDATE directory SET version = version + ?, removals = removals + ? WHERE id = 1",
            (int(accounts), int(removals)),
        )

    def directory_state(self) -> tuple[int, int, int]:
        """(directory version, suppression removals, highest suppression row id): two indexed
        reads, to tell whether caches are current (a hard bounce adds a suppression row without
        a command)."""
        version, removals = self.conn.execute("SELECT version, removals FROM directory WHERE id = 1").fetchone()
        top = self.conn.execute("SELECT COALESCE(MAX(id), 0) FROM suppressions").fetchone()[0]
        return int(version), int(removals), int(top)

    def directory_rows(self) -> dict[str, Any]:
        """The accounts part of the in-memory directory, read in one transaction (a consistent cut)."""
        self.conn.execute("BEGIN")  # deferred: a read snapshot, no write lock
        try:
            return {
                "version": self.directory_state()[0],
                "tenants": self.tenants(),
                "domains": self.domains(),
                "ipcreds": self.ipcreds(),
                "enabled": {r[0] for r in self.conn.execute("SELECT id FROM users WHERE enabled = 1")},
                "dkim": self.dkim_signing_keys(),
                "settings": self.tenant_settings(),
                "block_actions": self.tenant_block_actions(),
                "broadcast_users": {r[0] for r in self.conn.execute("SELECT id FROM users WHERE stream = 'broadcast'")},
            }
        finally:
            self.conn.execute("COMMIT")

    def suppression_set(self) -> tuple[int, int, set[tuple[int, bytes, str]]]:
        """(removals, top row id, every (tenant id, address HMAC, stream scope)): the whole suppression index,
        built here on the store's thread, never on the event loop."""
        self.conn.execute("BEGIN")
        try:
            _, removals, top = self.directory_state()
            return removals, top, set(self.suppression_index())
        finally:
            self.conn.execute("COMMIT")

    def suppressions_after(self, after_id: int) -> tuple[int, list[tuple[int, bytes, str]]]:
        """Suppression rows added since row AFTER_ID (hard bounces, unsubscribes): (new top id,
        (tenant, HMAC, stream scope) entries)."""
        rows = self.conn.execute(
            "SELECT id, tenant_id, address_hmac, stream FROM suppressions WHERE id > ? ORDER BY id", (after_id,)
        ).fetchall()
        return (rows[-1][0] if rows else after_id), [(r[1], bytes(r[2]), r[3]) for r in rows]

    # -- tenants ---------------------------------------------------------------------------

    def tenant_add(self, name: str) -> Tenant:
        """A new tenant, with an id no tenant ever had: a purged tenant's id is never given again
        (meta tenant_id_high), so nothing that names it by id (an unsubscribe link in a message
        already sent, an event still in a spool's outbox) can ever reach another tenant."""
        try:
            with transaction(self.conn):
                row = self.conn.execute(
                    "SELECT MAX(COALESCE((SELECT MAX(id) FROM tenants), 0), "
                    "COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'tenant_id_high'), 0))"
                ).fetchone()
                tenant_id = int(row[0]) + 1
                self.conn.execute(
                    "INSERT INTO tenants(id, name, created) VALUES (?, ?, ?)", (tenant_id, name, time.time())
                )
                self.conn.execute(
                    "INSERT INTO meta(key, value) VALUES ('tenant_id_high', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (str(tenant_id),),
                )
        except sqlite3.IntegrityError:
            raise Conflict(f"tenant {name!r} already exists") from None
        return Tenant(id=tenant_id, name=name)

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
            "console_otp": bool(count("SELECT console_otp FROM tenants WHERE id = ?", (t.id,)).fetchone()[0]),
            "timezone": count("SELECT timezone FROM tenants WHERE id = ?", (t.id,)).fetchone()[0],
            "block_actions": dict(
                parse_tenant_actions(count("SELECT block_actions FROM tenants WHERE id = ?", (t.id,)).fetchone()[0])
            ),
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
        "SELECT u.id, u.tenant_id, t.name, u.login, u.role, u.enabled, u.password_hash, u.created, u.stream "
        "FROM users u JOIN tenants t ON t.id = u.tenant_id "
    )

    @staticmethod
    def _user(row: tuple[Any, ...]) -> User:
        return User(
            id=row[0], tenant_id=row[1], tenant=row[2], login=row[3], role=row[4], enabled=bool(row[5]), created=row[7],
            stream=row[8],
        )  # fmt: skip

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

    def user_set_stream(self, tenant: str, login: str, stream: str) -> User:
        """The stream LOGIN's mail is when neither the message (X-Cmcd-Stream:) nor the API request
        names one; the directory's broadcast_users is read from this column."""
        u = self.user(tenant, login)
        with transaction(self.conn):
            self.conn.execute("UPDATE users SET stream = ? WHERE id = ?", (stream, u.id))
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

    # -- suppression and tenant settings ------------------------------------------------------

    def suppression_index(self) -> list[tuple[int, bytes, str]]:
        """(tenant id, address HMAC, stream scope: '' for every stream) of every suppression, for the in-memory set."""
        rows = self.conn.execute("SELECT tenant_id, address_hmac, stream FROM suppressions")
        return [(r[0], bytes(r[1]), r[2]) for r in rows]

    def suppressions(self, tenant: str, limit: int = 1000) -> list[dict[str, Any]]:
        t = self.tenant(tenant)
        rows = self.conn.execute(
            "SELECT address_enc, domain, reason_enc, created, stream, bounce_class, expires FROM suppressions "
            "WHERE tenant_id = ? ORDER BY id LIMIT ?",
            (t.id, limit),
        )
        return [
            {"address": self.keys.decrypt(bytes(r[0])), "domain": r[1], "reason": self.keys.open_text(r[2]),
             "created": r[3], "stream": r[4] or "all", "bounce_class": r[5], "expires": r[6]}
            for r in rows
        ]  # fmt: skip

    def suppression_add(self, tenant: str, address: str, reason: str, stream: str = "") -> bool:
        """ADDRESS on TENANT's list for every stream (STREAM ''), or for one (a recipient's
        unsubscribe: 'broadcast'); False when it already was (with that scope, or for every stream)."""
        t = self.tenant(tenant)
        domain = address.rpartition("@")[2].lower()
        address_hmac = self.keys.index(address)
        with transaction(self.conn):
            if (
                stream
                and self.conn.execute(
                    "SELECT 1 FROM suppressions WHERE tenant_id = ? AND address_hmac = ? AND stream = '' "
                    "AND expires IS NULL",
                    (t.id, address_hmac),
                ).fetchone()
            ):
                return False  # held back from every stream for good already
            cur = self.conn.execute(
                "INSERT OR IGNORE INTO suppressions(tenant_id, address_enc, address_hmac, domain, reason, reason_enc, "
                "created, stream) VALUES (?,?,?,?,'',?,?,?)",
                (t.id, self.keys.encrypt(address), address_hmac, domain, self.keys.seal_text(reason), time.time(),
                 stream),
            )  # fmt: skip
        return cur.rowcount == 1

    def unsubscribed(self, tenant_id: int, address: str, stream: str) -> tuple[str, bool] | None:
        """For a one-click link (cmcd/api/unsubscribe.py): (the tenant's name, whether ADDRESS is
        unsubscribed from its STREAM mail already), or None when the tenant is gone."""
        row = self.conn.execute("SELECT name FROM tenants WHERE id = ?", (tenant_id,)).fetchone()
        if row is None:
            return None
        have = self.conn.execute(
            "SELECT 1 FROM suppressions WHERE tenant_id = ? AND address_hmac = ? AND stream = ?",
            (tenant_id, self.keys.index(address), stream),
        ).fetchone()
        return str(row[0]), have is not None

    def unsubscribe(self, tenant_id: int, address: str, stream: str, reason: str, now: float) -> bool:
        """A recipient's one-click unsubscribe: ADDRESS held back from TENANT_ID's STREAM mail and,
        in the same transaction, its mail-log row (event and status "unsubscribed", no queue id:
        it follows no one message; the tenant's webhooks post it). False, and no row, when it was
        unsubscribed already. Unlike suppression_add it is kept beside a block of every stream: the
        recipient's word outlives a block's expiry, and the tenant learns of it. NotFound when the
        tenant is gone."""
        domain = address.rpartition("@")[2].lower()
        address_enc, address_hmac = self.keys.encrypt(address), self.keys.index(address)
        with transaction(self.conn):
            if self.conn.execute("SELECT 1 FROM tenants WHERE id = ?", (tenant_id,)).fetchone() is None:
                raise NotFound(f"no tenant {tenant_id} (deleted since the message was sent)")
            cur = self.conn.execute(
                "INSERT OR IGNORE INTO suppressions(tenant_id, address_enc, address_hmac, domain, reason, reason_enc, "
                "created, stream) VALUES (?,?,?,?,'',?,?,?)",
                (tenant_id, address_enc, address_hmac, domain, self.keys.seal_text(reason), now, stream),
            )
            if cur.rowcount != 1:
                return False
            # MAIL_EVENT_COLUMNS, then the suppress flag (the row above is the suppression), tags,
            # bounce class and stream; the sender is the null one: no message is named
            self.insert_mail_events(
                [(new_event_key(), now, tenant_id, "", "unsubscribed", self.keys.encrypt(""), self.keys.index(""),
                  address_enc, address_hmac, domain, "unsubscribed", reason, 0, "", "", "", 0.0, 0, "", 0, "", "",
                  stream)]
            )  # fmt: skip
        return True

    def suppression_delete(self, tenant: str, address: str, stream: str = "") -> None:
        """Lift ADDRESS's entry for every stream (STREAM ''), or its recipient's unsubscribe from
        STREAM: each is lifted only by name, so lifting a bounce block never subscribes again a
        recipient who unsubscribed (RFC 8058's promise), and only an operator names the latter."""
        t = self.tenant(tenant)
        address_hmac = self.keys.index(address)
        with transaction(self.conn):
            cur = self.conn.execute(
                "DELETE FROM suppressions WHERE tenant_id = ? AND address_hmac = ? AND stream = ?",
                (t.id, address_hmac, stream),
            )
            unsubscribed = cur.rowcount == 0 and not stream and self.conn.execute(
                "SELECT 1 FROM suppressions WHERE tenant_id = ? AND address_hmac = ? AND stream != ''",
                (t.id, address_hmac),
            ).fetchone() is not None  # fmt: skip
        # the address is not repeated: these texts go to the operation log, kept for years
        if unsubscribed:
            raise Conflict(
                f"that address unsubscribed itself from tenant {tenant!r}'s broadcast mail; only the operator "
                "can lift that (cmcctl suppression delete --unsubscribe)"
            )
        if cur.rowcount == 0:
            scope = f"{stream} unsubscribe list" if stream else "suppression list"
            raise NotFound(f"that address is not on tenant {tenant!r}'s {scope}")

    def expire_blocks(self, now: float) -> int:
        """Remove the blocks (suppressions a bounce made, cmcd/bounces.py) whose watch period ended
        by NOW; the caches learn of it from the directory's removals count. Returns how many went."""
        with transaction(self.conn):
            cur = self.conn.execute("DELETE FROM suppressions WHERE expires IS NOT NULL AND expires <= ?", (now,))
            if cur.rowcount:
                self.bump_directory(accounts=False, removals=True)
        return cur.rowcount

    def tenant_block_actions(self) -> dict[int, Mapping[str, str]]:
        """tenant id -> its own action per bounce class (only the tenants that set one; cmcd/bounces.py)."""
        return {
            r[0]: parse_tenant_actions(r[1])
            for r in self.conn.execute("SELECT id, block_actions FROM tenants WHERE block_actions != ''")
        }

    def tenant_settings(self) -> dict[int, tuple[bool, str]]:
        """tenant id -> (send bounces, what RCPT does with a suppressed address: accept or refuse)."""
        return {r[0]: (bool(r[1]), r[2]) for r in self.conn.execute("SELECT id, dsn, suppressed_rcpt FROM tenants")}

    def tenant_set(
        self,
        name: str,
        *,
        dsn: bool | None = None,
        suppressed_rcpt: str | None = None,
        console_otp: bool | None = None,
        timezone: str | None = None,
        block_actions: Mapping[str, str] | None = None,
    ) -> None:
        """BLOCK_ACTIONS: class -> action changes to the tenant's own block policy (bounces.DEFAULT
        removes a class's), made to what is stored in the same transaction."""
        t = self.tenant(name)
        with transaction(self.conn):
            if block_actions:
                row = self.conn.execute("SELECT block_actions FROM tenants WHERE id = ?", (t.id,)).fetchone()
                merged = apply_tenant_actions(parse_tenant_actions(row[0]), block_actions)
                self.conn.execute(
                    "UPDATE tenants SET block_actions = ? WHERE id = ?", (tenant_actions_text(merged), t.id)
                )
            if console_otp is not None:
                self.conn.execute("UPDATE tenants SET console_otp = ? WHERE id = ?", (int(console_otp), t.id))
            if timezone is not None:
                self.conn.execute("UPDATE tenants SET timezone = ? WHERE id = ?", (timezone, t.id))
            if dsn is not None:
                self.conn.execute("UPDATE tenants SET dsn = ? WHERE id = ?", (int(dsn), t.id))
            if suppressed_rcpt is not None:
                self.conn.execute("UPDATE tenants SET suppressed_rcpt = ? WHERE id = ?", (suppressed_rcpt, t.id))
