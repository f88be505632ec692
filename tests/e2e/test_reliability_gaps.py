"""Reliability gaps of issue 18, each against the real daemon: a tenant purge with intake
hammering the tenant (nothing of it left, every submission refused or erased), a TLS client
that half-closes after the dot, and webhook URLs kept out of the logs without their secrets."""

from __future__ import annotations

import smtplib
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import PASSWORD, Cmcd, message, queue_id

CMCCTL = [sys.executable, "-m", "cmcd.admin.cli"]

TENANT, DOMAIN, LOGIN, MARKER = "tenant-x7q", "x7q-doomed.test", "x7q-login", "X7Q-MARKER"


def cmcctl(d: Cmcd, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CMCCTL, "--socket", str(d.root / "admin.sock"), *args], capture_output=True, text=True, timeout=120
    )


@dataclass
class Attempt:
    marker: str
    door: str
    queue_id: str = ""  # set when the daemon said 250 / 202
    refusal: str = ""  # the reply (or the failure) otherwise


class Hammer:
    """Threads submitting as the doomed tenant in a loop until stop(): over STARTTLS, implicit
    TLS, SMTP AUTH with the tenant's API key, and the HTTP API. Every message is one Attempt."""

    def __init__(self, d: Cmcd, api_key: str):
        self.d, self.api_key = d, api_key
        self.attempts: list[Attempt] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._n = 0
        doors = ("starttls", "smtps", "apikey-smtp", "api", "api", "starttls")
        self.threads = [threading.Thread(target=self._run, args=(door,), daemon=True) for door in doors]

    def start(self) -> Hammer:
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(60)
            assert not t.is_alive()

    def accepted(self) -> list[Attempt]:
        with self._lock:
            return [a for a in self.attempts if a.queue_id]

    def _next(self, door: str) -> Attempt:
        with self._lock:
            self._n += 1
            a = Attempt(f"{MARKER}-{self._n:05d}", door)
            self.attempts.append(a)
            return a

    def _run(self, door: str) -> None:
        while not self._stop.is_set():
            if door == "api":
                self._api_once()
            else:
                self._smtp_session(door)

    def _api_once(self) -> None:
        a = self._next("api")
        body = {"from": {"email": f"app@{DOMAIN}"}, "to": ["rcpt@dst.test"], "subject": a.marker, "text": a.marker}
        try:
            status, _, reply = self.d.http("POST", "/v1/emails", body, token=self.api_key)
        except OSError as exc:
            a.refusal = f"api: {exc!r}"
            return
        if status == 202:
            a.queue_id = reply["id"]
        else:
            a.refusal = f"{status} {reply}"

    def _smtp_session(self, door: str) -> None:
        """One connection: AUTH, then messages until refused or cut off."""
        a: Attempt | None = None
        try:
            client: smtplib.SMTP = self.d.smtps(login=None) if door == "smtps" else self.d.smtp(login=None)
            with client:
                a = self._next(door)  # refused at AUTH: an attempt of its own
                client.login("apikey", self.api_key) if door == "apikey-smtp" else client.login(LOGIN, PASSWORD)
                while not self._stop.is_set():
                    sender = f"app@{DOMAIN}"
                    for code, text in (client.mail(sender), client.rcpt("rcpt@dst.test")):
                        if code != 250:
                            a.refusal = f"{code} {text.decode()}"
                            return
                    code, text = client.data(message(sender, subject=a.marker, body=a.marker))
                    if code != 250:
                        a.refusal = f"{code} {text.decode()}"
                        return
                    a.queue_id = queue_id(text)
                    a = self._next(door)
                a.refusal = "not sent (stopped)"
        except (smtplib.SMTPException, OSError) as exc:
            if a is not None and not a.queue_id:
                a.refusal = repr(exc)
        finally:
            time.sleep(0.01)


# -- issue 18 item 2: tenant purge against intake ----------------------------------------------

def test_tenant_purge_under_intake_leaves_nothing_and_every_submission_refused_or_erased(make_cmcd: Any) -> None:
    d = make_cmcd({"api": {"listen": "127.0.0.1:0"}, "smtp": {"auth_fail_limit": 100_000}})
    d.admin("tenant.add", name=TENANT)
    d.admin("domain.add", tenant=TENANT, domain=DOMAIN)
    d.admin("user.add", tenant=TENANT, login=LOGIN, role="sender", password=PASSWORD)
    key = str(d.admin("apikey.add", tenant=TENANT, login=LOGIN)["token"])
    with d.smtp() as c:  # another tenant's message, which the purge must leave alone
        assert c.mail("alice@acme.test")[0] == c.rcpt("kept@dst.test")[0] == 250
        kept = queue_id(c.data(message()))

    hammer = Hammer(d, key).start()
    deadline = time.monotonic() + 15
    while len({a.door for a in hammer.accepted()}) < 4 or len(hammer.accepted()) < 40:
        assert time.monotonic() < deadline, [a.refusal for a in hammer.attempts][-10:]
        time.sleep(0.05)
    purge = cmcctl(d, "tenant", "delete", TENANT, "--purge", "--yes")
    after = len(hammer.attempts)
    while len(hammer.attempts) < after + 12 and time.monotonic() < deadline + 10:
        time.sleep(0.05)  # the tenant keeps knocking after the purge, too
    hammer.stop()
    assert purge.returncode == 0, purge.stderr
    assert f"purged tenant {TENANT}" in purge.stdout

    accepted = hammer.accepted()
    refused = [a for a in hammer.attempts if not a.queue_id]
    assert len(accepted) >= 40 and refused
    for a in refused:  # every other submission got a refusal (or its connection cut), never a 250
        assert a.refusal and not a.refusal.startswith("2") and "Internal error" not in a.refusal, a
    spooled = d.spooled()
    assert kept in spooled
    assert not {a.queue_id for a in accepted} & set(spooled), "a message said 250/202 outlived the purge"
    for qid, m in spooled.items():  # the bodies are encrypted on disk: decrypted, none is the tenant's
        assert MARKER.encode() not in m["raw"] and DOMAIN not in m["sender"], qid

    files = [p for p in d.root.rglob("*") if p.is_file()]
    assert any(p.name == "queue.db" for p in files) and any(p.name == "cmcd.db" for p in files)
    data = b"".join(p.read_bytes() for p in files)
    for needle in (TENANT, DOMAIN, LOGIN, MARKER):
        assert needle.encode() not in data, needle
    assert [t["name"] for t in d.admin("tenant.list")] == ["acme", "beta"]
    ops = [o for o in d.ops_log() if o["action"] == "tenant.purge"]
    assert len(ops) == 1
    assert not [line for line in d.log if "level=error" in line or "Traceback" in line]
