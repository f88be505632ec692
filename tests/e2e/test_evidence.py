"""The audit evidence report (issue 18 part B): `cmcctl evidence` against a real daemon set up to
comply and one set up to fail, line by line.

What cannot be set up here: a listener that accepts TLS 1.0 or 1.1 (cmcd's listeners are built by
crypto.server_tls_context with TLS 1.2 as the minimum and no setting changes it), so the failing
daemon's TLS lines are ok too; the probe itself is real (this host's OpenSSL offers TLS 1.0 with
SECLEVEL=0, and the lines say "refused", not "untested"). An NTP-synchronised clock is whatever
this host has: the clock line is compared with what timedatectl/chronyc say here.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import pwd
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cmcd import totp
from cmcd.admin.evidence import CONTROLS, ntp_state
from tests.conftest import Cmcd, message, queue_id

CMCCTL = [sys.executable, "-m", "cmcd.admin.cli"]


def cmcctl(d: Cmcd, *args: str) -> str:
    proc = subprocess.run(
        [*CMCCTL, "--socket", str(d.root / "admin.sock"), *args], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def report(d: Cmcd, *args: str) -> dict[str, Any]:
    return json.loads(cmcctl(d, "evidence", "--format", "json", *args))


def by_item(rep: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {line["item"]: line for line in rep["lines"]}


def overrides(tmp_path: Path, name: str) -> dict[str, Any]:
    return {
        "api": {"listen": "127.0.0.1:0"},
        "backup": {"dir": str(tmp_path / f"{name}-backups"), "key_file": str(tmp_path / f"{name}-backup.key")},
    }


def enrol_admin(d: Cmcd, tenant: str, login: str) -> None:
    d.admin("user.add", tenant=tenant, login=login, role="admin", password="an admin's long secret")
    b32 = d.admin("user.otp-enroll", tenant=tenant, login=login)["secret"]
    secret = base64.b32decode(b32 + "=" * (-len(b32) % 8))
    d.admin("user.otp-confirm", tenant=tenant, login=login, code=totp.totp(secret, time.time()))


def submit(d: Cmcd) -> None:
    with d.smtp() as c:
        assert c.mail("alice@acme.test")[0] == 250
        assert c.rcpt("rcpt@dst.test")[0] == 250
        code, reply = c.data(message())
        assert code == 250, reply
        queue_id(reply)
    d.wait_mail_log(lambda rows: len(rows) >= 1)


def test_a_compliant_daemon_reports_every_line_ok(make_cmcd: Any, tmp_path: Path) -> None:
    d = make_cmcd(overrides(tmp_path, "ok"))
    enrol_admin(d, "acme", "acme-admin")
    d.admin("suppression.add", tenant="acme", address="gone@dst.test")
    submit(d)
    # an API key in use: its last use is recorded (once an hour at most)
    token = d.admin("apikey.add", tenant="acme", login="alice")["token"]
    assert d.http("GET", "/v1/deliveries", token=token)[0] == 403  # a sender's key: known, not allowed to read
    cmcctl(d, "retention", "run")
    cmcctl(d, "backup", "now")
    rep = report(d)
    lines = by_item(rep)
    synced, _ = ntp_state()
    host_clock = {True: "ok", False: "fail", None: "attention"}[synced]
    assert lines.pop("clock synchronised")["status"] == host_clock
    not_ok = {item: (line["status"], line["evidence"], line["reason"]) for item, line in lines.items()
              if line["status"] != "ok"}  # fmt: skip
    assert not_ok == {}, json.dumps(not_ok, indent=1)
    # each control the report promises has at least one line, each line a reason
    assert {line["control"] for line in rep["lines"]} == set(CONTROLS)
    assert all(line["reason"] and line["setting"] and line["evidence"] for line in rep["lines"])
    # what was measured, not assumed
    assert "TLS 1.0 refused; TLS 1.1 refused" in lines[f"SMTPS (implicit TLS) 127.0.0.1:{d.smtps_port}"]["evidence"]
    assert "TLS 1.0 refused" in lines[f"SMTP submission (STARTTLS) 127.0.0.1:{d.smtp_port}"]["evidence"]
    assert "no AUTH before STARTTLS" in lines[f"SMTP submission (STARTTLS) 127.0.0.1:{d.smtp_port}"]["evidence"]
    assert "TLS 1.1 refused" in lines[f"HTTPS API and console 127.0.0.1:{d.api_port}"]["evidence"]
    assert "negotiated by default: TLSv1.3" in lines[f"HTTPS API and console 127.0.0.1:{d.api_port}"]["evidence"]
    assert "2 of 2 address values decrypt (100%)" in lines["addresses in mail_log"]["evidence"]
    assert "1 of 1 address values decrypt" in lines["addresses in suppressions"]["evidence"]
    assert "spool or body tables/columns: none" in lines["no message body in backups"]["evidence"]
    assert "integrity ok; data key matches" in lines["newest backup verified"]["evidence"]
    assert "without a confirmed TOTP enrolment: none" in lines["admins of acme"]["evidence"]
    assert "mode 0600" in lines["data key file"]["evidence"]
    assert f"scrypt n={2**15} r=8 p=1" in lines["password hashes"]["setting"]
    assert "1 live API keys; not used for 90 days: none; never used: 0" in lines["API keys of acme"]["evidence"]
    assert "mail log 40 days" in lines["last retention run"]["setting"]
    assert rep["summary"]["fail"] == 0
    # every run is in the operation log, with who asked
    me = pwd.getpwuid(os.getuid()).pw_name
    runs = [o for o in d.ops_log() if o["action"] == "evidence"]
    assert [(o["actor"], o["actor_uid"], o["result"], o["target"]) for o in runs] == [(me, os.getuid(), "ok", "report")]
    # md and html name every control and escape what they show
    md = cmcctl(d, "evidence")
    page = cmcctl(d, "evidence", "--format", "html")
    for control, title in CONTROLS.items():
        assert f"## {control} {title}" in md
        assert f'<h2 id="{control}">' in page
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and page.rstrip().endswith("</html>")
    assert len([o for o in d.ops_log() if o["action"] == "evidence"]) == 3


def test_a_daemon_set_up_to_fail_says_which_line_fails_and_why(make_cmcd: Any, tmp_path: Path) -> None:
    d = make_cmcd(overrides(tmp_path, "bad"))
    d.admin("user.add", tenant="acme", login="acme-admin", role="admin", password="an admin's long secret")
    submit(d)
    # a backup older than 2 x backup.interval: the newest one, renamed to a time three hours ago
    # (backup list reads a generation's time from its name)
    made = d.admin("backup.now")
    old = datetime.datetime.fromtimestamp(time.time() - 3 * 3600, datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    Path(made["path"]).rename(Path(made["path"]).with_name(f"cmcd-store-{old}.bak"))
    # a mail-log row 60 days old (retention keeps 40), written past the daemon
    conn = sqlite3.connect(d.root / "cmcd.db", timeout=30)
    with conn:
        conn.execute(
            "INSERT INTO mail_log(ts, tenant_id, queue_id, event, status) VALUES (?, ?, 'OLDROW', 'accepted', 'queued')",
            (time.time() - 60 * 86400, d.admin("tenant.show", name="acme")["id"]),
        )
    conn.close()
    # an API key made 100 days ago and never used
    stale = d.admin("apikey.add", tenant="acme", login="alice")["key_id"]
    conn = sqlite3.connect(d.root / "cmcd.db", timeout=30)
    with conn:
        conn.execute("UPDATE api_keys SET created = ? WHERE key_id = ?", (time.time() - 100 * 86400, stale))
    conn.close()
    # the daemon refuses to start with a 0644 data key: loosen it once it runs
    os.chmod(d.root / "data.key", 0o644)
    lines = by_item(report(d))
    expected = {
        "data key file": ("fail", "readable by group or others"),
        "oldest row of mail_log": ("fail", "still there: deletion is not working"),
        "newest backup": ("fail", "older than 2 x backup.interval"),
        "admins of acme": ("fail", "1 admins can sign in without a second factor"),
        "last retention run": ("attention", "retention has not run yet"),
        "API keys of acme": ("attention", "1 keys unused for 90 days"),
        "active alerts": ("fail", "alert conditions hold"),
    }
    for item, (status, reason) in expected.items():
        line = lines[item]
        assert (line["status"], reason in line["reason"]) == (status, True), line
    assert "mode 0644" in lines["data key file"]["evidence"]
    assert "acme-admin" in lines["admins of acme"]["evidence"]
    assert f"not used for 90 days: {stale}; never used: 1" in lines["API keys of acme"]["evidence"]
    assert "CmcdBackupStale" in lines["active alerts"]["evidence"]
    assert "(60.0d old)" in lines["oldest row of mail_log"]["evidence"]
    # the old backup is still a good one: its contents are checked all the same
    assert lines["newest backup verified"]["status"] == "ok"
    assert lines["no message body in backups"]["status"] == "ok"
    # beta's admin is not acme's business: the tenant-scoped report has only acme's lines
    scoped = report(d, "--tenant", "acme")
    text = json.dumps(scoped)
    assert "beta" not in text and "bob" not in text and "OLDROW" not in text
    assert by_item(scoped)["admins of acme"]["status"] == "fail"
    runs = [(o["action"], o["target"], o["result"]) for o in d.ops_log() if o["action"] == "evidence"]
    assert runs == [("evidence", "report", "ok"), ("evidence", "report tenant=acme", "ok")]


def test_an_unknown_tenant_is_refused_and_the_refusal_logged(make_cmcd: Any, tmp_path: Path) -> None:
    d = make_cmcd(overrides(tmp_path, "unknown"))
    proc = subprocess.run(
        [*CMCCTL, "--socket", str(d.root / "admin.sock"), "evidence", "--tenant", "nosuch"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and "nosuch" in proc.stderr
    assert [(o["action"], o["result"]) for o in d.ops_log() if o["action"] == "evidence"] == [("evidence", "refused")]


@pytest.mark.parametrize("fmt", ["md", "html"])
def test_rendering_escapes_what_the_daemon_sends(fmt: str) -> None:
    from cmcd.admin.evidence_render import render

    rep = {
        "hostname": "h<b>",
        "controls": {"9.2.1": "User registration and de-registration"},
        "summary": {"ok": 1, "attention": 0, "fail": 0},
        "lines": [
            {
                "control": "9.2.1",
                "item": "users of <script>x</script>",
                "setting": "a|b",
                "evidence": "line\nbreak",
                "status": "ok",
                "reason": "r",
            }
        ],  # fmt: skip
    }
    out = render(rep, fmt)
    assert "<script>" not in out
    if fmt == "md":
        assert "a\\|b" in out and "line\\nbreak" in out
    else:
        assert "&lt;script&gt;" in out and "h&lt;b&gt;" in out
