"""`cmcd check-config` and `cmcd serve` on good and bad files, run as the operator would: a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

MINIMAL = """\
[server]
hostname = "mail.example.com"
timezone = "UTC"
[smtp]
listen = ["127.0.0.1:2587"]
listen_tls = ["127.0.0.1:2465"]
tls_cert = "var/tls/cert.pem"
tls_key = "var/tls/key.pem"
[spool]
dir = "var/spool"
[store]
path = "var/cmcd.db"
key_file = "var/data.key"
[admin]
socket = "var/admin.sock"
[metrics]
listen = "127.0.0.1:9465"
[dns]
nameservers = ["127.0.0.1:15354"]
[delivery]
port = 25
[delivery.routes]
"*" = "127.0.0.1:2526"
[backup]
dir = "var/backups"
key_file = "var/backup.key"
keep = 480
"""


def cmcd(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cmcd.daemon", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def write(tmp_path: Path, text: str, name: str = "cmcd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_good_file_prints_ok(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    out = cmcd("check-config", "--config", str(path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{path}: ok"
    assert out.stderr == ""
    assert not (tmp_path / "var").exists(), "check-config must not create anything"


def test_dev_config_in_the_repository_is_valid(tmp_path: Path) -> None:
    path = REPO / "etc" / "cmcd.dev.toml"
    out = cmcd("check-config", "--config", str(path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(": ok")


def test_typo_and_bad_values_are_all_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL.replace("[backup]\n", '[backup]\ninterval = "soon"\n').replace(
            "[smtp]\n", '[smtp]\nmax_mesage_size = "25MB"\nmax_recipients = "lots"\n'
        ),
    )
    out = cmcd("check-config", "--config", str(path), cwd=tmp_path)
    assert out.returncode != 0
    assert "ok" not in out.stdout
    lines = out.stderr.splitlines()
    assert any("smtp.max_mesage_size: unknown key" in line and "max_message_size" in line for line in lines), lines
    assert f"cmcd: {path}: smtp.max_recipients: expected an integer, got 'lots'" in lines
    assert f'cmcd: {path}: backup.interval: expected a duration like "90s" or "5d", got \'soon\'' in lines
    assert len(lines) == 3, lines


def test_size_word_gives_exact_message(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("[smtp]\n", '[smtp]\nmax_message_size = "lots"\n'))
    out = cmcd("check-config", "--config", str(path), cwd=tmp_path)
    assert out.returncode != 0
    assert out.stderr.splitlines() == [
        f"cmcd: {path}: smtp.max_message_size: expected a size like \"25MB\", got 'lots'"
    ]


# Each case is one file with several problems of one kind: whole-file checks (time zone, certificate,
# name servers) run once every key has parsed, so the two kinds are in separate files.
@pytest.mark.parametrize(
    ("edits", "expected"),
    [
        (
            [
                ('"*" = "127.0.0.1:2526"', '"*" = "nowhere"'),
                ("port = 25", 'port = "smtp"'),
                ("keep = 480", "keep = 480\ncolour = 1"),
            ],
            [
                "delivery.port: expected an integer, got 'smtp'",
                'delivery.routes."*": expected an address like "127.0.0.1:2587", got \'nowhere\'',
                "backup.colour: unknown key",
            ],
        ),
        (
            [
                ('timezone = "UTC"', 'timezone = "Mars/Olympus"'),
                ('nameservers = ["127.0.0.1:15354"]', 'nameservers = ["ns.test:53"]'),
                ('tls_cert = "var/tls/cert.pem"\n', ""),
            ],
            [
                "server.timezone: expected an IANA time zone like \"Asia/Tokyo\", got 'Mars/Olympus'",
                "smtp.tls_cert: expected a certificate path",
                "dns.nameservers[0]: expected an IP address with port, got 'ns.test:53'",
            ],
        ),
    ],
    ids=["keys-and-values", "whole-file-checks"],
)
def test_other_bad_files_name_each_key(tmp_path: Path, edits: list[tuple[str, str]], expected: list[str]) -> None:
    text = MINIMAL
    for old, new in edits:
        assert old in text
        text = text.replace(old, new)
    path = write(tmp_path, text)
    out = cmcd("check-config", "--config", str(path), cwd=tmp_path)
    assert out.returncode != 0
    lines = out.stderr.splitlines()
    assert len(lines) == len(expected), lines
    for want in expected:
        assert any(line.startswith(f"cmcd: {path}: {want}") for line in lines), (want, lines)


@pytest.mark.parametrize(
    "text",
    ["[smtp\nmax_recipients = 3\n", "[smtp]\nmax_recipients = 3\nmax_recipients = 4\n"],
    ids=["unclosed-table", "duplicate-key"],
)
def test_invalid_toml_is_a_clear_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    out = cmcd("check-config", "--config", str(path), cwd=tmp_path)
    assert out.returncode != 0
    assert "not valid TOML" in out.stderr
    assert "(at line " in out.stderr, "the TOML error says where"
    assert "Traceback" not in out.stderr


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    out = cmcd("check-config", "--config", str(path), cwd=tmp_path)
    assert out.returncode != 0
    assert "cannot read config file: No such file or directory" in out.stderr
    assert str(path) in out.stderr
    assert "Traceback" not in out.stderr


def test_file_level_errors_name_the_file_once(tmp_path: Path) -> None:
    """`cmcd: FILE: FILE: not valid TOML ...` repeats the path: config.load and daemon._load both prefix it
    (the same for a missing file)."""
    path = write(tmp_path, "[smtp\n")
    out = cmcd("check-config", "--config", str(path), cwd=tmp_path)
    assert out.returncode != 0
    assert out.stderr.count(str(path)) == 1, out.stderr


def test_serve_with_a_bad_config_exits_without_starting(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    text = MINIMAL.replace('"var/', f'"{root}/var/').replace("[smtp]\n", '[smtp]\nmax_recipients = "lots"\n')
    path = write(tmp_path, text.replace("127.0.0.1:2587", "127.0.0.1:0").replace("127.0.0.1:2465", "127.0.0.1:0"))
    try:
        out = subprocess.run(
            [sys.executable, "-m", "cmcd.daemon", "serve", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=20,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("cmcd serve kept running with a bad configuration")
    assert out.returncode != 0
    assert f"cmcd: {path}: smtp.max_recipients: expected an integer, got 'lots'" in out.stderr
    assert "event=ready" not in out.stderr
    assert "event=spool_recovered" not in out.stderr
    assert not (root / "var").exists(), "nothing (store, key, spool) may be created from a bad config"
