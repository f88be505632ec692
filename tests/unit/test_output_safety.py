"""The one CSV writer, control-character escaping, and the small locks of issue 21 item 8, without a daemon."""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cmcd import crypto
from cmcd.admin import cli_base, metrics
from cmcd.admin import server as admin_server
from cmcd.api.server import _token_name
from cmcd.config import from_dict
from cmcd.daemon.cli import main
from cmcd.daemon.logs import LogfmtFormatter
from cmcd.errors import ConfigError
from cmcd.textout import FORMULA_STARTS, CsvWriter, csv_cell, escape_controls, has_controls

TLS: dict[str, Any] = {"smtp": {"listen": [], "listen_tls": []}}  # no SMTP listener: no certificate needed


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        pytest.param('=HYPERLINK("http://x","y")', '\'=HYPERLINK("http://x","y")', id="equals"),
        pytest.param("+1+1", "'+1+1", id="plus"),
        pytest.param("-2+3+cmd|' /C calc'!A0", "'-2+3+cmd|' /C calc'!A0", id="minus"),
        pytest.param("@SUM(1+1)", "'@SUM(1+1)", id="at"),
        pytest.param("\t=1", "'\\t=1", id="tab-escaped-too"),
        pytest.param("\r=1", "'\\r=1", id="cr-escaped-too"),
        pytest.param("a\r\nb", "a\\r\\nb", id="line-break-inside"),
        pytest.param("alice@acme.test", "alice@acme.test", id="address"),
        pytest.param("550 5.1.1 <x@y>", "550 5.1.1 <x@y>", id="reply-starts-with-its-code"),
        pytest.param("<=cmd|' /C calc'!A0@x>", "<=cmd|' /C calc'!A0@x>", id="bracketed-message-id"),
        pytest.param("", "", id="empty"),
        pytest.param(None, "", id="none"),
        pytest.param(-3, -3, id="negative-number-stays-a-number"),
        pytest.param(["=a", "b"], "'=a,b", id="list-joined-then-neutralised"),
    ],
)
def test_csv_cell(value: Any, cell: Any) -> None:
    assert csv_cell(value) == cell


def test_the_writer_round_trips_through_the_csv_module() -> None:
    buf = io.StringIO()
    w = CsvWriter(buf)
    w.writerow(["login", "response"])
    w.writerow(['=HYPERLINK("a","b")', "550 x, y"])
    w.writerow(["@x", None])
    rows = list(csv.reader(io.StringIO(buf.getvalue(), newline="")))
    assert rows == [["login", "response"], ['\'=HYPERLINK("a","b")', "550 x, y"], ["'@x", ""]]
    assert not [c for r in rows for c in r if c.startswith(FORMULA_STARTS)]
    assert buf.getvalue().count("\r\n") == 3


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        pytest.param("a\r\nb", "a\\r\\nb", id="crlf"),
        pytest.param("a\x00b\x7f", "a\\x00b\\x7f", id="nul-del"),
        pytest.param("\x1b[2J", "\\x1b[2J", id="terminal-escape"),
        pytest.param("c1\x85\x9b", "c1\\x85\\x9b", id="c1"),
        pytest.param("ls\u2028ps\u2029", "ls\\u2028ps\\u2029", id="unicode-separators"),
        pytest.param(b"x\xff".decode("utf-8", "surrogateescape"), "x\\udcff", id="undecodable-byte"),
        pytest.param("tab\t", "tab\\t", id="tab"),
        pytest.param("日本語 é", "日本語 é", id="printable-unchanged"),
    ],
)
def test_escape_controls(text: str, shown: str) -> None:
    assert escape_controls(text) == shown
    assert shown.isprintable()


@pytest.mark.parametrize(
    ("login", "refused"),
    [("alice", False), ("alice@acme.test", False), ("ünï", False), ("a\rb", True), ("a\nb", True),
     ("a\x00", True), ("a\x7f", True), ("a\x85", True), ("a\u2028", True), ("\t", True)],
)  # fmt: skip
def test_has_controls(login: str, refused: bool) -> None:
    assert has_controls(login) is refused


def test_a_log_line_cannot_be_forged() -> None:
    record = logging.LogRecord(
        "cmcd.submit", logging.WARNING, __file__, 1, "event=auth_failed login=%s client_ip=%s",
        ("x\r\nts=2030-01-01T00:00:00.000Z level=info logger=cmcd event=auth_ok login=admin", "192.0.2.1"), None,
    )  # fmt: skip
    line = LogfmtFormatter().format(record)
    assert "\n" not in line and "\r" not in line and line.count("ts=") == 2
    assert "login=x\\r\\nts=2030" in line


def test_cmcctl_table_cells_escape_control_characters(capsys: pytest.CaptureFixture[str]) -> None:
    cli_base.table({"LOGIN": "login", "RESULT": "result"}, [{"login": "a\r\nforged  ok", "result": "fail"}], "none")
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith("a\\r\\nforged  ok") and len(out.splitlines()) == 2
    n = cli_base.emit(iter([{"login": "=1+2", "result": "x\ny"}]), ("login", "result"), "csv")
    assert n == 1 and capsys.readouterr().out == "login,result\r\n'=1+2,x\\ny\r\n"


@pytest.mark.parametrize(
    ("token", "logged"),
    [
        pytest.param("cmk_abcdefghijkm_" + "S" * 43, "cmk_abcdefghijkm", id="api-key-id-only"),
        pytest.param("cmk_abcdefghijkm", "", id="api-key-without-secret"),
        pytest.param("cmk_ABCDEFGHIJKM_secret", "", id="not-a-key-id"),
        pytest.param("cmk_abc\r\ndefghi_secret", "", id="control-characters"),
        pytest.param("cms_" + "S" * 43, "", id="session-token"),
        pytest.param("S" * 60, "", id="anything-else"),
    ],
)
def test_a_failed_token_is_logged_by_its_public_key_id_at_most(token: str, logged: str) -> None:
    assert _token_name(token) == logged


# -- the admin socket ----------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077], ids=["umask-000", "umask-022", "umask-077"])
def test_the_admin_socket_is_never_wider_than_0660(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask: int) -> None:
    """What the file has the moment bind() returns (seen by the chmod that follows) is never
    wider than 0660, whatever the umask; after _bind it is exactly 0660."""
    path = tmp_path / "admin.sock"
    seen: list[int] = []
    real_chmod = os.chmod

    def watching_chmod(p: Any, mode: int, **kw: Any) -> None:
        seen.append(stat.S_IMODE(os.stat(p).st_mode))
        real_chmod(p, mode, **kw)

    monkeypatch.setattr(admin_server.os, "chmod", watching_chmod)
    old = os.umask(umask)
    try:
        sock = admin_server._bind(path)
    finally:
        os.umask(old)
    try:
        assert len(seen) == 1 and seen[0] & ~admin_server.SOCKET_MODE == 0, oct(seen[0])
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    finally:
        sock.close()


def test_a_socket_bound_without_fchmod_would_have_been_wider(tmp_path: Path) -> None:
    """The control: under umask 000 a plain bind() makes the file 0777 (what the fix prevents)."""
    old = os.umask(0)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(str(tmp_path / "plain.sock"))
            assert stat.S_IMODE(os.stat(tmp_path / "plain.sock").st_mode) == 0o777
    finally:
        os.umask(old)


# -- metrics access ---------------------------------------------------------------------------------


def test_metrics_access_settings_are_checked() -> None:
    ok = from_dict(TLS | {"metrics": {"basic_auth_users": {"prometheus": crypto.hash_password("pw")}}})
    assert set(ok.metrics.basic_auth_users) == {"prometheus"} and ok.metrics.tls_cert == ""
    with pytest.raises(ConfigError) as exc:
        from_dict(TLS | {"metrics": {"tls_cert": "cert.pem", "basic_auth_users": {"a:b": "plain-password"}}})
    text = str(exc.value)
    assert "metrics.tls_cert: expected metrics.tls_cert and metrics.tls_key together" in text
    assert 'metrics.basic_auth_users."a:b": expected a login without ":"' in text
    assert "scrypt hash" in text and "plain-password" not in text  # a mistaken password is not echoed


def _server(users: dict[str, str]) -> metrics.MetricsServer:
    cfg = from_dict(TLS | {"metrics": {"basic_auth_users": users}})
    server = metrics.MetricsServer.__new__(metrics.MetricsServer)
    server._users = dict(cfg.metrics.basic_auth_users)
    server._passed = set()
    server._cache_key = os.urandom(32)
    server._checking = asyncio.Lock()
    server._dummy_hash = ""
    return server


def _basic(login: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()


def test_basic_auth_checks_the_scrypt_hash_and_remembers_a_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    server = _server({"prometheus": crypto.hash_password("s3cret")})
    calls: list[str] = []
    real = server._check

    def counting(login: str, password: str) -> bool:
        calls.append(login)
        return real(login, password)

    monkeypatch.setattr(server, "_check", counting)

    async def run() -> list[bool]:
        return [
            await server._authorized(a)
            for a in ("", "Bearer x", "Basic !!!", _basic("prometheus", "wrong"), _basic("nobody", "s3cret"),
                      _basic("prometheus", "s3cret"), _basic("prometheus", "s3cret"))
        ]  # fmt: skip

    assert asyncio.run(run()) == [False, False, False, False, False, True, True]
    assert calls == ["prometheus", "nobody", "prometheus"]  # the second good scrape costs no scrypt


def test_hash_password_prints_a_hash_basic_auth_users_accepts() -> None:
    result = CliRunner().invoke(main, ["hash-password", "--password-stdin"], input="scrape-secret\n")
    assert result.exit_code == 0, result.output
    hashed = result.output.strip()
    assert crypto.verify_password("scrape-secret", hashed)
    from_dict(TLS | {"metrics": {"basic_auth_users": {"prometheus": hashed}}})
