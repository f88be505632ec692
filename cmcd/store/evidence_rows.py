"""The store's side of the audit evidence report: counts, ages and samples read from the store; never writes.

Each function takes the Store and runs on the store's thread (AsyncStore.call). TENANT_ID, where a
function takes one, restricts every row it reads to that tenant; None reads every tenant. Nothing
returned holds an address, a key or a password hash: only counts, ages, logins and key ids.
"""

from __future__ import annotations

import collections
from typing import Any

from cmcd.errors import KeyFileError
from cmcd.store.store import Store

#: the logs and their time column, as retention deletes them
LOGS = ("mail_log", "login_log", "ops_log")
#: tables whose rows carry a tenant_id; a row naming no existing tenant outlived its tenant's purge
TENANT_TABLES = (
    "users", "ip_credentials", "domains", "suppressions", "mail_log", "login_log", "ops_log",
    "api_keys", "otp", "api_sessions", "webhooks", "message_tags",
)  # fmt: skip


def _where(tenant_id: int | None, column: str = "tenant_id") -> tuple[str, tuple[Any, ...]]:
    return (f" WHERE {column} = ?", (tenant_id,)) if tenant_id is not None else ("", ())


def log_ages(store: Store, tenant_id: int | None) -> dict[str, dict[str, Any]]:
    """Per log: rows, the oldest and the newest row's time (None when empty)."""
    out = {}
    where, args = _where(tenant_id)
    for table in LOGS:
        n, oldest, newest = store.conn.execute(
            f"SELECT COUNT(*), MIN(ts), MAX(ts) FROM {table}{where}", args
        ).fetchone()
        out[table] = {"rows": int(n), "oldest": oldest, "newest": newest}
    return out


def last_op(store: Store, action: str) -> dict[str, Any] | None:
    """The newest operation-log row of ACTION (retention.run, backup.now ...), or None."""
    row = store.conn.execute(
        "SELECT ts, actor, result, detail FROM ops_log WHERE action = ? ORDER BY ts DESC LIMIT 1", (action,)
    ).fetchone()
    return None if row is None else dict(zip(("ts", "actor", "result", "detail"), row))


def purges(store: Store) -> list[dict[str, Any]]:
    """Every tenant purge on record (the operation log keeps them audit_log_days), oldest first."""
    rows = store.conn.execute(
        "SELECT ts, actor, actor_uid, target, result, detail FROM ops_log WHERE action = 'tenant.purge' ORDER BY ts"
    )
    return [dict(zip(("ts", "actor", "actor_uid", "target", "result", "detail"), r)) for r in rows]


def leftovers(store: Store) -> dict[str, int]:
    """Rows per table whose tenant no longer exists (what a purge should have erased); 0s left out.
    Operation-log rows are the exception: the purge's own row names no tenant id."""
    out = {}
    tables = {str(r[0]) for r in store.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    for table in TENANT_TABLES:
        if table not in tables:
            continue
        (n,) = store.conn.execute(
            f"SELECT COUNT(*) FROM {table} WHERE tenant_id IS NOT NULL AND tenant_id NOT IN (SELECT id FROM tenants)"
        ).fetchone()
        if n:
            out[table] = int(n)
    return out


def accounts(store: Store, tenant_id: int | None, now: float, stale_s: float) -> list[dict[str, Any]]:
    """Per tenant: users, disabled logins, admins without a confirmed TOTP enrolment, API keys
    (live ones; those unused for STALE_S, counting a never-used key from its creation)."""
    where, args = _where(tenant_id, "id")
    out = []
    for tid, name in store.conn.execute(f"SELECT id, name FROM tenants{where} ORDER BY name", args).fetchall():
        users = store.conn.execute(
            "SELECT u.login, u.role, u.enabled, COALESCE(o.confirmed, 0) FROM users u "
            "LEFT JOIN otp o ON o.user_id = u.id WHERE u.tenant_id = ? ORDER BY u.login",
            (tid,),
        ).fetchall()
        keys = store.conn.execute(
            "SELECT key_id, created, last_used FROM api_keys WHERE tenant_id = ? AND revoked IS NULL ORDER BY id",
            (tid,),
        ).fetchall()
        out.append(
            {
                "tenant": name,
                "users": len(users),
                "admins": sum(1 for u in users if u[1] == "admin" and u[2]),
                "disabled": [u[0] for u in users if not u[2]],
                "admins_without_otp": [u[0] for u in users if u[1] == "admin" and u[2] and not u[3]],
                "api_keys": len(keys),
                "api_keys_stale": [k[0] for k in keys if (k[2] or k[1]) < now - stale_s],
                "api_keys_never_used": sum(1 for k in keys if k[2] is None),
            }
        )
    return out


def password_schemes(store: Store, tenant_id: int | None) -> dict[str, int]:
    """Users per password-hash scheme and cost ("scrypt$32768$8$1"); never the hash itself."""
    where, args = _where(tenant_id)
    counts: collections.Counter[str] = collections.Counter()
    for (encoded,) in store.conn.execute(f"SELECT password_hash FROM users{where}", args):
        counts["$".join(str(encoded).split("$")[:4])] += 1
    return dict(counts)


def _sealed(store: Store, blob: Any) -> str:
    """'encrypted' when BLOB opens with the data key, 'plaintext' when it reads as an address, else 'unreadable'."""
    if blob is None:
        return "empty"
    raw = bytes(blob) if not isinstance(blob, str) else blob.encode()
    try:
        store.keys.decrypt(raw)
        return "encrypted"
    except KeyFileError:
        pass
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "unreadable"
    return "plaintext" if "@" in text or text.isprintable() else "unreadable"


def address_sample(store: Store, tenant_id: int | None, n: int) -> dict[str, dict[str, int]]:
    """The newest N rows of the mail log (sender and recipient) and the suppression list: each
    address column counted as encrypted (opens with the data key), plaintext, unreadable or empty;
    and the plaintext columns that must stay empty (response, reason) counted where they are not."""
    where, args = _where(tenant_id)
    out: dict[str, dict[str, int]] = {}
    mail: collections.Counter[str] = collections.Counter()
    for sender, rcpt, response in store.conn.execute(
        f"SELECT sender_enc, rcpt_enc, response FROM mail_log{where} ORDER BY id DESC LIMIT ?", (*args, n)
    ):
        mail[_sealed(store, sender)] += 1
        mail[_sealed(store, rcpt)] += 1
        if response:
            mail["plaintext"] += 1
    out["mail_log"] = dict(mail)
    supp: collections.Counter[str] = collections.Counter()
    for address, reason in store.conn.execute(
        f"SELECT address_enc, reason FROM suppressions{where} ORDER BY id DESC LIMIT ?", (*args, n)
    ):
        supp[_sealed(store, address)] += 1
        if reason:
            supp["plaintext"] += 1
    out["suppressions"] = dict(supp)
    return out


def dkim_sample(store: Store, tenant_id: int | None) -> dict[str, int]:
    """Every DKIM private key: 'encrypted' when it opens with the data key (and its domain and
    selector as associated data), 'plaintext' when it is a PEM in the clear, else 'unreadable'."""
    where, args = _where(tenant_id, "d.tenant_id")
    counts: collections.Counter[str] = collections.Counter()
    for domain, selector, blob in store.conn.execute(
        f"SELECT d.name, k.selector, k.private_enc FROM dkim_keys k JOIN domains d ON d.id = k.domain_id{where}", args
    ):
        raw = bytes(blob) if not isinstance(blob, str) else blob.encode()
        if raw.lstrip().startswith(b"-----BEGIN"):
            counts["plaintext"] += 1
            continue
        try:
            store.keys.decrypt_bytes(raw, Store._key_aad(domain, selector))
            counts["encrypted"] += 1
        except KeyFileError:
            counts["unreadable"] += 1
    return dict(counts)


def segregation(store: Store, tenant_id: int | None) -> dict[str, int]:
    """Tenants, and rows that would join two tenants: an API key, TOTP enrolment, session or IP
    credential of one tenant held by a user of another (each must be 0)."""
    where, args = _where(tenant_id, "x.tenant_id")
    out = {"tenants": int(store.conn.execute("SELECT COUNT(*) FROM tenants" + _where(tenant_id, "id")[0],
                                             args).fetchone()[0])}  # fmt: skip
    for table in ("api_keys", "otp", "api_sessions", "ip_credentials"):
        extra = " AND" if where else " WHERE"
        (n,) = store.conn.execute(
            f"SELECT COUNT(*) FROM {table} x JOIN users u ON u.id = x.user_id{where}{extra} u.tenant_id != x.tenant_id",
            args,
        ).fetchone()
        out[f"{table}_across_tenants"] = int(n)
    return out
