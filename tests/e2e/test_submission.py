"""Submission over real sockets: TLS, AUTH, sender rules, limits, IP credentials, with smtplib and swaks."""

from __future__ import annotations

import smtplib
import subprocess

import pytest

from tests.conftest import PASSWORD, Cmcd, message, need, queue_id


def test_starttls_auth_plain_queues_the_message(cmcd: Cmcd) -> None:
    with cmcd.smtp() as c:
        refused = c.sendmail("alice@acme.test", ["rcpt@dst.test", "two@other.test"], message())
        assert refused == {}
        code, text = c.noop()
        assert code == 250
    spooled = cmcd.spooled()
    ours = [m for m in spooled.values() if m["sender"] == "alice@acme.test"]
    assert ours, "nothing spooled"
    assert ours[-1]["recipients"] == [("rcpt@dst.test", "queued"), ("two@other.test", "queued")]


def test_reply_carries_queue_id_that_is_in_the_spool(cmcd: Cmcd) -> None:
    with cmcd.smtp() as c:
        c.mail("alice@acme.test")
        c.rcpt("rcpt@dst.test")
        reply = c.data(message(subject="with id"))
    assert reply[0] == 250
    qid = queue_id(reply)
    body = cmcd.spooled()[qid]["body"]
    assert b"Subject: with id\r\n" in body
    assert body.startswith(b"Received: from client.test ([127.0.0.1])")
    assert b"(authenticated as alice via PLAIN)" in body
    assert b"with ESMTPSA id " + qid.encode() in body
    assert b"TLSv1." in body and PASSWORD.encode() not in body
    assert f"Message-ID: <{qid}@mx.cmcd.test>".encode() in body
    assert b"\r\nDate: " in body


def test_existing_message_id_and_date_are_kept(cmcd: Cmcd) -> None:
    raw = b"From: alice@acme.test\r\nMessage-ID: <mine@acme.test>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nx\r\n"
    with cmcd.smtp() as c:
        c.mail("alice@acme.test")
        c.rcpt("rcpt@dst.test")
        qid = queue_id(c.data(raw))
    body = cmcd.spooled()[qid]["body"]
    assert body.endswith(raw)
    assert body.count(b"Message-ID") == 1 and body.count(b"\r\nDate:") == 1


def test_implicit_tls_with_auth_login(cmcd: Cmcd) -> None:
    with cmcd.smtps(login=None) as c:
        c.user, c.password = "alice", PASSWORD
        code, _ = c.auth("LOGIN", c.auth_login, initial_response_ok=False)
        assert code == 235
        qid = queue_id(_send(c))
    assert qid in cmcd.spooled()


def _send(c: smtplib.SMTP, sender: str = "alice@acme.test", rcpt: str = "rcpt@dst.test") -> tuple[int, bytes]:
    c.mail(sender)
    c.rcpt(rcpt)
    return c.data(message(sender=sender))


def test_ehlo_advertises_extensions_and_auth_only_after_tls(cmcd: Cmcd) -> None:
    with cmcd.smtp(starttls=False) as c:
        features = c.esmtp_features
        for ext in ("size", "8bitmime", "pipelining", "enhancedstatuscodes", "starttls"):
            assert ext in features, ext
        assert "auth" not in features
        code, text = c.docmd("AUTH", "PLAIN " + "AGFsaWNlAGNvcnJlY3QgaG9yc2UgYmF0dGVyeQ==")
        assert code == 538 and text.startswith(b"5.7.11")
        code, text = c.docmd("MAIL", "FROM:<alice@acme.test>")
        assert code == 530 and text.startswith(b"5.7.0")
        c.starttls(context=cmcd.client_context())
        c.ehlo()
        assert c.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        assert "starttls" not in c.esmtp_features


@pytest.mark.parametrize(
    ("login", "password"),
    [("alice", "wrong"), ("nobody", PASSWORD), ("bob", "wrong")],
    ids=["wrong-password", "unknown-login", "other-tenant-wrong-password"],
)
def test_bad_credentials_are_refused_and_logged(cmcd: Cmcd, login: str, password: str) -> None:
    with cmcd.smtp(login=None) as c:
        with pytest.raises(smtplib.SMTPAuthenticationError) as err:
            c.login(login, password)
        assert err.value.smtp_code == 535 and err.value.smtp_error.startswith(b"5.7.8")
    import sqlite3

    def failures() -> int:
        conn = sqlite3.connect(f"file:{cmcd.root / 'cmcd.db'}?mode=ro", uri=True)
        try:
            return conn.execute(
                "SELECT COUNT(*) FROM login_log WHERE login = ? AND result = 'fail'", (login,)
            ).fetchone()[0]
        finally:
            conn.close()

    _wait(lambda: failures() >= 1)


def _wait(cond: object, timeout: float = 10) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_disabled_user_cannot_log_in(cmcd: Cmcd) -> None:
    cmcd.admin("user.add", tenant="acme", login="carol", role="sender", password=PASSWORD)
    with cmcd.smtp(login="carol"):
        pass
    cmcd.admin("user.disable", tenant="acme", login="carol")
    with cmcd.smtp(login=None) as c:
        with pytest.raises(smtplib.SMTPAuthenticationError):
            c.login("carol", PASSWORD)
    cmcd.admin("user.enable", tenant="acme", login="carol")
    with cmcd.smtp(login="carol") as c:
        assert _send(c)[0] == 250


def test_envelope_sender_of_another_tenant_is_refused(cmcd: Cmcd) -> None:
    with cmcd.smtp() as c:
        code, text = c.mail("bob@beta.test")
        assert (code, text[:5]) == (553, b"5.7.1")
        code, text = c.mail("alice@unknown.test")
        assert code == 553


def test_from_header_of_another_tenant_is_refused(cmcd: Cmcd) -> None:
    with cmcd.smtp() as c:
        c.mail("alice@acme.test")
        c.rcpt("rcpt@dst.test")
        code, text = c.data(message(sender="bob@beta.test"))
        assert (code, text[:5]) == (550, b"5.7.1")
        c.rset()
        c.mail("alice@acme.test")
        c.rcpt("rcpt@dst.test")
        code, text = c.data(b"To: x@dst.test\r\nSubject: no from\r\n\r\nx\r\n")
        assert (code, text[:5]) == (550, b"5.7.1")


def test_null_sender_is_refused(cmcd: Cmcd) -> None:
    with cmcd.smtp() as c:
        code, text = c.docmd("MAIL", "FROM:<>")
        assert (code, text[:5]) == (550, b"5.7.1")


@pytest.mark.parametrize(
    "address",
    ["<a\rb@dst.test>", "<a\x00b@dst.test>", "<nodomain>", "<a@b@c>"],
    ids=["cr", "nul", "no-domain", "two-ats"],
)
def test_bad_recipient_addresses_get_501_5_1_3(cmcd: Cmcd, address: str) -> None:
    with cmcd.smtp() as c:
        assert c.mail("alice@acme.test")[0] == 250
        c.send(f"RCPT TO:{address}\r\n".encode())
        code, text = c.getreply()
        assert (code, text[:5]) == (501, b"5.1.3"), text


def test_non_ascii_recipient_without_smtputf8_gets_553_5_6_7(cmcd: Cmcd) -> None:
    """RFC 6531 §3.5: the transaction did not ask for SMTPUTF8 (tests/e2e/test_smtputf8.py has the rest)."""
    with cmcd.smtp() as c:
        assert c.mail("alice@acme.test")[0] == 250
        c.send("RCPT TO:<ü@dst.test>\r\n".encode())
        code, text = c.getreply()
        assert (code, text[:5]) == (553, b"5.6.7"), text


def test_command_line_over_512_bytes(cmcd: Cmcd) -> None:
    with cmcd.smtp() as c:
        code, text = c.docmd("NOOP", "x" * 600)
        assert code == 500 and text.startswith(b"5.5.2")
        assert c.noop()[0] == 250


def test_declared_size_over_limit_is_refused_at_mail(make_cmcd) -> None:
    d = make_cmcd({"smtp": {"max_message_size": "10KB"}})
    with d.smtp() as c:
        assert c.esmtp_features["size"] == str(10 * 1024)
        code, text = c.docmd("MAIL", "FROM:<alice@acme.test> SIZE=20000")
        assert (code, text[:5]) == (552, b"5.3.4")
        c.mail("alice@acme.test")
        c.rcpt("rcpt@dst.test")
        code, text = c.data(message(body="y" * 30_000))
        assert (code, text[:5]) == (552, b"5.3.4")
        assert c.noop()[0] == 250  # the session goes on
        assert _send(c)[0] == 250
    assert len(d.spooled()) == 1


def test_recipient_limit(make_cmcd) -> None:
    d = make_cmcd({"smtp": {"max_recipients": 3}})
    with d.smtp() as c:
        c.mail("alice@acme.test")
        for i in range(3):
            assert c.rcpt(f"r{i}@dst.test")[0] == 250
        code, text = c.rcpt("r3@dst.test")
        assert (code, text[:5]) == (452, b"4.5.3")
        assert c.data(message())[0] == 250
    (msg,) = d.spooled().values()
    assert len(msg["recipients"]) == 3


def test_rate_limit_and_daily_quota(make_cmcd) -> None:
    # one process: the clock of a per-second rate is the subject, and each worker enforces its share
    # of it (tests/e2e/test_workers.py holds the host's quota across workers)
    d = make_cmcd({"server": {"workers": 1}, "smtp": {"messages_per_second": 1.0, "messages_per_day": 3}})
    with d.smtp() as c:
        assert _send(c)[0] == 250
        code, text = c.mail("alice@acme.test")
        assert (code, text[:5]) == (451, b"4.7.1") and b"1 messages per second" in text
    d.stop()
    # the daily count survives a restart: it is committed with the messages
    d.start()
    with d.smtp() as c:
        import time

        for _ in range(2):
            time.sleep(1.05)  # the clock is the subject: 1 message per second is allowed
            assert _send(c)[0] == 250
        time.sleep(1.05)  # the clock is the subject: past the per-second limit, so only the daily quota refuses
        code, text = c.mail("alice@acme.test")
        assert (code, text[:5]) == (550, b"5.7.1") and b"quota of 3 messages" in text


def test_ip_credential_allows_plain_submission_and_is_refused_elsewhere(make_cmcd) -> None:
    d = make_cmcd()
    with d.smtp(starttls=False) as c:
        assert c.mail("alice@acme.test")[0] == 530
    d.admin("ipcred.add", tenant="acme", login="alice", cidr="127.0.0.0/16")
    with d.smtp(starttls=False) as c:
        code, reply = _send(c)
        assert code == 250
        assert c.mail("bob@beta.test")[0] == 553  # still bound to its tenant's domains
    body = d.spooled()[queue_id(reply)]["body"]
    assert b"(authenticated as alice via IP)" in body and b"with ESMTP id" in body
    d.admin("ipcred.delete", tenant="acme", login="alice", cidr="127.0.0.0/16")
    d.admin("ipcred.add", tenant="acme", login="alice", cidr="10.0.0.0/16")
    with d.smtp(starttls=False) as c:
        assert c.mail("alice@acme.test")[0] == 530


def test_swaks_starttls_plain_and_login_and_implicit_tls(cmcd: Cmcd) -> None:
    swaks = need("swaks")
    base = [swaks, "--from", "alice@acme.test", "--to", "rcpt@dst.test", "--h-From", "alice@acme.test",
            "--auth-user", "alice", "--auth-password", PASSWORD, "--helo", "swaks.test"]  # fmt: skip
    runs = [
        ["--server", f"127.0.0.1:{cmcd.smtp_port}", "-tls", "--auth", "PLAIN"],
        ["--server", f"127.0.0.1:{cmcd.smtp_port}", "-tls", "--auth", "LOGIN"],
        ["--server", f"127.0.0.1:{cmcd.smtps_port}", "--tlsc", "--auth", "PLAIN"],
    ]
    for extra in runs:
        out = subprocess.run(base + extra, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        qid = queue_id(out.stdout.encode())
        assert b"helo swaks.test" not in cmcd.spooled()[qid]["body"].lower()
        assert cmcd.spooled()[qid]["body"].startswith(b"Received: from swaks.test")
