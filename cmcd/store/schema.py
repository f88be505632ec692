"""The store's schema as numbered forward migrations; never edit a released step, add one.

A migration is a script, and may have a step in Python beside it (STEPS: rows rewritten with the
data key, in the same transaction), never anything else. Remote replies and suppression reasons live
encrypted under the data key (mail_log.response_enc, suppressions.reason_enc, since 7): a reply echoes
the recipient's address. The plaintext columns before them stay, always empty.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import sqlite_utils

from cmcd.crypto import DataKeys
from cmcd.db import transaction

MIGRATIONS: list[str] = [
    # 1: tenants, users, IP credentials, domains, suppression, logs
    """
    CREATE TABLE tenants (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created REAL NOT NULL
    );
    CREATE TABLE users (
        id INTEGER PRIMARY KEY,
        tenant_id INTEGER NOT NULL REFERENCES tenants(id),
        login TEXT NOT NULL UNIQUE,
        role TEXT NOT NULL CHECK (role IN ('admin', 'sender', 'viewer')),
        password_hash TEXT NOT NULL,
        enabled INTEGER NOT NULL DEFAULT 1,
        created REAL NOT NULL
    );
    CREATE INDEX users_tenant ON users(tenant_id);
    CREATE TABLE ip_credentials (
        id INTEGER PRIMARY KEY,
        tenant_id INTEGER NOT NULL REFERENCES tenants(id),
        user_id INTEGER NOT NULL REFERENCES users(id),
        cidr TEXT NOT NULL,
        created REAL NOT NULL,
        UNIQUE (user_id, cidr)
    );
    CREATE TABLE domains (
        id INTEGER PRIMARY KEY,
        tenant_id INTEGER NOT NULL REFERENCES tenants(id),
        name TEXT NOT NULL UNIQUE,
        created REAL NOT NULL
    );
    CREATE INDEX domains_tenant ON domains(tenant_id);
    CREATE TABLE suppressions (
        id INTEGER PRIMARY KEY,
        tenant_id INTEGER NOT NULL REFERENCES tenants(id),
        address_enc BLOB NOT NULL,
        address_hmac BLOB NOT NULL,
        domain TEXT NOT NULL,
        reason TEXT NOT NULL,
        created REAL NOT NULL,
        UNIQUE (tenant_id, address_hmac)
    );
    CREATE TABLE mail_log (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        tenant_id INTEGER NOT NULL,
        queue_id TEXT NOT NULL,
        event TEXT NOT NULL,
        sender_enc BLOB,
        sender_hmac BLOB,
        rcpt_enc BLOB,
        rcpt_hmac BLOB,
        rcpt_domain TEXT,
        status TEXT NOT NULL,
        response TEXT
    );
    CREATE INDEX mail_log_ts ON mail_log(ts);
    CREATE INDEX mail_log_tenant_ts ON mail_log(tenant_id, ts);
    CREATE INDEX mail_log_rcpt ON mail_log(rcpt_hmac);
    CREATE INDEX mail_log_queue ON mail_log(queue_id);
    CREATE TABLE login_log (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        tenant_id INTEGER,
        login TEXT NOT NULL,
        client_ip TEXT NOT NULL,
        mechanism TEXT NOT NULL,
        result TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX login_log_ts ON login_log(ts);
    CREATE TABLE ops_log (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        actor_uid INTEGER,
        actor TEXT NOT NULL,
        tenant_id INTEGER,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        result TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX ops_log_ts ON ops_log(ts);
    """,
    # 2: mail-log rows shipped from the spool's outbox carry a key, so a re-shipped batch is not doubled
    """
    ALTER TABLE mail_log ADD COLUMN event_key TEXT;
    CREATE UNIQUE INDEX mail_log_event_key ON mail_log(event_key) WHERE event_key IS NOT NULL;
    """,
    # 3: delivery: per-attempt details in the mail log, tenant bounce and suppression settings
    """
    ALTER TABLE mail_log ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE mail_log ADD COLUMN mx TEXT NOT NULL DEFAULT '';
    ALTER TABLE mail_log ADD COLUMN ip TEXT NOT NULL DEFAULT '';
    ALTER TABLE mail_log ADD COLUMN tls TEXT NOT NULL DEFAULT '';
    ALTER TABLE mail_log ADD COLUMN delay REAL NOT NULL DEFAULT 0;
    ALTER TABLE mail_log ADD COLUMN size INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE mail_log ADD COLUMN message_id TEXT NOT NULL DEFAULT '';
    ALTER TABLE tenants ADD COLUMN dsn INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE tenants ADD COLUMN suppressed_rcpt TEXT NOT NULL DEFAULT 'accept';
    CREATE INDEX suppressions_tenant ON suppressions(tenant_id);
    """,
    # 4: DKIM keys per domain; private keys encrypted with the data key
    """
    CREATE TABLE dkim_keys (
        id INTEGER PRIMARY KEY,
        domain_id INTEGER NOT NULL REFERENCES domains(id),
        selector TEXT NOT NULL,
        algorithm TEXT NOT NULL CHECK (algorithm IN ('rsa-sha256', 'ed25519-sha256')),
        private_enc BLOB NOT NULL,
        public_txt TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'active', 'standby', 'retired')),
        dns_state TEXT NOT NULL DEFAULT 'unchecked' CHECK (dns_state IN ('unchecked', 'published', 'missing', 'mismatch')),
        created REAL NOT NULL,
        changed REAL NOT NULL,
        UNIQUE (domain_id, selector)
    );
    CREATE INDEX dkim_keys_domain ON dkim_keys(domain_id);
    """,
    # 5: the tenant HTTP API: API keys, TOTP, session tokens, webhooks, tags of accepted messages
    """
    CREATE TABLE api_keys (
        id INTEGER PRIMARY KEY,
        tenant_id INTEGER NOT NULL REFERENCES tenants(id),
        user_id INTEGER NOT NULL REFERENCES users(id),
        key_id TEXT NOT NULL UNIQUE,
        key_hash BLOB NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('admin', 'sender', 'viewer')),
        created REAL NOT NULL,
        revoked REAL,
        last_used REAL
    );
    CREATE INDEX api_keys_user ON api_keys(user_id);
    CREATE TABLE otp (
        user_id INTEGER PRIMARY KEY REFERENCES users(id),
        tenant_id INTEGER NOT NULL,
        secret_enc BLOB NOT NULL,
        confirmed INTEGER NOT NULL DEFAULT 0,
        recovery TEXT NOT NULL DEFAULT '',
        last_step INTEGER NOT NULL DEFAULT 0,
        created REAL NOT NULL
    );
    CREATE TABLE api_sessions (
        token_hash BLOB PRIMARY KEY,
        user_id INTEGER NOT NULL,
        tenant_id INTEGER NOT NULL,
        expires REAL NOT NULL
    );
    CREATE TABLE webhooks (
        id INTEGER PRIMARY KEY,
        tenant_id INTEGER NOT NULL REFERENCES tenants(id),
        url TEXT NOT NULL,
        events TEXT NOT NULL,
        secret_enc BLOB NOT NULL,
        created REAL NOT NULL,
        cursor INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        failing_since REAL,
        next_attempt REAL NOT NULL DEFAULT 0,
        last_error TEXT NOT NULL DEFAULT '',
        last_success REAL,
        sent INTEGER NOT NULL DEFAULT 0,
        dropped INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX webhooks_tenant ON webhooks(tenant_id);
    CREATE TABLE message_tags (
        queue_id TEXT PRIMARY KEY,
        tenant_id INTEGER NOT NULL,
        tags TEXT NOT NULL,
        ts REAL NOT NULL
    );
    CREATE INDEX message_tags_ts ON message_tags(ts);
    CREATE INDEX message_tags_tenant ON message_tags(tenant_id);
    """,
    # 6: login and operation-log rows carry a key too: a row that waited in the spool's outbox while
    # the store could not be written is shipped at least once and must not be doubled
    """
    ALTER TABLE login_log ADD COLUMN event_key TEXT;
    CREATE UNIQUE INDEX login_log_event_key ON login_log(event_key) WHERE event_key IS NOT NULL;
    ALTER TABLE ops_log ADD COLUMN event_key TEXT;
    CREATE UNIQUE INDEX ops_log_event_key ON ops_log(event_key) WHERE event_key IS NOT NULL;
    """,
    # 7: remote replies and suppression reasons encrypted like addresses (they echo the address);
    # the rows already there are sealed by _seal_replies, and the plaintext columns emptied
    """
    ALTER TABLE mail_log ADD COLUMN response_enc BLOB;
    ALTER TABLE suppressions ADD COLUMN reason_enc BLOB;
    """,
    # 8: API sessions that can be listed and revoked per user: when each began and was last used
    # (a session's id is a prefix of its token's digest, so no column)
    """
    ALTER TABLE api_sessions ADD COLUMN created REAL;
    ALTER TABLE api_sessions ADD COLUMN last_used REAL;
    CREATE INDEX api_sessions_user ON api_sessions(user_id);
    """,
    # 9: the directory version: bumped by every tenancy command in the transaction of its change,
    # so any process holding caches of tenants, users, keys and domains can tell with one read
    # whether they are current (cmcd.tenancy.directory); `removals` moves when suppressions are
    # removed (an added one is seen by its row id)
    """
    CREATE TABLE directory (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        version INTEGER NOT NULL,
        removals INTEGER NOT NULL
    );
    INSERT INTO directory(id, version, removals) VALUES (1, 1, 1);
    """,
    # 10: daily message counts per tenant (the quota every process shares), shipped from each spool's
    # counts outbox; per spool, the last outbox id added, so a shipment repeated adds nothing twice
    """
    CREATE TABLE daily_counts (
        tenant_id INTEGER NOT NULL REFERENCES tenants(id),
        day TEXT NOT NULL,
        messages INTEGER NOT NULL,
        PRIMARY KEY (tenant_id, day)
    );
    CREATE TABLE daily_counts_shipped (spool_id TEXT PRIMARY KEY, up_to INTEGER NOT NULL);
    """,
    # 11: the daily quota the worker processes have reserved in blocks (leases), per tenant and day:
    # what limits (cmcd/submit/leases.py); never under the day's daily_counts, which stay the record
    """
    CREATE TABLE quota_reserved (
        tenant_id INTEGER NOT NULL REFERENCES tenants(id),
        day TEXT NOT NULL,
        reserved INTEGER NOT NULL,
        PRIMARY KEY (tenant_id, day)
    );
    """,
    # 12: API Idempotency-Keys claimed by the worker processes (cmcd/store/request_store.py): which
    # spool shard runs the request a key names, and its response once committed. Not named
    # api_requests, the spool's table of them: a backup must hold no table of the spool's
    """
    CREATE TABLE idempotency_keys (
        tenant_id INTEGER NOT NULL,
        key_hmac BLOB NOT NULL,
        fingerprint BLOB NOT NULL,
        shard INTEGER NOT NULL,
        created REAL NOT NULL,
        status INTEGER NOT NULL DEFAULT 0,
        response_enc BLOB,
        PRIMARY KEY (tenant_id, key_hmac)
    );
    CREATE INDEX idempotency_keys_created ON idempotency_keys(created);
    CREATE INDEX idempotency_keys_unanswered ON idempotency_keys(shard) WHERE response_enc IS NULL;
    """,
    # 13: failed logins every worker process counts together (cmcd/store/throttle_store.py): one
    # row per failure and per key it counts against (an address, a login from it, a user's bad
    # one-time codes), the key an HMAC; dropped once past their window; pending: a check under way
    # (a password being checked), a failure only once confirmed
    """
    CREATE TABLE login_failures (
        id INTEGER PRIMARY KEY,
        key_hmac BLOB NOT NULL,
        ts REAL NOT NULL,
        until REAL NOT NULL,
        pending INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX login_failures_key ON login_failures(key_hmac, ts);
    CREATE INDEX login_failures_until ON login_failures(until);
    """,
    # 14: the tenant console (cmcd/api/console/): a session is an API session token or a console
    # cookie, and a console sign-in that still needs its one-time code or its TOTP enrolment is a
    # session at that stage (signed_in: when its password was checked, which bounds every session
    # the sign-in goes on in); tenant settings for it (one-time passwords required for every
    # console user, the time zone its pages show), one-time passwords required of one user, and
    # what the last DNS check of a domain found for each record (public records: not encrypted)
    """
    ALTER TABLE api_sessions ADD COLUMN kind TEXT NOT NULL DEFAULT 'api';
    ALTER TABLE api_sessions ADD COLUMN stage TEXT NOT NULL DEFAULT '';
    ALTER TABLE api_sessions ADD COLUMN signed_in REAL;
    ALTER TABLE tenants ADD COLUMN console_otp INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tenants ADD COLUMN timezone TEXT NOT NULL DEFAULT '';
    ALTER TABLE users ADD COLUMN otp_required INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE domains ADD COLUMN checked REAL;
    ALTER TABLE domains ADD COLUMN check_results TEXT NOT NULL DEFAULT '[]';
    """,
    # 15: bounce classes and blocks (cmcd/bounces.py): the class of each mail-log row, and of the
    # bounce that put an address on the suppression list, and when such a block expires (NULL:
    # never, as for every suppression an operator or a tenant added)
    """
    ALTER TABLE mail_log ADD COLUMN bounce_class TEXT NOT NULL DEFAULT '';
    ALTER TABLE suppressions ADD COLUMN bounce_class TEXT NOT NULL DEFAULT '';
    ALTER TABLE suppressions ADD COLUMN expires REAL;
    CREATE INDEX suppressions_expires ON suppressions(expires) WHERE expires IS NOT NULL;
    """,
    # 16: message streams and one-click unsubscribe (cmcd/unsubscribe.py): the stream of each
    # mail-log row, a user's default stream, and a suppression's scope ('': every stream, as every
    # suppression until now; 'broadcast': a recipient's unsubscribe, kept beside any bounce block
    # of the same address, so one expiring never lifts the other: the table is rebuilt for the
    # unique key (tenant, address, scope); secure_delete zeroes the old table's pages); and the
    # highest tenant id given so far, never given again (Store.tenant_add: an unsubscribe link names
    # its tenant by id)
    """
    ALTER TABLE mail_log ADD COLUMN stream TEXT NOT NULL DEFAULT 'transactional';
    ALTER TABLE users ADD COLUMN stream TEXT NOT NULL DEFAULT 'transactional';
    CREATE TABLE suppressions_scoped (
        id INTEGER PRIMARY KEY,
        tenant_id INTEGER NOT NULL REFERENCES tenants(id),
        address_enc BLOB NOT NULL,
        address_hmac BLOB NOT NULL,
        domain TEXT NOT NULL,
        reason TEXT NOT NULL,
        created REAL NOT NULL,
        reason_enc BLOB,
        bounce_class TEXT NOT NULL DEFAULT '',
        expires REAL,
        stream TEXT NOT NULL DEFAULT '',
        UNIQUE (tenant_id, address_hmac, stream)
    );
    INSERT INTO suppressions_scoped(id, tenant_id, address_enc, address_hmac, domain, reason, created, reason_enc,
                                    bounce_class, expires)
        SELECT id, tenant_id, address_enc, address_hmac, domain, reason, created, reason_enc, bounce_class, expires
        FROM suppressions;
    DROP TABLE suppressions;
    ALTER TABLE suppressions_scoped RENAME TO suppressions;
    CREATE INDEX suppressions_tenant ON suppressions(tenant_id);
    CREATE INDEX suppressions_expires ON suppressions(expires) WHERE expires IS NOT NULL;
    INSERT OR REPLACE INTO meta(key, value) SELECT 'tenant_id_high', CAST(COALESCE(MAX(id), 0) AS TEXT) FROM tenants;
    """,
    # 17: a tenant's own block policy (cmcd/bounces.py): its action for a bounce class, over the
    # host's [bounces] actions ("class=action,..."; '': the host's for every class)
    """
    ALTER TABLE tenants ADD COLUMN block_actions TEXT NOT NULL DEFAULT '';
    """,
]

_SEAL_BATCH = 5000


def _seal_replies(conn: sqlite3.Connection, keys: DataKeys) -> int:
    """Migration 7's rows: each plaintext reply and reason encrypted into its _enc column and the
    plaintext emptied (secure_delete is on; the caller vacuums). Returns the rows rewritten."""
    rewritten = 0
    for table, plain, sealed, empty in (("mail_log", "response", "response_enc", None),
                                        ("suppressions", "reason", "reason_enc", "")):  # fmt: skip
        after = 0
        while True:
            rows = conn.execute(
                f"SELECT id, {plain} FROM {table} WHERE id > ? AND {plain} IS NOT NULL AND {plain} != '' "
                "ORDER BY id LIMIT ?",
                (after, _SEAL_BATCH),
            ).fetchall()
            if not rows:
                break
            conn.executemany(
                f"UPDATE {table} SET {sealed} = ?, {plain} = ? WHERE id = ?",
                [(keys.seal_text(str(text)), empty, row_id) for row_id, text in rows],
            )
            rewritten += len(rows)
            after = rows[-1][0]
    return rewritten


#: migration number -> its step in Python, run after its script in the same transaction
STEPS: dict[int, Callable[[sqlite3.Connection, DataKeys], int]] = {7: _seal_replies}


def schema_version(db: sqlite_utils.Database) -> int:
    if "meta" not in db.table_names():
        return 0
    row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0


def migrate(db: sqlite_utils.Database, keys: DataKeys) -> int:
    """Apply every migration past the store's version, each in its own transaction (KEYS, checked
    against the store by the caller first, for the steps that rewrite rows). Returns how many rows
    the steps rewrote: their old pages are the caller's to erase (Store.finish_erase)."""
    conn: sqlite3.Connection = db.conn
    if "meta" not in db.table_names():
        db.table("meta").create({"key": str, "value": str}, pk="key")
    rewritten = 0
    for number in range(schema_version(db) + 1, len(MIGRATIONS) + 1):
        with transaction(conn):
            if schema_version(db) >= number:  # another process applied it meanwhile
                continue
            for statement in MIGRATIONS[number - 1].split(";"):
                if statement.strip():
                    conn.execute(statement)
            step = STEPS.get(number)
            n = step(conn, keys) if step is not None else 0
            if n:
                rewritten += n
                # the old values' pages are erased by finish_erase(): now, or at the next start after a crash
                conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('erase_pending', '1')")
            conn.execute(
                "INSERT INTO meta(key, value) VALUES ('schema_version', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (str(number),),
            )
    return rewritten
