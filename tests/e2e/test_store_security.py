"""Data at rest: no envelope address in clear in any file the daemon writes, and the data key's start-up checks."""

from __future__ import annotations

import smtplib
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cmcd import crypto
from tests.conftest import Cmcd, message, queue_id

# Bodies are encrypted in the spool too: the body's addresses are checked like the envelope's.
RCPT_NEEDLES = ["needle-rcpt-7731@dst.test", "Needle-Rcpt-8842@Other.test"]
SENDER_NEEDLE = "needle.sender@acme.test"
LOGIN_NEEDLE = "needle-login-5519"
PASSWORD_NEEDLE = "needle-password-0429"


def _ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _wait(cond, what: str, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _mail_log_rows(d: Cmcd, rcpt: str) -> list[tuple[bytes, bytes]]:
    conn = _ro(d.root / "cmcd.db")
    try:
        rows = conn.execute("SELECT sender_enc, rcpt_enc FROM mail_log WHERE rcpt_hmac = ?", (d.keys().index(rcpt),))
        return [(bytes(s), bytes(r)) for s, r in rows]
    finally:
        conn.close()


def _login_failures(d: Cmcd, login: str) -> int:
    conn = _ro(d.root / "cmcd.db")
    try:
        return conn.execute("SELECT COUNT(*) FROM login_log WHERE login = ? AND result = 'fail'", (login,)).fetchone()[
            0
        ]
    finally:
        conn.close()


def _needles() -> list[bytes]:
    """Each address whole and by local part, as stored or lower-cased, plus the failed AUTH's password."""
    out: list[bytes] = []
    for address in [*RCPT_NEEDLES, SENDER_NEEDLE]:
        local = address.partition("@")[0]
        out += [address.encode(), address.lower().encode(), local.encode(), local.lower().encode()]
    return out + [PASSWORD_NEEDLE.encode()]


def _files_containing(root: Path, needle: bytes) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes())


def _scan(root: Path) -> dict[str, list[str]]:
    """Every regular file under ROOT (databases, WAL and shared-memory files, spool files) -> needles found."""
    found: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes().lower()
        hits = [n.decode() for n in _needles() if n.lower() in data]
        if hits:
            found[str(path.relative_to(root))] = hits
    return found


def test_envelope_addresses_and_failed_passwords_are_not_stored_in_clear(make_cmcd) -> None:
    d: Cmcd = make_cmcd()
    with d.smtp(login=None) as c:
        c.user, c.password = LOGIN_NEEDLE, PASSWORD_NEEDLE
        with pytest.raises(smtplib.SMTPAuthenticationError):
            c.auth("PLAIN", c.auth_plain)
    qids = []
    with d.smtp() as c:
        for rcpt in RCPT_NEEDLES:
            assert c.mail(SENDER_NEEDLE)[0] == 250
            assert c.rcpt(rcpt)[0] == 250
            assert c.rcpt("plain@dst.test")[0] == 250
            qids.append(queue_id(c.data(message(sender="alice@acme.test", to="undisclosed@dst.test"))))

    # The records were written (encrypted), so finding nothing below means something.
    _wait(lambda: all(_mail_log_rows(d, r) for r in RCPT_NEEDLES), "mail log rows of both recipients")
    _wait(lambda: _login_failures(d, LOGIN_NEEDLE) == 1, "the failed login in the login log")
    keys = d.keys()
    for rcpt in RCPT_NEEDLES:
        sender_enc, rcpt_enc = _mail_log_rows(d, rcpt)[0]
        assert (keys.decrypt(sender_enc), keys.decrypt(rcpt_enc)) == (SENDER_NEEDLE, rcpt)
    spooled = d.spooled()
    for qid, rcpt in zip(qids, RCPT_NEEDLES, strict=True):
        assert spooled[qid]["sender"] == SENDER_NEEDLE
        assert spooled[qid]["recipients"] == [(rcpt, "queued"), ("plain@dst.test", "queued")]

    files = {p.name for p in d.root.rglob("*") if p.is_file()}
    assert {"cmcd.db", "queue.db", *(d.shard_file(q).name for q in qids)} <= files  # the shards that hold them
    # Positive control: the scan does see what is stored in clear by design (the login name).
    assert _files_containing(d.root, LOGIN_NEEDLE.encode()), "the login name should be found in the login log"
    # The body (with its To: and Subject:) is encrypted in the spool like the envelope.
    assert b"To: <undisclosed@dst.test>\r\n" in spooled[qids[0]]["body"]
    assert not _files_containing(d.root, b"undisclosed@dst.test"), "a body address in clear in the spool"
    assert _scan(d.root) == {}, "addresses in clear while running (WAL files included)"
    logged = "\n".join(d.log).lower()
    assert [n.decode() for n in _needles() if n.lower().decode() in logged] == [], "addresses in the daemon's log"

    assert d.stop() == 0
    assert _scan(d.root) == {}, "addresses in clear after a clean stop"


# -- the data key at start-up --------------------------------------------------------------------


def _serve(d: Cmcd) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-m", "cmcd.daemon", "serve", "--config", str(d.config_path)],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=d.root,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("cmcd serve started although its data key is unusable")


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory, ca) -> Iterator[tuple[Cmcd, str]]:  # type: ignore[no-untyped-def]
    """A store and spool holding one queued message, its daemon stopped; each test puts the key back."""
    d = Cmcd(tmp_path_factory.mktemp("keys"), ca)
    d.start().provision()
    with d.smtp() as c:
        c.mail("alice@acme.test")
        c.rcpt("rcpt@dst.test")
        qid = queue_id(c.data(message()))
    assert d.stop() == 0
    yield d, qid
    if d.proc is not None and d.proc.poll() is None:
        d.stop()


def _unsafe_mode(key: Path, mode: int) -> None:
    key.chmod(mode)


def _other_key(key: Path) -> None:
    key.unlink()
    crypto.generate_key_file(key)


def _no_key(key: Path) -> None:
    key.unlink()


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (lambda k: _unsafe_mode(k, 0o644), ["{key}: key file is readable by group or others (mode 0644)", "chmod 600"]),
        (lambda k: _unsafe_mode(k, 0o640), ["{key}: key file is readable by group or others (mode 0640)"]),
        (_other_key, ["{db}: store.key_file is not the key this store was written with"]),
        (_no_key, ["{key}: key file missing"]),
    ],
    ids=["mode-0644", "mode-0640", "a-different-key", "missing-key"],
)
def test_an_unusable_key_stops_start_up_and_says_which_file_and_why(stopped, tamper, expected: list[str]) -> None:  # type: ignore[no-untyped-def]
    d, _ = stopped
    key = d.root / "data.key"
    original = key.read_bytes()
    tamper(key)
    try:
        out = _serve(d)
        assert out.returncode != 0
        for text in expected:
            assert text.format(key=key, db=d.root / "cmcd.db") in out.stderr, out.stderr
        assert "event=ready" not in out.stderr
        assert "Traceback" not in out.stderr
        if tamper is _no_key:
            assert not key.exists(), "an existing store must never get a new key"
    finally:
        if key.exists():
            key.unlink()
        key.write_bytes(original)
        key.chmod(0o600)


def test_the_original_key_still_opens_the_store_unchanged(stopped) -> None:  # type: ignore[no-untyped-def]
    """Runs after the failed start-ups above: none of them changed the store or the spool."""
    d, qid = stopped
    d.start()
    assert d.spooled()[qid]["recipients"] == [("rcpt@dst.test", "queued")]
    assert [t["name"] for t in d.admin("tenant.list")] == ["acme", "beta"]


def test_key_file_readable_by_others_stops_start_up_of_a_new_store(tmp_path: Path, ca) -> None:  # type: ignore[no-untyped-def]
    d = Cmcd(tmp_path / "fresh", ca)
    key = d.root / "data.key"
    crypto.generate_key_file(key)
    key.chmod(0o644)
    out = _serve(d)
    assert out.returncode != 0
    assert f"{key}: key file is readable by group or others (mode 0644)" in out.stderr
    assert not (d.root / "cmcd.db").exists()


def test_store_spool_and_key_files_are_private(make_cmcd) -> None:  # type: ignore[no-untyped-def]
    d = make_cmcd()
    with d.smtp() as c:
        c.sendmail("alice@acme.test", ["private@dst.test"], b"From: alice@acme.test\r\n\r\nx\r\n")
    d.stop()
    spool_dir = Path(d.config["spool"]["dir"])
    assert spool_dir / "queue.db" in d.shards()
    paths = [d.root / "cmcd.db", d.root / "data.key", spool_dir, *d.shards()]  # every worker's shard
    for p in paths:
        assert p.stat().st_mode & 0o077 == 0, f"{p} is {oct(p.stat().st_mode)}"
