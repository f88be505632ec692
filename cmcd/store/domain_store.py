"""Tenants' sender domains and their DKIM keys in the store: rows, key states, DNS check results; never DNS.

A mixin of Store (same connection, same single thread). A private key is stored encrypted with the
data key (AAD "dkim:<domain>:<selector>") and leaves the store only decrypted for signing
(dkim_signing_keys); a retired key loses its private part. Validation of names is tenancy/'s.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

from cmcd import crypto
from cmcd.db import transaction
from cmcd.errors import Conflict, NotFound
from cmcd.records import Domain, Tenant


@dataclass(frozen=True)
class NewKey:
    """A DKIM key to store: its selector, algorithm, private PEM (encrypted before it is written) and TXT value."""

    selector: str
    algorithm: str
    private_pem: bytes = field(repr=False)
    public_txt: str


class DomainStore:
    """Methods Store gets for domains and DKIM keys; see the module docstring."""

    conn: sqlite3.Connection
    keys: crypto.DataKeys

    # provided by Store
    def tenant(self, name: str) -> Tenant:  # pragma: no cover - Store's
        raise NotImplementedError

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

    def domain_set_check(self, tenant: str, domain: str, results: list[dict[str, str]], now: float) -> None:
        """Keep what a DNS check found per record: name, expected value, status."""
        d = self.domain(tenant, domain)
        with transaction(self.conn):
            self.conn.execute(
                "UPDATE domains SET checked = ?, check_results = ? WHERE id = ?", (now, json.dumps(results), d.id)
            )

    def domain_last_check(self, tenant: str, domain: str) -> tuple[float | None, list[dict[str, str]]]:
        """When DOMAIN was last checked (None: never) and what each record's lookup found then."""
        d = self.domain(tenant, domain)
        row = self.conn.execute("SELECT checked, check_results FROM domains WHERE id = ?", (d.id,)).fetchone()
        return row[0], json.loads(row[1] or "[]")

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
