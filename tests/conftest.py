"""Test harness: a real cmcd daemon in a subprocess on loopback port 0, real certificates, real clients.

Peers (swaks, smtp-source, postfix) are found on PATH; a missing one skips the test, except
under CMCD_REQUIRE_PEERS=1 (CI), where it fails the test.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import smtplib
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from cmcd import crypto
from cmcd.admin.client import AdminClient, RequestRefused
from cmcd.queue.ids import shard_of

REQUIRE_PEERS = os.environ.get("CMCD_REQUIRE_PEERS") == "1"
PASSWORD = "correct horse battery"


TEST_WORKERS = os.environ.get("CMCD_TEST_WORKERS", "")


def need(program: str) -> str:
    """Path of a peer program; skip (or fail under CMCD_REQUIRE_PEERS=1) when it is missing."""
    path = shutil.which(program) or next(
        (p for p in (f"/usr/sbin/{program}", f"/usr/bin/{program}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        message = f"peer program {program!r} is not installed (apt-get install it; .ci/run does)"
        if REQUIRE_PEERS:
            pytest.fail(message + " and CMCD_REQUIRE_PEERS=1")
        pytest.skip(message)
    return path


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(v)


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    scalars = [
        f"{json.dumps(k) if '.' in k or '*' in k else k} = {_toml_value(v)}"
        for k, v in data.items()
        if not isinstance(v, dict)
    ]
    out = ""
    if prefix and scalars:
        out += f"[{prefix}]\n"
    out += "".join(s + "\n" for s in scalars)
    for k, v in data.items():
        if isinstance(v, dict):
            key = json.dumps(k) if "." in k or "*" in k else k
            out += "\n" + to_toml(v, f"{prefix}.{key}" if prefix else key)
    return out


class AdminError(Exception):
    pass


class Cmcd:
    """One daemon under test: its directory, config, process, ports and a captured log."""

    def __init__(self, root: Path, ca: trustme.CA, overrides: dict[str, Any] | None = None):
        self.root = root
        self.ca = ca
        root.mkdir(parents=True, exist_ok=True)
        tls = root / "tls"
        tls.mkdir(exist_ok=True)
        if not (tls / "cert.pem").exists():
            cert = ca.issue_cert("localhost", "127.0.0.1")
            cert.cert_chain_pems[0].write_to_path(str(tls / "cert.pem"))
            cert.private_key_pem.write_to_path(str(tls / "key.pem"))
        cfg: dict[str, Any] = {
            # [server] workers: cmcd's default (one per CPU) unless CMCD_TEST_WORKERS says otherwise
            "server": {"hostname": "mx.cmcd.test", "shutdown_grace": "5s"}
            | ({"workers": int(TEST_WORKERS)} if TEST_WORKERS else {}),
            "smtp": {
                "listen": ["127.0.0.1:0"],
                "listen_tls": ["127.0.0.1:0"],
                "tls_cert": str(tls / "cert.pem"),
                "tls_key": str(tls / "key.pem"),
            },
            "spool": {"dir": str(root / "spool")},
            "store": {"path": str(root / "cmcd.db"), "key_file": str(root / "data.key")},
            "admin": {"socket": str(root / "admin.sock")},
            "metrics": {"listen": ""},  # tests that scrape set a port of their own
            # intake tests see the queue as intake left it: delivery off, and even so nothing could
            # leave loopback (every domain routed to a closed port, DNS only on loopback). Delivery
            # tests turn it on and route to sinks and a DNS server on loopback.
            "dns": {"nameservers": ["127.0.0.1:9"], "timeout": "2s"},
            "delivery": {"enabled": False, "routes": {"*": "127.0.0.1:9"}},
        }
        for section, values in (overrides or {}).items():
            cfg.setdefault(section, {}).update(values)
        self.config = cfg
        self.config_path = root / "cmcd.toml"
        self.write_config()
        self.proc: subprocess.Popen[str] | None = None
        self.log: list[str] = []
        self._ready = threading.Event()
        self.smtp_port = self.smtps_port = self.api_port = 0

    # -- process ---------------------------------------------------------------------------

    def write_config(self) -> None:
        self.config_path.write_text(to_toml(self.config))

    def start(self, timeout: float = 20, *, nofile: int | None = None) -> Cmcd:
        """Start the daemon and wait for its ready line; NOFILE: its RLIMIT_NOFILE (soft and hard)."""
        ready = self._ready = threading.Event()  # a new event: a previous process's reader cannot set it

        def limit_descriptors() -> None:  # in the child, before exec
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cmcd.daemon", "serve", "--config", str(self.config_path)],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=self.root,
            preexec_fn=limit_descriptors if nofile is not None else None,
        )
        threading.Thread(target=self._drain, args=(self.proc, ready), daemon=True).start()
        if not ready.wait(timeout) or self.proc.poll() is not None:
            self.proc.kill()
            raise RuntimeError("cmcd did not become ready:\n" + "\n".join(self.log[-30:]))
        return self

    def _drain(self, proc: subprocess.Popen[str], ready: threading.Event) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.log.append(line.rstrip("\n"))
            if "event=ready" in line:
                self.smtp_port = int(re.search(r" smtp=\S+:(\d+)", line).group(1))  # type: ignore[union-attr]
                self.smtps_port = int(re.search(r" smtps=\S+:(\d+)", line).group(1))  # type: ignore[union-attr]
                api = re.search(r" api=\S+:(\d+)", line)
                self.api_port = int(api.group(1)) if api else 0
                ready.set()
        proc.stderr.close()
        ready.set()  # the process ended: start() stops waiting and reports it

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # never leave a hung daemon behind; the test still fails
            self.proc.wait()
            raise

    def kill9(self) -> None:
        """SIGKILL the daemon (the supervisor, with workers); returns once its workers are gone too
        (the kernel kills them when their parent dies, a moment later: until then one may still
        commit a transaction the test would not expect after the kill)."""
        assert self.proc is not None
        children = _children(self.proc.pid)
        self.proc.kill()
        self.proc.wait()
        wait_until(lambda: not any(_running(pid) for pid in children), "the workers gone after the kill -9", 10)

    # -- administration --------------------------------------------------------------------

    def admin(self, verb: str, **args: Any) -> Any:
        """One admin-socket request (cmcd.admin.client, as cmcctl sends it); AdminError on refusal."""
        try:
            return AdminClient(self.root / "admin.sock", timeout_s=30).call(verb, **args)
        except RequestRefused as exc:
            raise AdminError(str(exc)) from None

    def provision(self) -> Cmcd:
        """Tenants acme (acme.test, alice) and beta (beta.test, bob), both with PASSWORD."""
        for tenant, domain, login in (("acme", "acme.test", "alice"), ("beta", "beta.test", "bob")):
            self.admin("tenant.add", name=tenant)
            self.admin("domain.add", tenant=tenant, domain=domain)
            self.admin("user.add", tenant=tenant, login=login, role="sender", password=PASSWORD)
        return self

    # -- clients ---------------------------------------------------------------------------

    def http(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        """One HTTPS request to the API (urllib, certificate checked against the test CA):
        (status, headers, the JSON body decoded, or the text when it is not JSON)."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(f"https://127.0.0.1:{self.api_port}{path}", data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, context=self.client_context(), timeout=60) as resp:
                status, got, payload = resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            status, got, payload = exc.code, dict(exc.headers), exc.read()
        try:
            return status, got, json.loads(payload) if payload else None
        except ValueError:
            return status, got, payload.decode()

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx

    def smtp(self, *, starttls: bool = True, login: str | None = "alice", password: str = PASSWORD) -> smtplib.SMTP:
        """A connected, EHLO'd (and by default STARTTLS'd and authenticated) smtplib client."""
        client = smtplib.SMTP("127.0.0.1", self.smtp_port, local_hostname="client.test", timeout=30)
        client.ehlo()
        if starttls:
            client.starttls(context=self.client_context())
            client.ehlo()
            if login:
                client.login(login, password)
        return client

    def smtps(self, *, login: str | None = "alice", password: str = PASSWORD) -> smtplib.SMTP_SSL:
        client = smtplib.SMTP_SSL(
            "127.0.0.1", self.smtps_port, local_hostname="client.test", timeout=30, context=self.client_context()
        )
        client.ehlo()
        if login:
            client.login(login, password)
        return client

    # -- inspection ------------------------------------------------------------------------

    def keys(self) -> crypto.DataKeys:
        return crypto.read_key_file(self.root / "data.key")

    def shards(self) -> list[Path]:
        """Every spool shard file (queue.db, and queue-K.db for worker K > 0)."""
        return sorted(Path(self.config["spool"]["dir"]).glob("queue*.db"))

    def shard_file(self, queue_id: str) -> Path:
        """The spool shard file that holds QUEUE_ID (its id names the shard)."""
        shard = shard_of(queue_id)
        assert shard is not None, queue_id
        return Path(self.config["spool"]["dir"]) / ("queue.db" if shard == 0 else f"queue-{shard}.db")

    def spooled(self) -> dict[str, dict[str, Any]]:
        """queue id -> {raw, body, sender, recipients}, read from the spool database; body is raw
        without the DKIM-Signature fields cmcd put in front (intake tests compare the rest)."""
        keys = self.keys()
        out: dict[str, dict[str, Any]] = {}
        for shard in self.shards():  # every worker's shard
            conn = sqlite3.connect(f"file:{shard}?mode=ro", uri=True)
            try:
                for qid, sender, body in conn.execute("SELECT queue_id, sender_enc, body FROM messages"):
                    raw = keys.decrypt_bytes(bytes(body), qid.encode())
                    out[qid] = {
                        "raw": raw,
                        "body": strip_signatures(raw),
                        "sender": keys.decrypt(sender),
                        "recipients": [],
                    }
                for qid, rcpt, state in conn.execute("SELECT queue_id, rcpt_enc, state FROM recipients ORDER BY id"):
                    out[qid]["recipients"].append((keys.decrypt(rcpt), state))
            finally:
                conn.close()
        return out

    def mail_log(self, queue_id: str | None = None) -> list[dict[str, Any]]:
        """Mail-log rows (oldest first), addresses and replies decrypted, read from the store file."""
        keys = self.keys()
        conn = sqlite3.connect(f"file:{self.root / 'cmcd.db'}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        try:
            sql = "SELECT * FROM mail_log" + (" WHERE queue_id = ?" if queue_id else "") + " ORDER BY id"
            rows = [dict(r) for r in conn.execute(sql, (queue_id,) if queue_id else ())]
        finally:
            conn.close()
        for r in rows:
            r["sender"] = keys.decrypt(r.pop("sender_enc"))
            r["rcpt"] = keys.decrypt(r.pop("rcpt_enc"))
            r["response"] = keys.open_text(r.pop("response_enc"))  # the plaintext column stays empty
        return rows

    def ops_log(self) -> list[dict[str, Any]]:
        """Operation-log rows, oldest first."""
        return self._rows("ops_log")

    def login_log(self) -> list[dict[str, Any]]:
        """Login-log rows, oldest first."""
        return self._rows("login_log")

    def _rows(self, table: str) -> list[dict[str, Any]]:
        conn = sqlite3.connect(f"file:{self.root / 'cmcd.db'}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY id")]
        finally:
            conn.close()

    def wait_mail_log(
        self, done: Callable[[list[dict[str, Any]]], bool], queue_id: str | None = None, timeout: float = 20
    ) -> list[dict[str, Any]]:
        """Poll the mail log until DONE(rows) holds; fail with the rows seen."""
        deadline = time.monotonic() + timeout
        rows: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            rows = self.mail_log(queue_id)
            if done(rows):
                return rows
            time.sleep(0.1)
        summary = [(r["queue_id"], r["event"], r["rcpt"], r["response"]) for r in rows]
        raise AssertionError(f"mail log never reached the expected state: {summary}\n" + "\n".join(self.log[-20:]))

    def wait_log(self, pattern: str, timeout: float = 10) -> str:
        """The newest log line matching PATTERN, waiting for one to appear."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in reversed(list(self.log)):
                if rx.search(line):
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no log line matching {pattern!r}; last lines:\n" + "\n".join(self.log[-20:]))


_SIGNATURE = re.compile(rb"\ADKIM-Signature:[^\r]*\r\n(?:[ \t][^\r]*\r\n)*")


def strip_signatures(raw: bytes) -> bytes:
    """RAW without the DKIM-Signature fields at its start."""
    while True:
        m = _SIGNATURE.match(raw)
        if m is None:
            return raw
        raw = raw[m.end() :]


def _children(pid: int) -> list[int]:
    """The child processes of PID (Linux /proc)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _running(pid: int) -> bool:
    """Whether PID is a live process (a zombie is dead: it runs nothing and commits nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_until(done: Callable[[], Any], what: str, timeout: float = 10) -> Any:
    """Poll DONE() until it returns something truthy (returned); fail naming WHAT after TIMEOUT seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = done()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened within {timeout}s: {what}")
        time.sleep(0.02)


def message(
    sender: str = "alice@acme.test", to: str = "rcpt@dst.test", subject: str = "hello", body: str = "hi"
) -> bytes:
    return (
        f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: text/plain\r\n\r\n{body}\r\n"
    ).encode()


def queue_id(reply: tuple[int, bytes] | bytes) -> str:
    text = reply[1] if isinstance(reply, tuple) else reply
    m = re.search(rb"queued as ([0-9A-Z]+)", text)
    assert m, text
    return m.group(1).decode()


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def make_cmcd(tmp_path: Path, ca: trustme.CA) -> Iterator[Any]:
    """Factory: make_cmcd(overrides) -> a started, provisioned daemon, stopped after the test."""
    started: list[Cmcd] = []

    def factory(overrides: dict[str, Any] | None = None, *, provision: bool = True, name: str = "cmcd") -> Cmcd:
        d = Cmcd(tmp_path / f"{name}{len(started)}", ca, overrides)
        d.start()
        started.append(d)
        return d.provision() if provision else d

    yield factory
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()


@pytest.fixture(scope="module")
def cmcd(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> Iterator[Cmcd]:
    """A provisioned daemon shared by a test module, with default limits."""
    d = Cmcd(tmp_path_factory.mktemp("cmcd"), ca)
    d.start().provision()
    yield d
    d.stop()
