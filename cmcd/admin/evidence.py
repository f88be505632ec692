"""The `evidence` admin verb: measures, control by control (ISO/IEC 27017), what holds; never changes anything.

Each line names a control, the setting in force, what was measured and a status: ok, attention
(needs a person's look) or fail (the control does not hold), with the reason. Measured means asked
of the thing itself: the listeners are connected to and offered TLS 1.0 and 1.1, the newest backup
is decrypted and its tables read, addresses are sampled from the store and decrypted, files are
stat()ed. Blocking work (SQLite, decryption, sockets, timedatectl) runs off the event loop: store
reads on the store's thread, queue reads on the spool's reader, the rest in the default executor.

With a tenant, tenant-specific lines (accounts, logs, samples, purges, segregation) read only that
tenant's rows; daemon-wide lines (backups, TLS, time, capacity) hold no tenant's data. The run itself
is written to the operation log by the admin server (the verb has a target), naming who asked.
cmcctl renders the result (cmcd/admin/evidence_render.py).
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import os
import socket
import sqlite3
import ssl
import stat
import subprocess
import tempfile
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cmcd import crypto
from cmcd.admin.metrics import QueueFigures, read_queue
from cmcd.admin.server import _Args, _Verb
from cmcd.config import Config, split_hostport
from cmcd.errors import BackupError
from cmcd.store import evidence_rows as rows
from cmcd.store.backup import list_backups, restore_backup

if TYPE_CHECKING:
    from cmcd.admin.server import AdminServer

log = logging.getLogger("cmcd.evidence")

#: control number -> title, as the ISO/IEC 27017 white paper numbers and names them
CONTROLS: dict[str, str] = {
    "9.2.1": "User registration and de-registration",
    "9.2.3": "Management of privileged access rights",
    "9.4.1": "Information access restriction",
    "10.1.1": "Policy on the use of cryptographic controls",
    "12.1.3": "Capacity management",
    "12.3.1": "Information backup",
    "12.4.1": "Event logging",
    "12.4.4": "Clock synchronisation",
    "18.1.3": "Protection of records",
    "CLD.8.1.5": "Removal of cloud service customer assets",
    "CLD.9.5.1": "Segregation in virtual computing environments",
}
STATUSES = ("ok", "attention", "fail")
DAY_S = 86400.0
#: an API key not used for this long is named (9.2.1: access rights reviewed and removed when unused)
STALE_KEY_S = 90 * DAY_S
#: rows of the mail log and of the suppression list whose address columns are sampled
SAMPLE_ROWS = 200
#: each TLS probe connection: connect, SMTP dialogue and handshake must end within this
PROBE_TIMEOUT_S = 5.0
#: scrypt cost below which a password hash is too cheap to guess against (OWASP: n >= 2**17 or 2**15 with r=8)
MIN_SCRYPT_N = 2**14
#: tables and columns that would hold a message body; a backup must have none of them
BODY_TABLES = frozenset({"messages", "recipients", "bodies", "spool", "events", "audit_events", "api_requests"})
BODY_COLUMNS = frozenset({"body", "body_enc", "raw", "raw_enc", "content", "payload", "message", "data"})


@dataclass(frozen=True)
class Line:
    """One line of the report."""

    control: str
    item: str
    setting: str
    evidence: str
    status: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"control": self.control, "title": CONTROLS[self.control]} | {
            k: v for k, v in asdict(self).items() if k != "control"
        }


def _age(seconds: float) -> str:
    """A duration the way a person reads it: 45s, 12m, 3.5h, 12.0d."""
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 2 * DAY_S:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / DAY_S:.1f}d"


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _mode(path: Path) -> tuple[int, int] | None:
    """(permission bits, owner uid) of PATH, or None when it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.S_IMODE(st.st_mode), st.st_uid


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Collector:
    """Gathers the report's lines for one run (one tenant or all)."""

    def __init__(self, server: AdminServer, tenant: str | None, tenant_id: int | None, now: float):
        self.server = server
        self.config: Config = server._config
        self.astore = server._astore
        self.store = server._store
        self.tenant = tenant
        self.tenant_id = tenant_id
        self.now = now
        self._queue: QueueFigures | None = None
        self._newest_backup_age: float | None = None

    async def lines(self) -> list[Line]:
        sections: list[tuple[str, str, Callable[[], Awaitable[list[Line]]]]] = [
            ("9.2.1", "users and API keys", self.accounts),
            ("9.2.3", "console admins with TOTP", self.privileged),
            ("9.4.1", "access to the daemon's files and socket", self.access),
            ("10.1.1", "encryption at rest", self.crypto_at_rest),
            ("10.1.1", "TLS on the listeners", self.tls_listeners),
            ("10.1.1", "outbound TLS policy", self.tls_outbound),
            ("12.3.1", "backups", self.backups),
            ("12.4.1", "logs written", self.logging),
            ("18.1.3", "retention of records", self.retention),
            ("CLD.8.1.5", "tenant purges", self.purges),
            ("CLD.9.5.1", "tenant segregation", self.segregation),
            ("12.4.4", "clock", self.clock),
            ("12.1.3", "capacity", self.capacity),
        ]
        out: list[Line] = []
        for control, item, section in sections:
            try:
                out += await section()
            except Exception as exc:
                log.exception("event=evidence_section_failed control=%s item=%r", control, item)
                out.append(Line(control, item, "-", "-", "fail", f"could not be measured: {exc}"))
        order = list(CONTROLS)
        return sorted(out, key=lambda line: order.index(line.control))

    async def _store(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.astore.call(fn, self.store, *args)

    async def _thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))

    # -- 9.2.1, 9.2.3: accounts -----------------------------------------------------------------

    async def accounts(self) -> list[Line]:
        tenants = await self._store(rows.accounts, self.tenant_id, self.now, STALE_KEY_S)
        out = []
        for t in tenants:
            disabled = ", ".join(t["disabled"]) or "none"
            out.append(Line(
                "9.2.1", f"users of {t['tenant']}", "users are added, disabled and deleted by cmcctl user (logged)",
                f"{t['users']} users, {t['admins']} enabled admins; disabled: {disabled}", "ok",
                "every user is registered through the admin socket or the console, each change in the operation log",
            ))  # fmt: skip
            stale = t["api_keys_stale"]
            evidence = (
                f"{t['api_keys']} live API keys; not used for 90 days: {', '.join(stale) or 'none'}; "
                f"never used: {t['api_keys_never_used']} (a key's last use is recorded at most once an hour)"
            )
            out.append(Line(
                "9.2.1", f"API keys of {t['tenant']}", "unused keys are to be revoked (cmcctl apikey revoke)", evidence,
                "attention" if stale else "ok",
                f"{len(stale)} keys unused for 90 days: review and revoke them" if stale else "no key unused for 90 days",
            ))  # fmt: skip
        if not tenants:
            out.append(Line("9.2.1", "users", "-", "no tenants", "ok", "nothing to review"))
        return out

    async def privileged(self) -> list[Line]:
        tenants = await self._store(rows.accounts, self.tenant_id, self.now, STALE_KEY_S)
        out = []
        for t in tenants:
            missing = t["admins_without_otp"]
            out.append(Line(
                "9.2.3", f"admins of {t['tenant']}", "console admins sign in with password + TOTP (user otp-enroll)",
                f"{t['admins']} enabled admins; without a confirmed TOTP enrolment: {', '.join(missing) or 'none'}",
                "fail" if missing else "ok",
                f"{len(missing)} admins can sign in without a second factor" if missing
                else "every enabled admin has a confirmed TOTP enrolment",
            ))  # fmt: skip
        return out

    # -- 9.4.1: who can reach what -----------------------------------------------------------------

    async def access(self) -> list[Line]:
        cfg = self.config
        sock = cfg.path(cfg.admin.socket)
        store = cfg.path(cfg.store.path)
        spool = cfg.path(cfg.spool.dir)
        found = await self._thread(lambda: {p: _mode(p) for p in (sock, store, spool)})
        out = []
        m = found[sock]
        if m is None:
            out.append(Line("9.4.1", "admin socket", str(sock), "missing", "fail", "the admin socket is not there"))
        else:
            bad = m[0] & stat.S_IRWXO
            out.append(Line(
                "9.4.1", "admin socket", f"{sock}, mode 0660: owner and group (the operators) only",
                f"mode {m[0]:04o}, owner uid {m[1]}", "fail" if bad else "ok",
                "others may connect" if bad else "only the owner and the operators' group may connect",
            ))  # fmt: skip
        for label, path in (("store file", store), ("spool directory", spool)):
            m = found[path]
            if m is None:
                out.append(Line("9.4.1", label, str(path), "missing", "fail", f"{path} is not there"))
                continue
            bad = m[0] & stat.S_IRWXO
            out.append(Line(
                "9.4.1", label, f"{path}: readable by the daemon's user only (umask 077)",
                f"mode {m[0]:04o}, owner uid {m[1]}", "fail" if bad else "ok",
                "others may read it" if bad else "no access for others",
            ))  # fmt: skip
        return out

    # -- 10.1.1: cryptography ----------------------------------------------------------------------

    async def crypto_at_rest(self) -> list[Line]:
        cfg = self.config
        key_file = cfg.path(cfg.store.key_file)
        m = await self._thread(_mode, key_file)
        out = []
        algorithm = (
            f"AES-256-GCM (random 96-bit nonces) for addresses, replies, DKIM and TOTP secrets, message bodies; "
            f"HMAC-SHA256 lookup index with a separate key; key length {len(self.store.keys.enc_key) * 8} bits"
        )
        if m is None:
            out.append(Line("10.1.1", "data key file", str(key_file), "missing", "fail", "the data key file is gone"))
        else:
            loose = m[0] & (stat.S_IRWXG | stat.S_IRWXO)
            out.append(Line(
                "10.1.1", "data key file", f"{key_file}, mode 0600; {algorithm}",
                f"mode {m[0]:04o}, owner uid {m[1]} (the daemon runs as uid {os.getuid()})",
                "fail" if loose or m[1] != os.getuid() else "ok",
                f"readable by group or others: chmod 600 {key_file}" if loose
                else ("owned by another user" if m[1] != os.getuid() else "readable by the daemon's user only"),
            ))  # fmt: skip
        schemes = await self._store(rows.password_schemes, self.tenant_id)
        n, r, p = crypto._SCRYPT_N, crypto._SCRYPT_R, crypto._SCRYPT_P
        current = f"scrypt${n}${r}${p}"
        weaker = {s: c for s, c in schemes.items() if s != current}
        out.append(Line(
            "10.1.1", "password hashes", f"scrypt n={n} r={r} p={p}, 16-byte random salt (crypto.hash_password)",
            "users per scheme: " + (", ".join(f"{s.replace('$', ' ')}: {c}" for s, c in sorted(schemes.items())) or "none"),
            "fail" if n < MIN_SCRYPT_N else ("attention" if weaker else "ok"),
            "the cost in force is below 2**14" if n < MIN_SCRYPT_N
            else (f"{sum(weaker.values())} hashes use other parameters; they change at the next password change"
                  if weaker else "every password hash uses the parameters in force"),
        ))  # fmt: skip
        sample = await self._store(rows.address_sample, self.tenant_id, SAMPLE_ROWS)
        for table, counts in sample.items():
            sealed = counts.get("encrypted", 0)
            bad = counts.get("plaintext", 0) + counts.get("unreadable", 0)
            total = sealed + bad
            share = f"{100 * sealed / total:.0f}%" if total else "n/a"
            out.append(Line(
                "10.1.1", f"addresses in {table}", "addresses encrypted with the data key, found by HMAC index",
                f"newest {SAMPLE_ROWS} rows sampled: {sealed} of {total} address values decrypt ({share}); "
                f"plaintext {counts.get('plaintext', 0)}, undecryptable {counts.get('unreadable', 0)}",
                "fail" if bad else "ok",
                f"{bad} values are not encrypted with the data key" if bad
                else ("every sampled address is encrypted" if total else "no rows to sample yet"),
            ))  # fmt: skip
        dkim = await self._store(rows.dkim_sample, self.tenant_id)
        bad = dkim.get("plaintext", 0) + dkim.get("unreadable", 0)
        out.append(Line(
            "10.1.1", "DKIM private keys", "encrypted with the data key, domain and selector bound as associated data",
            f"{dkim.get('encrypted', 0)} keys decrypt; plaintext PEM {dkim.get('plaintext', 0)}, "
            f"undecryptable {dkim.get('unreadable', 0)}",
            "fail" if bad else "ok", f"{bad} keys are not encrypted" if bad else "every private key is encrypted",
        ))  # fmt: skip
        return out

    async def tls_listeners(self) -> list[Line]:
        cfg = self.config
        status = self.server._get_status()
        bound: dict[str, list[str]] = status.get("listeners") or {}
        targets = [("SMTP submission (STARTTLS)", a, True) for a in bound.get("smtp", [])]
        targets += [("SMTPS (implicit TLS)", a, False) for a in bound.get("smtps", [])]
        if status.get("api_listener"):
            targets.append(("HTTPS API and console", str(status["api_listener"]), False))
        if cfg.metrics.listen and cfg.metrics.tls_cert and not cfg.metrics.listen.endswith(":0"):
            targets.append(("metrics (HTTPS)", cfg.metrics.listen, False))
        results = await asyncio.gather(*(self._thread(probe_listener, addr, starttls) for _, addr, starttls in targets))
        out = []
        setting = "TLS 1.2 or later (crypto.server_tls_context), OpenSSL's default cipher list"
        for (kind, addr, starttls), res in zip(targets, results, strict=True):
            status_, reason = _judge_probe(res, starttls)
            out.append(Line("10.1.1", f"{kind} {addr}", setting, _probe_text(res, starttls), status_, reason))
        if cfg.metrics.listen and not cfg.metrics.tls_cert:
            host = cfg.metrics.listen.rpartition(":")[0].strip("[]")
            loopback = host in ("127.0.0.1", "::1", "localhost")
            out.append(Line(
                "10.1.1", f"metrics {cfg.metrics.listen}", "plain HTTP (metrics.tls_cert not set)",
                "not probed: no TLS configured", "ok" if loopback else "attention",
                "loopback only" if loopback else "served in plain text beyond loopback: set metrics.tls_cert and tls_key",
            ))  # fmt: skip
        if not targets:
            out.append(Line("10.1.1", "listeners", setting, "no TLS listener bound", "attention", "nothing to probe"))
        return out

    async def tls_outbound(self) -> list[Line]:
        d = self.config.delivery
        counts: dict[str, int] = {}
        for policy in d.domains.values():
            if policy.tls:
                counts[policy.tls] = counts.get(policy.tls, 0) + 1
        per = ", ".join(f"{mode}: {n}" for mode, n in sorted(counts.items())) or "none"
        weak = counts.get("disabled", 0) + counts.get("opportunistic+plain", 0)
        status = "fail" if d.tls == "disabled" else ("attention" if weak or d.tls == "opportunistic+plain" else "ok")
        reason = (
            "delivery never uses TLS" if d.tls == "disabled"
            else (f"{weak} domains (or the default) may be sent to in plain text after a failed handshake or without TLS"
                  if status == "attention" else "STARTTLS whenever offered; no domain sent to in plain text on purpose")
        )  # fmt: skip
        return [
            Line("10.1.1", "outbound TLS", f"delivery.tls = {d.tls!r}", f"per-domain policies: {per}", status, reason)
        ]

    # -- 12.3.1: backups ---------------------------------------------------------------------------

    async def backups(self) -> list[Line]:
        cfg = self.config
        b = cfg.backup
        interval = float(b.interval)
        found = await self._thread(list_backups, cfg.path(b.dir))
        out = [
            Line(
                "12.3.1", "schedule", f"every {_age(interval)}, {b.keep} kept, in {cfg.path(b.dir)}",
                f"{len(found)} generations present" + (f", oldest {_when(found[0].created)}" if found else ""),
                "attention" if interval > 3600 or len(found) > b.keep else "ok",
                "interval over one hour: more than an hour of records can be lost" if interval > 3600
                else (f"more generations than backup.keep ({b.keep})" if len(found) > b.keep
                      else "hourly, within the generations kept"),
            )
        ]  # fmt: skip
        key_file = cfg.path(b.key_file)
        km = await self._thread(_mode, key_file)
        inside = key_file.resolve().is_relative_to(cfg.path(b.dir).resolve())
        if km is None:
            out.append(Line("12.3.1", "backup key file", str(key_file), "missing", "fail" if found else "attention",
                            "no backup key: the backups cannot be read"))  # fmt: skip
        else:
            loose = km[0] & (stat.S_IRWXG | stat.S_IRWXO)
            out.append(Line(
                "12.3.1", "backup key file", f"{key_file}, mode 0600, never in backup.dir",
                f"mode {km[0]:04o}" + (", inside backup.dir" if inside else ""),
                "fail" if loose or inside else "ok",
                "readable by group or others" if loose
                else ("kept beside the backups it opens" if inside else "readable by the daemon's user only"),
            ))  # fmt: skip
        if not found:
            out.append(Line("12.3.1", "newest backup", f"one every {_age(interval)}", "no backup in backup.dir",
                            "fail", "no backup has been taken: cmcctl backup now"))  # fmt: skip
            return out
        newest = found[-1]
        age = max(0.0, self.now - newest.created)
        self._newest_backup_age = age
        out.append(Line(
            "12.3.1", "newest backup", f"one every {_age(interval)}; older than 2 x interval is a failure",
            f"{newest.name}, {_size(newest.size_bytes)}, taken {_when(newest.created)} ({_age(age)} ago)",
            "fail" if age > 2 * interval else "ok",
            f"older than 2 x backup.interval ({_age(2 * interval)})" if age > 2 * interval else "within 2 x backup.interval",
        ))  # fmt: skip
        try:
            checked = await self._thread(
                inspect_backup, newest.path, key_file, cfg.path(cfg.store.path), self.store.keys
            )
        except BackupError as exc:
            out.append(Line("12.3.1", "newest backup verified", "verified by decrypting it (this report)", str(exc),
                            "fail", "the newest backup cannot be restored"))  # fmt: skip
            return out
        counts = ", ".join(f"{t}={n}" for t, n in checked["rows"].items())
        key_ok = checked["data_key_ok"]
        out.append(Line(
            "12.3.1", "newest backup verified", "authenticated, decompressed, integrity-checked, restored to a temporary file",
            f"integrity {checked['integrity']}; data key {'matches' if key_ok else 'differs'}; rows: {counts}",
            "ok" if key_ok and checked["integrity"] == "ok" else "fail",
            "restorable with the data key in force" if key_ok else "the data key in force does not open it",
        ))  # fmt: skip
        bodies = checked["body_tables"] + checked["body_columns"]
        out.append(Line(
            "12.3.1", "no message body in backups", "backups hold the store only, never the spool",
            f"tables in the newest backup: {len(checked['tables'])}; spool or body tables/columns: {', '.join(bodies) or 'none'}",
            "fail" if bodies else "ok", f"body data found: {', '.join(bodies)}" if bodies else "checked: no body table or column",
        ))  # fmt: skip
        return out

    # -- 12.4.1, 18.1.3: logs ----------------------------------------------------------------------

    async def logging(self) -> list[Line]:
        ages = await self._store(rows.log_ages, self.tenant_id)
        figures = await self._queue_figures()
        parts = []
        for table, a in ages.items():
            newest = f"newest {_age(max(0.0, self.now - a['newest']))} ago" if a["newest"] else "empty"
            parts.append(f"{table} {a['rows']} rows ({newest})")
        waiting = figures.outbox
        stuck = waiting.get("login", 0) + waiting.get("ops", 0)
        status = "fail" if stuck else ("attention" if waiting.get("mail", 0) > 10000 else "ok")
        return [
            Line(
                "12.4.1", "mail, login and operation logs",
                "every delivery event, sign-in and administrative change is a row in the store",
                "; ".join(parts) + "; waiting in the spool's outbox: "
                + ", ".join(f"{k}={v}" for k, v in sorted(waiting.items())),
                status,
                f"{stuck} login/operation rows cannot reach the store (CmcdAuditRowsWaitingForStore)" if stuck
                else ("mail-log events pile up in the outbox (CmcdMailLogBacklog)" if status == "attention"
                      else "rows reach the store"),
            )
        ]  # fmt: skip

    async def retention(self) -> list[Line]:
        r = self.config.retention
        out = []
        last = await self._store(rows.last_op, "retention.run")
        setting = f"mail log {r.mail_log_days} days, login and operation logs {r.audit_log_days} days; run daily"
        if last is None:
            out.append(Line("18.1.3", "last retention run", setting, "no retention run in the operation log",
                            "attention", "retention has not run yet (a minute after start, then daily; cmcctl retention run)"))  # fmt: skip
        else:
            age = max(0.0, self.now - last["ts"])
            status = "fail" if last["result"] != "ok" else ("attention" if age > 2 * DAY_S else "ok")
            out.append(Line(
                "18.1.3", "last retention run", setting,
                f"{_when(last['ts'])} ({_age(age)} ago) by {last['actor']}: {last['result']}, removed {last['detail']}",
                status,
                "the last run failed" if last["result"] != "ok"
                else ("no run for over two days" if status == "attention" else "ran within the last two days"),
            ))  # fmt: skip
        ages = await self._store(rows.log_ages, self.tenant_id)
        days = {"mail_log": r.mail_log_days, "login_log": r.audit_log_days, "ops_log": r.audit_log_days}
        for table, a in ages.items():
            limit = days[table] * DAY_S
            if a["oldest"] is None:
                out.append(Line("18.1.3", f"oldest row of {table}", f"kept {days[table]} days", "no rows", "ok",
                                "nothing kept yet"))  # fmt: skip
                continue
            age = max(0.0, self.now - a["oldest"])
            status = "fail" if age > limit + DAY_S else ("attention" if age > limit else "ok")
            out.append(Line(
                "18.1.3", f"oldest row of {table}", f"kept {days[table]} days, then deleted",
                f"{a['rows']} rows; oldest {_when(a['oldest'])} ({_age(age)} old)",
                status,
                f"a row older than {days[table]} days (+1 day for the daily run) is still there: deletion is not working"
                if status == "fail" else ("past retention, due at the next daily run" if status == "attention"
                                          else f"kept rows reach back {_age(age)}, within {days[table]} days"),
            ))  # fmt: skip
        return out

    # -- CLD.8.1.5, CLD.9.5.1: tenants --------------------------------------------------------------

    async def purges(self) -> list[Line]:
        setting = "cmcctl tenant delete --purge: queue, store rows, then vacuum; the purge is logged"
        note = (
            f"backups taken before a purge keep its rows until they age out "
            f"({self.config.backup.keep} x {_age(float(self.config.backup.interval))})"
        )
        if self.tenant is not None:
            return [Line("CLD.8.1.5", "tenant purges", setting, f"{self.tenant} has not been erased", "ok",
                         "other tenants' purges are not shown in a report for one tenant")]  # fmt: skip
        out = []
        for p in await self._store(rows.purges):
            who = p["actor"] + (f" (uid {p['actor_uid']})" if p["actor_uid"] is not None else "")
            out.append(Line(
                "CLD.8.1.5", f"purge of {p['target']}", setting,
                f"{_when(p['ts'])} by {who}: {p['result']}; {p['detail']}",
                "ok" if p["result"] == "ok" else "fail", note if p["result"] == "ok" else "the purge did not complete",
            ))  # fmt: skip
        pending = await self._store(lambda s: s.purges_pending())
        left = await self._store(rows.leftovers)
        status = "fail" if left else ("attention" if pending else "ok")
        out.append(Line(
            "CLD.8.1.5", "rows of erased tenants", setting,
            f"purges on record: {len(out)}; unfinished: {len(pending)}; rows naming no tenant: "
            + (", ".join(f"{t}={n}" for t, n in left.items()) or "none"),
            status,
            "rows outlived their tenant's purge" if left
            else ("a purge was cut short; it is finished at the next start" if pending else "nothing of an erased tenant is left"),
        ))  # fmt: skip
        return out

    async def segregation(self) -> list[Line]:
        s = await self._store(rows.segregation, self.tenant_id)
        across = {k: v for k, v in s.items() if k != "tenants" and v}
        return [
            Line(
                "CLD.9.5.1", "tenant segregation",
                "every user, key, session, credential, domain and log row belongs to one tenant; a sender's domain "
                "must be its tenant's",
                f"tenants: {s['tenants']}; credentials of one tenant held by another's user: "
                + (", ".join(f"{k}={v}" for k, v in across.items()) or "none"),
                "fail" if across else "ok",
                "rows join two tenants" if across else "no row joins two tenants",
            )
        ]  # fmt: skip

    # -- 12.4.4: time ------------------------------------------------------------------------------

    async def clock(self) -> list[Line]:
        tz = self.config.server.timezone
        try:
            ZoneInfo(tz)
            tz_ok = True
        except (ZoneInfoNotFoundError, ValueError):
            tz_ok = False
        out = [
            Line("12.4.4", "time zone", f"server.timezone = {tz!r}; records keep UTC epoch seconds",
                 "known to the zone database" if tz_ok else "unknown zone", "ok" if tz_ok else "fail",
                 "log times shown in this zone" if tz_ok else "not a zone name")
        ]  # fmt: skip
        synced, how = await self._thread(ntp_state)
        out.append(Line(
            "12.4.4", "clock synchronised", "the host's clock is kept by NTP (systemd-timesyncd or chrony)", how,
            {True: "ok", False: "fail", None: "attention"}[synced],
            {True: "NTP-synchronised", False: "the clock is not synchronised",
             None: "unknown: neither timedatectl nor chronyc answered"}[synced],
        ))  # fmt: skip
        return out

    # -- 12.1.3: capacity --------------------------------------------------------------------------

    async def _queue_figures(self) -> QueueFigures:
        if self._queue is None:
            spool = self.server._spool
            self._queue = await spool.read(functools.partial(read_queue, path=spool.path))
        return self._queue

    async def capacity(self) -> list[Line]:
        cfg = self.config
        free = await self._thread(_free_bytes, cfg.path(cfg.spool.dir))
        min_free = int(cfg.spool.min_free)
        low = bool(min_free) and free < min_free
        out = [
            Line(
                "12.1.3", "spool free space", f"spool.min_free = {_size(min_free)}" + (" (check off)" if not min_free else ""),
                f"{_size(free)} free on {cfg.path(cfg.spool.dir)}",
                "fail" if low else ("attention" if not min_free or free < 2 * min_free else "ok"),
                "below min_free: MAIL is refused" if low
                else ("the check is off" if not min_free else
                      ("less than twice min_free" if free < 2 * min_free else "above twice min_free")),
            )
        ]  # fmt: skip
        q = await self._queue_figures()
        oldest = None if q.oldest_received is None else max(0.0, self.now - q.oldest_received)
        states = ", ".join(f"{k}={v}" for k, v in sorted(q.recipients.items())) or "empty"
        out.append(Line(
            "12.1.3", "queue", f"messages expire after {_age(float(cfg.delivery.max_lifetime))}",
            f"recipients by state: {states}; oldest message (held ones aside): "
            + (f"{_age(oldest)} old" if oldest is not None else "none") + f"; spool database {_size(q.spool_bytes)}",
            "attention" if oldest is not None and oldest > 3600 else "ok",
            "a message has waited over an hour" if oldest is not None and oldest > 3600 else "nothing waits over an hour",
        ))  # fmt: skip
        engine = self.server._engine
        dead = engine.dead_sites() if engine is not None else 0
        waiting = sum(q.recipients.get(s, 0) for s in ("queued", "deferred", "inflight"))
        backup_age = self._newest_backup_age
        # (alert, whether it holds now, critical in alerts.yml)
        conditions = [
            ("CmcdOldestMessageOld", oldest is not None and oldest > 3600, False),
            ("CmcdQueueGrowing (over 1000 waiting; the growth itself is not measured here)", waiting > 1000, False),
            ("CmcdBackupStale", backup_age is None or backup_age > 2 * 3600, True),
            ("CmcdAuditRowsWaitingForStore", q.outbox.get("login", 0) + q.outbox.get("ops", 0) > 0, True),
            ("CmcdMailLogBacklog", q.outbox.get("mail", 0) > 10000, False),
            ("CmcdSpoolLowOnSpace (free space below min_free now)", low, True),
            ("dead destinations (cmcd_destinations_dead > 0)", dead > 0, False),
        ]
        active = [name for name, on, _ in conditions if on]
        critical = any(on and crit for _, on, crit in conditions)
        out.append(Line(
            "12.1.3", "active alerts",
            "the conditions of etc/prometheus/alerts.yml, computed in-process: "
            + ", ".join(name.split(" (")[0] for name, _, _ in conditions)
            + ". Rate-based rules (failure and deferral ratios, auth failures, store latency, spool write "
            "failures, webhook drops) need Prometheus's history and are not derived here",
            "active: " + (", ".join(active) or "none"),
            "fail" if critical else ("attention" if active else "ok"),
            f"{len(active)} alert conditions hold" if active else "no alert condition holds",
        ))  # fmt: skip
        return out


# -- blocking helpers (run in a thread) ------------------------------------------------------------


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def inspect_backup(file: Path, key_file: Path, store_path: Path, keys: crypto.DataKeys) -> dict[str, Any]:
    """Restore FILE (backup.py's own restore) into a private temporary directory beside the store,
    then read the copy: integrity and row counts (from the restore's verification), whether KEYS
    open it, and every table and column that would hold a message body. The copy is removed."""
    with tempfile.TemporaryDirectory(prefix=".cmcd-evidence-", dir=store_path.parent) as tmp:
        restored = restore_backup(file, key_file, Path(tmp) / "store.db", now=time.time())
        conn = sqlite3.connect(restored.store_path.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            tables = [str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            body_columns = [
                f"{t}.{c[1]}" for t in tables for c in conn.execute(f'PRAGMA table_info("{t}")') if c[1] in BODY_COLUMNS
            ]
            row = conn.execute("SELECT value FROM meta WHERE key = 'key_check'").fetchone()
        finally:
            conn.close()
    try:
        key_ok = row is not None and keys.decrypt(bytes.fromhex(row[0])) == "cmcd key check"
    except Exception:
        key_ok = False
    v = restored.verified
    return {
        "tables": tables,
        "body_tables": sorted(t for t in tables if t in BODY_TABLES),
        "body_columns": body_columns,
        "integrity": v.integrity,
        "rows": dict(v.rows),
        "data_key_ok": key_ok,
    }


def ntp_state() -> tuple[bool | None, str]:
    """(synchronised?, what was asked and answered); None when neither timedatectl nor chronyc could tell."""
    tried = []
    for argv in (["timedatectl", "show", "-p", "NTPSynchronized", "--value"], ["chronyc", "-n", "tracking"]):
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=5, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            tried.append(f"{argv[0]}: {type(exc).__name__}")
            continue
        out = proc.stdout.strip()
        if proc.returncode != 0:
            said = (proc.stderr.strip() or out).splitlines()
            tried.append(f"{argv[0]}: exit {proc.returncode} ({said[0][:100] if said else 'no output'})")
            continue
        if argv[0] == "timedatectl":
            if out in ("yes", "no"):
                return out == "yes", f"timedatectl: NTPSynchronized={out}"
            tried.append(f"timedatectl: {out[:40]!r}")
            continue
        leap = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Leap status")), "")
        if leap:
            return leap == "Normal", f"chronyc tracking: Leap status {leap}"
        tried.append("chronyc: no Leap status")
    return None, "; ".join(tried)


# -- TLS probes ------------------------------------------------------------------------------------

_OLD = ("TLSv1", "TLSv1.1")
_LABEL = {"TLSv1": "TLS 1.0", "TLSv1.1": "TLS 1.1"}


def _read_reply(sock: socket.socket) -> tuple[int, list[str]]:
    """One SMTP reply (all its lines), read byte by byte so nothing past it is consumed."""
    data = b""
    lines: list[str] = []
    while True:
        ch = sock.recv(1)
        if not ch:
            raise ConnectionError("the server closed the connection")
        data += ch
        if data.endswith(b"\r\n"):
            line = data[:-2].decode("utf-8", "replace")
            data = b""
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return int(line[:3]), lines
        if len(data) > 4096:
            raise ConnectionError("reply line too long")


def _connect(address: str, starttls: bool) -> tuple[socket.socket, list[str]]:
    """A TCP connection to ADDRESS, past EHLO and STARTTLS when STARTTLS; and the EHLO keywords."""
    host, port = split_hostport(address)
    sock = socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S)
    keywords: list[str] = []
    if starttls:
        try:
            code, _ = _read_reply(sock)
            if code != 220:
                raise ConnectionError(f"greeting {code}")
            sock.sendall(b"EHLO evidence.cmcd.invalid\r\n")
            code, lines = _read_reply(sock)
            keywords = [ln[4:].split(" ")[0].upper() for ln in lines[1:]]
            sock.sendall(b"STARTTLS\r\n")
            code, _ = _read_reply(sock)
            if code != 220:
                raise ConnectionError(f"STARTTLS answered {code}")
        except BaseException:
            sock.close()
            raise
    return sock, keywords


def _handshake(address: str, starttls: bool, version: str | None, ciphers: str | None = None) -> dict[str, Any]:
    """One handshake offering only VERSION (None: what this host's OpenSSL offers by default)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # asking what the listener negotiates, not whether to trust it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0 and 1.1 are offered on purpose
        try:
            if version is not None:
                v = {
                    "TLSv1": ssl.TLSVersion.TLSv1,
                    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
                    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
                }
                ctx.minimum_version = ctx.maximum_version = v[version]
                ctx.set_ciphers(ciphers or "ALL:@SECLEVEL=0")
        except (ValueError, ssl.SSLError) as exc:
            return {"result": "untested", "detail": f"this host's OpenSSL cannot offer it ({exc})"}
    try:
        sock, keywords = _connect(address, starttls)
    except OSError as exc:
        return {"result": "error", "detail": f"cannot connect: {exc}"}
    try:
        with ctx.wrap_socket(sock) as tls:
            cipher = tls.cipher()
            return {
                "result": "accepted",
                "version": tls.version(),
                "cipher": cipher[0] if cipher else "",
                "keywords": keywords,
            }
    except (ssl.SSLError, ConnectionError, EOFError) as exc:
        return {"result": "refused", "detail": str(exc)[:120], "keywords": keywords}
    except OSError as exc:
        return {"result": "error", "detail": str(exc)[:120], "keywords": keywords}
    finally:
        sock.close()


def probe_listener(address: str, starttls: bool) -> dict[str, Any]:
    """Offer the listener at ADDRESS TLS 1.0, 1.1, 1.2 alone, weak ciphers over 1.2, then the best
    this host can: which it took, at what version and cipher, and (STARTTLS) whether AUTH was
    offered before TLS."""
    out = {name: _handshake(address, starttls, name) for name in (*_OLD, "TLSv1.2")}
    out["weak"] = _handshake(address, starttls, "TLSv1.2", "NULL:EXPORT:RC4:3DES:DES:MD5:aNULL:@SECLEVEL=0")
    out["best"] = _handshake(address, starttls, None)
    return out


def _probe_text(res: dict[str, Any], starttls: bool) -> str:
    parts = []
    for name in _OLD:
        parts.append(f"{_LABEL[name]} {res[name]['result']}")
    r12, best, weak = res["TLSv1.2"], res["best"], res["weak"]
    if r12["result"] == "accepted":
        parts.append(f"TLS 1.2 accepted with {r12['cipher']}")
    else:
        parts.append(f"TLS 1.2 {r12['result']}")
    parts.append(f"weak ciphers (NULL, EXPORT, RC4, 3DES, DES, MD5, anonymous) {weak['result']}")
    if best["result"] == "accepted":
        parts.append(f"negotiated by default: {best['version']} {best['cipher']}")
    else:
        parts.append(f"default handshake {best['result']}: {best.get('detail', '')}")
    if starttls:
        kw = best.get("keywords") or []
        parts.append("AUTH offered before STARTTLS" if "AUTH" in kw else "no AUTH before STARTTLS")
    return "; ".join(parts)


def _judge_probe(res: dict[str, Any], starttls: bool) -> tuple[str, str]:
    accepted_old = [n for n in _OLD if res[n]["result"] == "accepted"]
    if accepted_old:
        return "fail", f"the listener accepts {', '.join(accepted_old)}"
    if res["weak"]["result"] == "accepted":
        return "fail", f"the listener accepts a weak cipher ({res['weak'].get('cipher')})"
    if res["best"]["result"] != "accepted":
        return "fail", "no TLS handshake succeeded: " + str(res["best"].get("detail", ""))
    if starttls and "AUTH" in (res["best"].get("keywords") or []):
        return "fail", "AUTH is offered before TLS: passwords could cross in the clear"
    untested = [n for n in _OLD if res[n]["result"] != "refused"]
    if untested:
        return "attention", f"{', '.join(untested)} could not be tried from this host: {res[untested[0]].get('detail')}"
    return "ok", "TLS 1.0 and 1.1 refused by the listener itself; TLS 1.2+ with strong ciphers"


# -- the verb --------------------------------------------------------------------------------------


async def _evidence(server: AdminServer, a: _Args) -> Any:
    tenant = a.optional_text("tenant")
    tenant_id = None
    if tenant is not None:
        tenant_id = (await server._astore.call(server._store.tenant, tenant)).id  # unknown: refused, logged
    now = time.time()
    started = time.monotonic()
    lines = await Collector(server, tenant, tenant_id, now).lines()
    summary = {s: sum(1 for line in lines if line.status == s) for s in STATUSES}
    caller = a.caller
    log.info("event=evidence_report tenant=%s ok=%d attention=%d fail=%d", tenant or "-", *summary.values())
    return {
        "generated": now,
        "generated_iso": _when(now),
        "hostname": server._config.server.hostname,
        "timezone": server._config.server.timezone,
        "tenant": tenant,
        "asked_by": {"name": caller.name, "uid": caller.uid} if caller else None,
        "seconds": round(time.monotonic() - started, 3),
        "controls": CONTROLS,
        "summary": summary,
        "lines": [line.as_dict() for line in lines],
    }


EVIDENCE_VERBS: dict[str, _Verb] = {
    # a target makes the admin server write each run (and each refusal) to the operation log, naming who asked
    "evidence": _Verb(_evidence, ("tenant",), target="report tenant={tenant}"),
}
