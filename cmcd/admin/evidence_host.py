"""Evidence report sections on the daemon and its host, which hold no tenant's data: access to its
files and socket (9.4.1), TLS on its listeners and outbound (10.1.1), backups (12.3.1), the clock
(12.4.4) and capacity (12.1.3). Measures, never changes: blocking probes run in a thread
(cmcd/admin/evidence_probes.py).
"""

from __future__ import annotations

import asyncio
import stat
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cmcd.admin.evidence_lines import Line, Run, duration, file_mode, size_text, utc
from cmcd.admin.evidence_probes import free_bytes, inspect_backup, judge_probe, ntp_state, probe_listener, probe_text
from cmcd.errors import BackupError
from cmcd.records import PENDING_STATES, RecipientState
from cmcd.store.backup import list_backups


async def access(run: Run) -> list[Line]:
    cfg = run.config
    sock = cfg.path(cfg.admin.socket)
    store = cfg.path(cfg.store.path)
    spool = cfg.path(cfg.spool.dir)
    found = await run.thread(lambda: {p: file_mode(p) for p in (sock, store, spool)})
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


async def tls_listeners(run: Run) -> list[Line]:
    cfg = run.config
    status = run.status()
    bound: dict[str, list[str]] = status.get("listeners") or {}
    targets = [("SMTP submission (STARTTLS)", a, True) for a in bound.get("smtp", [])]
    targets += [("SMTPS (implicit TLS)", a, False) for a in bound.get("smtps", [])]
    if status.get("api_listener"):
        targets.append(("HTTPS API and console", str(status["api_listener"]), False))
    if cfg.metrics.listen and cfg.metrics.tls_cert and not cfg.metrics.listen.endswith(":0"):
        targets.append(("metrics (HTTPS)", cfg.metrics.listen, False))
    results = await asyncio.gather(*(run.thread(probe_listener, addr, starttls) for _, addr, starttls in targets))
    out = []
    setting = "TLS 1.2 or later (crypto.server_tls_context), OpenSSL's default cipher list"
    for (kind, addr, starttls), res in zip(targets, results, strict=True):
        status_, reason = judge_probe(res, starttls)
        out.append(Line("10.1.1", f"{kind} {addr}", setting, probe_text(res, starttls), status_, reason))
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


async def tls_outbound(run: Run) -> list[Line]:
    d = run.config.delivery
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
    return [Line("10.1.1", "outbound TLS", f"delivery.tls = {d.tls!r}", f"per-domain policies: {per}", status, reason)]


async def backups(run: Run) -> list[Line]:
    cfg = run.config
    b = cfg.backup
    interval = float(b.interval)
    found = await run.thread(list_backups, cfg.path(b.dir))
    out = [
        Line(
            "12.3.1", "schedule", f"every {duration(interval)}, {b.keep} kept, in {cfg.path(b.dir)}",
            f"{len(found)} generations present" + (f", oldest {utc(found[0].created)}" if found else ""),
            "attention" if interval > 3600 or len(found) > b.keep else "ok",
            "interval over one hour: more than an hour of records can be lost" if interval > 3600
            else (f"more generations than backup.keep ({b.keep})" if len(found) > b.keep
                  else "hourly, within the generations kept"),
        )
    ]  # fmt: skip
    key_file = cfg.path(b.key_file)
    km = await run.thread(file_mode, key_file)
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
        out.append(Line("12.3.1", "newest backup", f"one every {duration(interval)}", "no backup in backup.dir",
                        "fail", "no backup has been taken: cmcctl backup now"))  # fmt: skip
        return out
    newest = found[-1]
    age = max(0.0, run.now - newest.created)
    run.newest_backup_age = age
    out.append(Line(
        "12.3.1", "newest backup", f"one every {duration(interval)}; older than 2 x interval is a failure",
        f"{newest.name}, {size_text(newest.size_bytes)}, taken {utc(newest.created)} ({duration(age)} ago)",
        "fail" if age > 2 * interval else "ok",
        f"older than 2 x backup.interval ({duration(2 * interval)})" if age > 2 * interval else "within 2 x backup.interval",
    ))  # fmt: skip
    try:
        checked = await run.thread(inspect_backup, newest.path, key_file, cfg.path(cfg.store.path), run.store.keys)
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


async def clock(run: Run) -> list[Line]:
    tz = run.config.server.timezone
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
    synced, how = await run.thread(ntp_state)
    out.append(Line(
        "12.4.4", "clock synchronised", "the host's clock is kept by NTP (systemd-timesyncd or chrony)", how,
        {True: "ok", False: "fail", None: "attention"}[synced],
        {True: "NTP-synchronised", False: "the clock is not synchronised",
         None: "unknown: neither timedatectl nor chronyc answered"}[synced],
    ))  # fmt: skip
    return out


async def capacity(run: Run) -> list[Line]:
    cfg = run.config
    free = await run.thread(free_bytes, cfg.path(cfg.spool.dir))
    min_free = int(cfg.spool.min_free)
    low = bool(min_free) and free < min_free
    out = [
        Line(
            "12.1.3", "spool free space", f"spool.min_free = {size_text(min_free)}" + (" (check off)" if not min_free else ""),
            f"{size_text(free)} free on {cfg.path(cfg.spool.dir)}",
            "fail" if low else ("attention" if not min_free or free < 2 * min_free else "ok"),
            "below min_free: MAIL is refused" if low
            else ("the check is off" if not min_free else
                  ("less than twice min_free" if free < 2 * min_free else "above twice min_free")),
        )
    ]  # fmt: skip
    q = await run.queue_figures()
    oldest = None if q.oldest_received is None else max(0.0, run.now - q.oldest_received)
    states = ", ".join(f"{k}={v}" for k, v in sorted(q.recipients.items())) or "empty"
    out.append(Line(
        "12.1.3", "queue", f"messages expire after {duration(float(cfg.delivery.max_lifetime))}",
        f"recipients by state: {states}; oldest message (held ones aside): "
        + (f"{duration(oldest)} old" if oldest is not None else "none") + f"; spool database {size_text(q.spool_bytes)}",
        "attention" if oldest is not None and oldest > 3600 else "ok",
        "a message has waited over an hour" if oldest is not None and oldest > 3600 else "nothing waits over an hour",
    ))  # fmt: skip
    engine = run.engine
    dead = engine.dead_sites() if engine is not None else 0
    waiting = sum(q.recipients.get(s, 0) for s in PENDING_STATES if s != RecipientState.HELD)
    backup_age = run.newest_backup_age
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
