"""Reliability gaps of issue 18, each against the real daemon: a tenant purge with intake
hammering the tenant (nothing of it left, every submission refused or erased), a TLS client
that half-closes after the dot, and webhook URLs kept out of the logs without their secrets."""

from __future__ import annotations

import base64
import json
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import PASSWORD, Cmcd, message, queue_id
from tests.peers import DnsServer

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
    held = {d.shard_file(a.queue_id) for a in accepted}  # the shards that held the tenant's messages
    assert held <= set(files) and any(p.name == "cmcd.db" for p in files)
    data = b"".join(p.read_bytes() for p in files)
    for needle in (TENANT, DOMAIN, LOGIN, MARKER):
        assert needle.encode() not in data, needle
    assert [t["name"] for t in d.admin("tenant.list")] == ["acme", "beta"]
    ops = [o for o in d.ops_log() if o["action"] == "tenant.purge"]
    assert len(ops) == 1
    assert not [line for line in d.log if "level=error" in line or "Traceback" in line]


# -- issue 18 item 6: webhook URL secrets out of the logs --------------------------------------

SECRET_URL = "https://user:pass@hooks.example/x?token=SECRET#frag"


def _no_url_secret(text: str, where: str) -> None:
    assert "SECRET" not in text and "user:pass" not in text and "pass@" not in text and "frag" not in text, where


def test_webhook_url_secrets_are_not_logged(make_cmcd: Any) -> None:
    dns = DnsServer().start()
    dns.add("hooks.example", "A", "127.0.0.1")
    try:
        d = make_cmcd(
            {
                "api": {"listen": "127.0.0.1:0", "webhook_allow_private": True},
                "dns": {"nameservers": [dns.address], "timeout": "2s"},
            }
        )
        d.admin("user.add", tenant="acme", login="acme-admin", role="admin", password="pw-acme-admin")
        admin_key = str(d.admin("apikey.add", tenant="acme", login="acme-admin", role="admin")["token"])

        # cmcctl: a URL with user information is refused (the refusal is on record), one with a
        # token in its query string is added
        refused = cmcctl(d, "webhook", "add", "acme", SECRET_URL)
        assert refused.returncode != 0 and "user name or password" in refused.stderr
        added = cmcctl(d, "webhook", "add", "acme", SECRET_URL.replace("user:pass@", ""))
        assert added.returncode == 0, added.stderr
        # the API: the same two
        status, _, problem = d.http("POST", "/v1/webhooks", {"url": SECRET_URL}, token=admin_key)
        assert status == 422, problem
        url = SECRET_URL.replace("user:pass@", "").replace("/x?", "/y?")
        status, _, hook = d.http("POST", "/v1/webhooks", {"url": url}, token=admin_key)
        assert status == 201, hook
        assert hook["url"] == url  # the endpoint itself keeps its URL: it is where events are posted

        ops = cmcctl(d, "log", "ops")
        ops_json = cmcctl(d, "--json", "log", "ops")
        assert ops.returncode == ops_json.returncode == 0, ops.stderr + ops_json.stderr
        status, _, audit = d.http("GET", "/v1/audit?log=ops", token=admin_key)
        assert status == 200
        audit_text = json.dumps(audit)
        for text, where in ((ops.stdout, "cmcctl log ops"), (ops_json.stdout, "cmcctl --json log ops"),
                            (audit_text, "/v1/audit"), ("\n".join(d.log), "daemon log")):  # fmt: skip
            _no_url_secret(text, where)
        for text in (ops_json.stdout, audit_text):  # host and path stay, the secrets' places are marked
            assert "https://REDACTED@hooks.example/x?REDACTED#REDACTED" in text
            assert "https://hooks.example/x?REDACTED#REDACTED" in text
        rows = d.ops_log()
        assert {"webhook.add", "api.webhooks.add"} <= {r["action"] for r in rows}
        _no_url_secret(json.dumps(rows), "store ops_log")
    finally:
        dns.stop()


# -- issue 18 item 3: a TLS client that half-closes after the dot -------------------------------


class BioClient:
    """A TLS client over a plain socket through memory BIOs, so the test decides exactly what goes
    on the wire: a close_notify or not, then the TCP FIN (shutdown(SHUT_WR))."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext):
        self.sock, self.incoming, self.outgoing = sock, ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.buf = b""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
        self._flush()

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        if not chunk:
            self.incoming.write_eof()
            return False
        self.incoming.write(chunk)
        return True

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def readline(self) -> bytes:
        while b"\n" not in self.buf:
            try:
                self.buf += self.tls.read(65536)
                continue
            except ssl.SSLWantReadError:
                pass
            assert self._fill(), self.buf
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def half_close(self, close_notify: bool) -> tuple[bytes, str]:
        """Optionally send close_notify, then FIN; return what the server still sent and how it ended."""
        if close_notify:
            try:
                self.tls.unwrap()
            except ssl.SSLWantReadError:  # our close_notify is out; the server's is still to come
                pass
            self._flush()
        self.sock.shutdown(socket.SHUT_WR)
        out = self.buf
        while True:
            try:
                data = self.tls.read(65536)
                if not data:
                    return out, "closed"
                out += data
            except ssl.SSLWantReadError:
                if not self._fill():
                    continue
            except ssl.SSLZeroReturnError:
                return out, "close_notify"
            except ssl.SSLEOFError:
                return out, "eof"


@pytest.mark.parametrize("close_notify", [False, True], ids=["fin-only", "close-notify-then-fin"])
@pytest.mark.parametrize("tls13", [True, False], ids=["tls1.3", "tls1.2"])
@pytest.mark.parametrize("implicit", [True, False], ids=["implicit-tls", "starttls"])
def test_tls_half_close_after_the_dot_loses_the_reply_a_stack_limit(
    cmcd: Cmcd, implicit: bool, tls13: bool, close_notify: bool
) -> None:
    """The limit README.md documents ("TLS and a client that half-closes"): over TLS, a client that
    half-closes after the dot gets no reply. asyncio's and uvloop's TLS transports (SSLProtocol)
    start their own shutdown on the peer's close_notify or on a bare FIN, and close the socket
    once the data before it is handed up; the application protocol is not asked (its
    eof_received() return value is ignored) and a reply written afterwards is dropped. Over
    plain TCP the same client gets its 250 (test_lifecycle). If this test starts failing because
    a reply arrives, the stack now allows it: assert the 250 here and drop the README note."""
    d = cmcd
    ctx = d.client_context()
    if not tls13:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    raw = socket.create_connection(("127.0.0.1", d.smtps_port if implicit else d.smtp_port), timeout=10)
    with raw:
        if not implicit:
            plain = raw.makefile("rb")
            plain.readline()
            raw.sendall(b"EHLO half.test\r\nSTARTTLS\r\n")
            while not plain.readline().startswith(b"220"):
                pass
        c = BioClient(raw, ctx)
        if implicit:
            assert c.readline().startswith(b"220")
        c.send(b"EHLO half.test\r\n")
        while not c.readline().startswith(b"250 "):
            pass
        c.send(b"AUTH PLAIN " + base64.b64encode(f"\0alice\0{PASSWORD}".encode()) + b"\r\n")
        assert c.readline().startswith(b"235")
        c.send(b"MAIL FROM:<alice@acme.test>\r\nRCPT TO:<r@dst.test>\r\nDATA\r\n")
        assert [c.readline()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
        c.send(message() + b".\r\n")
        rest, ended = c.half_close(close_notify)
    assert b"250" not in rest, f"a reply came through ({rest!r}): the TLS stack now permits it"
    assert ended in ("close_notify", "eof", "closed")
    with d.smtps() as ok:  # the daemon is none the worse
        assert ok.noop()[0] == 250
