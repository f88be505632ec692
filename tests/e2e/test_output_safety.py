"""What cmcd prints for people (issue 21 items 4, 5, 8): CSV no spreadsheet runs, log lines no
client forges, no secrets or versions in what it says, the admin socket and metrics locked.

Values are planted the way an outsider would plant them: an unauthenticated SMTP client's AUTH
login name, a tenant's Message-ID header, a remote MX's reply text, a presented API token.
"""

from __future__ import annotations

import base64
import csv
import io
import os
import smtplib
import socket
import sqlite3
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from cmcd import crypto
from cmcd.textout import FORMULA_STARTS
from tests.conftest import PASSWORD, Cmcd, message
from tests.e2e.test_delivery import FAST, final
from tests.peers import Sink, free_port

CMCCTL = [sys.executable, "-m", "cmcd.admin.cli"]
HYPERLINK = '=HYPERLINK("http://x.test/?leak","click me")'
DDE = "=cmd|' /C calc'!A0"


def cmcctl(d: Cmcd, *args: str) -> str:
    proc = subprocess.run(
        [*CMCCTL, "--socket", str(d.root / "admin.sock"), *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def cells(text: str) -> list[list[str]]:
    """Every row of a CSV text, parsed by the csv module; there is at least a header."""
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert rows, text
    return rows


def assert_no_formula(text: str) -> list[list[str]]:
    rows = cells(text)
    bad = [c for row in rows for c in row if c.startswith(FORMULA_STARTS)]
    assert not bad, bad
    return rows


def wait_rows(d: Cmcd, before: int, n: int) -> list[dict[str, Any]]:
    """The login-log rows after the first BEFORE, once there are N (rows reach the store a moment later)."""
    deadline = time.monotonic() + 10
    while len(d.login_log()) < before + n and time.monotonic() < deadline:
        time.sleep(0.05)
    return d.login_log()[before:]


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def unauthenticated(d: Cmcd) -> smtplib.SMTP:
    """An SMTP client after STARTTLS, not signed in: what anyone on the network can be."""
    return d.smtp(login=None)


# -- item 4: formula injection ----------------------------------------------------------------


@pytest.fixture
def planted(make_cmcd: Any) -> Any:
    """A daemon whose logs hold formula text in every column an outsider can reach: AUTH login
    names (login log), Message-IDs (mail log), a remote reply text starting with @ and -, and a
    refused operator command (operation log)."""
    replies = {"at@dst.test": "550 @SUM(1+1)*cmd|' /C calc'!A0", "dash@dst.test": "550 -2+3+cmd|' /C calc'!A0"}
    with Sink("127.0.0.2", free_port("127.0.0.2"), rcpt_reply=replies.get) as sink:
        d = make_cmcd({"api": {"listen": "127.0.0.1:0"}, "delivery": FAST | {"routes": {"*": sink.address}}})
        with unauthenticated(d) as c:
            code, _ = c.docmd("AUTH", "PLAIN " + b64(f"\0{HYPERLINK}\0guess".encode()))
            assert code == 535
            code, _ = c.docmd("AUTH", "PLAIN " + b64(b"\0@SUM(1+1)\0guess"))
            assert code == 535
        with d.smtp() as c:
            for mid, rcpt in ((DDE, "ok@dst.test"), ("<" + DDE + "@x>", "at@dst.test"), ("+1+1", "dash@dst.test")):
                raw = message(to=rcpt).replace(b"Subject:", f"Message-ID: {mid}\r\nSubject:".encode())
                c.sendmail("alice@acme.test", [rcpt], raw)
        proc = subprocess.run(
            [*CMCCTL, "--socket", str(d.root / "admin.sock"), "tenant", "add", "--", "-2+3"],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 1  # refused, and the refusal is in the operation log
        d.wait_mail_log(lambda rows: final(rows, 3))
        d.admin("user.add", tenant="acme", login="acme-admin", role="admin", password="pw-acme-admin")
        yield d, d.admin("apikey.add", tenant="acme", login="acme-admin")["token"]


def test_cmcctl_csv_cells_never_start_a_formula(planted: Any) -> None:
    d, _ = planted
    logins = assert_no_formula(cmcctl(d, "log", "login", "--format", "csv"))
    login_col = logins[0].index("login")
    assert {"'" + HYPERLINK, "'@SUM(1+1)"} <= {r[login_col] for r in logins[1:]}  # neutralised, still readable

    mail = assert_no_formula(cmcctl(d, "log", "mail", "--format", "csv"))
    head = mail[0]
    assert "'" + DDE in {r[head.index("message_id")] for r in mail[1:]}
    assert "'+1+1" in {r[head.index("message_id")] for r in mail[1:]}
    responses = {r[head.index("response")] for r in mail[1:] if r[head.index("event")] == "bounced"}
    # a remote reply cell always starts with its code: the reply's own first character cannot start the cell
    assert responses == {"550 @SUM(1+1)*cmd|' /C calc'!A0", "550 -2+3+cmd|' /C calc'!A0"}, responses

    ops = assert_no_formula(cmcctl(d, "log", "ops", "--format", "csv"))
    assert any("'-2+3" in row for row in ops[1:]), ops


def test_api_csv_cells_never_start_a_formula(planted: Any) -> None:
    d, token = planted
    for path in ("/v1/deliveries", "/v1/bounces", "/v1/audit?log=ops", "/v1/audit?log=login"):
        sep = "&" if "?" in path else "?"
        status, headers, text = d.http("GET", f"{path}{sep}format=csv&limit=1000", token=token)
        assert status == 200 and headers["Content-Type"].startswith("text/csv"), (path, status, text)
        rows = assert_no_formula(text)
        if path == "/v1/deliveries":
            assert "'" + DDE in {r[rows[0].index("message_id")] for r in rows[1:]}


# -- item 5: forged log lines -----------------------------------------------------------------

FORGED = "\r\n2030-01-01T00:00:00+00:00  acme    alice  127.0.0.1  PLAIN  ok"


def test_login_names_with_control_characters_are_refused_and_never_logged(cmcd: Cmcd) -> None:
    d = cmcd
    before = len(d.login_log())
    with unauthenticated(d) as c:
        for login in ("alice" + FORGED, "alice\nx", "nul\x00x", "del\x7fx", "c1\x85x", "esc\x1b[2Jx", "tab\tx"):
            code, text = c.docmd("AUTH", "PLAIN " + b64(b"\0" + login.encode() + b"\0" + PASSWORD.encode()))
            assert (code, text[:5]) == (501, b"5.5.2"), (login, code, text)
        code, text = c.docmd("AUTH", "LOGIN " + b64(("alice" + FORGED).encode()))  # initial response
        assert (code, text[:5]) == (501, b"5.5.2"), text
        code, text = c.docmd("AUTH", "LOGIN")  # the name as the answer to "Username:"
        assert code == 334, text
        code, text = c.docmd(b64(b"alice\r\nforged"))
        assert (code, text[:5]) == (501, b"5.5.2"), text
        assert c.docmd("AUTH", "PLAIN " + b64(f"\0alice\0{PASSWORD}".encode()))[0] == 235  # the session goes on
    rows = wait_rows(d, before, 1)
    assert [(r["login"], r["result"]) for r in rows] == [("alice", "ok")]  # nothing for the refused names
    table = cmcctl(d, "log", "login")
    assert "2030-01-01" not in table and "forged" not in table
    assert all(line.startswith("ts=") for line in d.log), [line for line in d.log if not line.startswith("ts=")]


def test_tables_show_control_characters_escaped(cmcd: Cmcd) -> None:
    """A row written before names were refused (or by any other way in) prints on one line."""
    conn = sqlite3.connect(str(cmcd.root / "cmcd.db"), timeout=30)
    with conn:
        conn.execute(
            "INSERT INTO login_log(ts, login, client_ip, mechanism, result, detail) VALUES (?,?,?,?,?,?)",
            (time.time(), "mallory" + FORGED + "\x00\x1b[31m\x85\u2028", "192.0.2.1", "PLAIN", "fail", "old row"),
        )
    conn.close()
    table = cmcctl(cmcd, "log", "login", "--status", "fail")
    lines = table.splitlines()
    mallory = [line for line in lines if "mallory" in line]
    assert len(mallory) == 1, table
    assert "mallory\\r\\n2030-01-01" in mallory[0] and "\\x00\\x1b[31m\\x85\\u2028" in mallory[0]
    assert not [line for line in lines if line.startswith("2030-01-01")]
    exported = cells(cmcctl(cmcd, "log", "login", "--status", "fail", "--format", "csv"))
    assert [r for r in exported if r[2].startswith("mallory")][0][2] == "mallory" + FORGED.replace(
        "\r\n", "\\r\\n"
    ) + "\\x00\\x1b[31m\\x85\\u2028"


# -- item 8: what the API says about itself and about bad tokens -------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, ca: Any) -> Any:
    d = Cmcd(tmp_path_factory.mktemp("api"), ca, {"api": {"listen": "127.0.0.1:0"}})
    d.start().provision()
    yield d
    d.stop()


def test_the_api_server_header_names_no_versions(api: Cmcd) -> None:
    for path in ("/v1/openapi.json", "/v1/deliveries", "/nowhere"):
        _, headers, _ = api.http("GET", path)
        assert headers["Server"] == "cmcd", (path, headers)
    # a malformed request line is answered by aiohttp itself, before any route
    with socket.create_connection(("127.0.0.1", api.api_port), timeout=10) as raw:
        with api.client_context().wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET / HTTP/1.1 junk junk\r\nHost: x\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                head += chunk
    assert head.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")), head
    server = [line for line in head.split(b"\r\n") if line.lower().startswith(b"server:")]
    assert server == [b"Server: cmcd"], head


def test_a_bad_token_leaves_no_fragment_in_any_log(api: Cmcd) -> None:
    secret = "Zq9XwV7tK2mR4nP8sL6yB3cD5fG1hJ0aE"
    real = api.admin("apikey.add", tenant="acme", login="alice")["token"]
    key_id = real.split("_")[1]
    presented = {
        "session": "cms_" + secret,
        "key": f"cmk_{key_id}_{secret}",  # a real key id with a wrong secret
        "other": secret + secret,
    }
    before = len(api.login_log())
    for token in presented.values():
        status, headers, _ = api.http("GET", "/v1/deliveries", token=token)
        assert status == 401 and headers["Server"] == "cmcd"
    rows = wait_rows(api, before, 3)
    assert [(r["login"], r["result"], r["detail"]) for r in rows] == [
        ("", "fail", "bad token"),
        (f"cmk_{key_id}", "fail", "bad token"),  # the key id is public: listed, and used to revoke
        ("", "fail", "bad token"),
    ]
    printed = cmcctl(api, "log", "login", "--format", "csv") + "\n".join(api.log)
    for fragment in (secret[:6], secret[-6:], "cms_Zq"):
        assert fragment not in printed


# -- item 8: the admin socket's mode ------------------------------------------------------------


def test_the_admin_socket_is_0660_as_soon_as_it_exists(make_cmcd: Any) -> None:
    d = make_cmcd(provision=False)
    st = os.stat(d.root / "admin.sock")
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660


# -- item 8: metrics behind basic auth and TLS --------------------------------------------------


def _scrape(
    port: int, ctx: ssl.SSLContext | None, auth: tuple[str, str] | None = None, path: str = "/metrics"
) -> tuple[int, dict[str, str], bytes]:
    scheme = "https" if ctx else "http"
    req = urllib.request.Request(f"{scheme}://localhost:{port}{path}")
    if auth:
        req.add_header("Authorization", "Basic " + b64(f"{auth[0]}:{auth[1]}".encode()))
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=20) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_metrics_behind_basic_auth_and_tls(make_cmcd: Any, ca: Any, tmp_path: Any) -> None:
    cert = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "metrics.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "metrics.key"))
    port = free_port()
    d = make_cmcd(
        {
            "metrics": {
                "listen": f"127.0.0.1:{port}",
                "tls_cert": str(tmp_path / "metrics.pem"),
                "tls_key": str(tmp_path / "metrics.key"),
                "basic_auth_users": {"prometheus": crypto.hash_password("scrape-secret")},
                "header_timeout": "1s",
            }
        },
        provision=False,
    )
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    status, headers, _ = _scrape(port, ctx)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic realm="), headers
    assert _scrape(port, ctx, ("prometheus", "wrong"))[0] == 401
    assert _scrape(port, ctx, ("nobody", "scrape-secret"))[0] == 401
    assert _scrape(port, ctx, ("prometheus", "scrape-secret"), path="/")[0] == 200
    for _ in range(3):  # the second scrape on is answered from the remembered credential
        status, _, body = _scrape(port, ctx, ("prometheus", "scrape-secret"))
        assert status == 200 and b"cmcd_" in body
    # a client that does not trust the test CA, and one speaking plain HTTP, get nothing
    with pytest.raises(urllib.error.URLError):
        _scrape(port, ssl.create_default_context(), ("prometheus", "scrape-secret"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = raw.recv(4096)
        except ConnectionResetError:
            answer = b""
        assert not answer.startswith(b"HTTP/1.1 200"), answer
    # a client that never starts its handshake is closed within header_timeout
    with socket.create_connection(("127.0.0.1", port), timeout=10) as idle:
        started = time.monotonic()
        try:
            assert idle.recv(4096) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < 5
    assert _scrape(port, ctx, ("prometheus", "scrape-secret"))[0] == 200
    assert d.proc is not None and d.proc.poll() is None
