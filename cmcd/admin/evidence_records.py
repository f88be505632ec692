"""Evidence report sections on what the store holds: accounts and admins (9.2.1, 9.2.3), encryption
at rest (10.1.1), logs and their retention (12.4.1, 18.1.3), tenant purges and segregation
(CLD.8.1.5, CLD.9.5.1). With a tenant, each reads only that tenant's rows. Reads only; store reads
run on the store's thread.
"""

from __future__ import annotations

import os
import stat

from cmcd import crypto
from cmcd.admin.evidence_lines import DAY_S, Line, Run, duration, file_mode, utc
from cmcd.store import evidence_rows as rows

#: an API key not used for this long is named (9.2.1: access rights reviewed and removed when unused)
STALE_KEY_S = 90 * DAY_S
#: rows of the mail log and of the suppression list whose address columns are sampled
SAMPLE_ROWS = 200
#: scrypt cost below which a password hash is too cheap to guess against (OWASP: n >= 2**17 or 2**15 with r=8)
MIN_SCRYPT_N = 2**14


async def accounts(run: Run) -> list[Line]:
    tenants = await run.read(rows.accounts, run.tenant_id, run.now, STALE_KEY_S)
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


async def privileged(run: Run) -> list[Line]:
    tenants = await run.read(rows.accounts, run.tenant_id, run.now, STALE_KEY_S)
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


async def crypto_at_rest(run: Run) -> list[Line]:
    cfg = run.config
    key_file = cfg.path(cfg.store.key_file)
    m = await run.thread(file_mode, key_file)
    out = []
    algorithm = (
        f"AES-256-GCM (random 96-bit nonces) for addresses, replies, DKIM and TOTP secrets, message bodies; "
        f"HMAC-SHA256 lookup index with a separate key; key length {len(run.store.keys.enc_key) * 8} bits"
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
    schemes = await run.read(rows.password_schemes, run.tenant_id)
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
    sample = await run.read(rows.address_sample, run.tenant_id, SAMPLE_ROWS)
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
    dkim = await run.read(rows.dkim_sample, run.tenant_id)
    bad = dkim.get("plaintext", 0) + dkim.get("unreadable", 0)
    out.append(Line(
        "10.1.1", "DKIM private keys", "encrypted with the data key, domain and selector bound as associated data",
        f"{dkim.get('encrypted', 0)} keys decrypt; plaintext PEM {dkim.get('plaintext', 0)}, "
        f"undecryptable {dkim.get('unreadable', 0)}",
        "fail" if bad else "ok", f"{bad} keys are not encrypted" if bad else "every private key is encrypted",
    ))  # fmt: skip
    return out


async def logging(run: Run) -> list[Line]:
    ages = await run.read(rows.log_ages, run.tenant_id)
    figures = await run.queue_figures()
    parts = []
    for table, a in ages.items():
        newest = f"newest {duration(max(0.0, run.now - a['newest']))} ago" if a["newest"] else "empty"
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


async def retention(run: Run) -> list[Line]:
    r = run.config.retention
    out = []
    last = await run.read(rows.last_op, "retention.run")
    setting = f"mail log {r.mail_log_days} days, login and operation logs {r.audit_log_days} days; run daily"
    if last is None:
        out.append(Line("18.1.3", "last retention run", setting, "no retention run in the operation log",
                        "attention", "retention has not run yet (a minute after start, then daily; cmcctl retention run)"))  # fmt: skip
    else:
        age = max(0.0, run.now - last["ts"])
        status = "fail" if last["result"] != "ok" else ("attention" if age > 2 * DAY_S else "ok")
        out.append(Line(
            "18.1.3", "last retention run", setting,
            f"{utc(last['ts'])} ({duration(age)} ago) by {last['actor']}: {last['result']}, removed {last['detail']}",
            status,
            "the last run failed" if last["result"] != "ok"
            else ("no run for over two days" if status == "attention" else "ran within the last two days"),
        ))  # fmt: skip
    ages = await run.read(rows.log_ages, run.tenant_id)
    days = {"mail_log": r.mail_log_days, "login_log": r.audit_log_days, "ops_log": r.audit_log_days}
    for table, a in ages.items():
        limit = days[table] * DAY_S
        if a["oldest"] is None:
            out.append(Line("18.1.3", f"oldest row of {table}", f"kept {days[table]} days", "no rows", "ok",
                            "nothing kept yet"))  # fmt: skip
            continue
        age = max(0.0, run.now - a["oldest"])
        status = "fail" if age > limit + DAY_S else ("attention" if age > limit else "ok")
        out.append(Line(
            "18.1.3", f"oldest row of {table}", f"kept {days[table]} days, then deleted",
            f"{a['rows']} rows; oldest {utc(a['oldest'])} ({duration(age)} old)",
            status,
            f"a row older than {days[table]} days (+1 day for the daily run) is still there: deletion is not working"
            if status == "fail" else ("past retention, due at the next daily run" if status == "attention"
                                      else f"kept rows reach back {duration(age)}, within {days[table]} days"),
        ))  # fmt: skip
    return out


async def purges(run: Run) -> list[Line]:
    setting = "cmcctl tenant delete --purge: queue, store rows, then vacuum; the purge is logged"
    note = (
        f"backups taken before a purge keep its rows until they age out "
        f"({run.config.backup.keep} x {duration(float(run.config.backup.interval))})"
    )
    if run.tenant is not None:
        return [Line("CLD.8.1.5", "tenant purges", setting, f"{run.tenant} has not been erased", "ok",
                     "other tenants' purges are not shown in a report for one tenant")]  # fmt: skip
    out = []
    for p in await run.read(rows.purges):
        who = p["actor"] + (f" (uid {p['actor_uid']})" if p["actor_uid"] is not None else "")
        out.append(Line(
            "CLD.8.1.5", f"purge of {p['target']}", setting,
            f"{utc(p['ts'])} by {who}: {p['result']}; {p['detail']}",
            "ok" if p["result"] == "ok" else "fail", note if p["result"] == "ok" else "the purge did not complete",
        ))  # fmt: skip
    pending = await run.read(lambda s: s.purges_pending())
    left = await run.read(rows.leftovers)
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


async def segregation(run: Run) -> list[Line]:
    s = await run.read(rows.segregation, run.tenant_id)
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
