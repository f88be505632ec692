"""Sessions that end and credentials that stay in their lane (issue 21 items 6 and 7), through the
real API over TLS, real smtplib and the real cmcctl.

A session token ends with a password change, disable (and stays ended after enable), a role change,
a TOTP reset, the user's deletion, sign-out (DELETE /v1/sessions) and `cmcctl session revoke`.
Every failed login on POST /v1/sessions gets one answer, whatever was wrong, at about the same
cost. SMTP AUTH takes SMTP credentials only: a TOTP-enrolled user's password is refused (535
5.7.8), an API key of a sending role is the application's password (user name "apikey" or the
key's id), a revoked or viewer key is refused, and failed key logins count for the throttle.
"""

from __future__ import annotations

import base64
import itertools
import json
import smtplib
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.conftest import AdminError, Cmcd, message, queue_id, wait_until

pyotp = pytest.importorskip("pyotp")

CMCCTL = [sys.executable, "-m", "cmcd.admin.cli"]
_names = itertools.count(1)


@dataclass
class Admin:
    """A tenant admin of acme with TOTP confirmed: its password, authenticator and recovery codes."""

    login: str
    password: str
    otp: Any
    recovery: list[str] = field(default_factory=list)


def cmcctl(d: Cmcd, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CMCCTL, "--socket", str(d.root / "admin.sock"), *argv], capture_output=True, text=True, timeout=60
    )


def enrol(d: Cmcd, login: str) -> tuple[Any, list[str]]:
    otp = pyotp.TOTP(d.admin("user.otp-enroll", tenant="acme", login=login)["secret"])
    codes = d.admin("user.otp-confirm", tenant="acme", login=login, code=otp.at(time.time() - 30))["recovery_codes"]
    return otp, codes


def new_admin(d: Cmcd, *, totp: bool = True) -> Admin:
    login = f"boss{next(_names)}"
    password = f"{login} long secret"
    d.admin("user.add", tenant="acme", login=login, role="admin", password=password)
    if not totp:
        return Admin(login, password, None)
    otp, codes = enrol(d, login)
    return Admin(login, password, otp, codes)


def sign_in(d: Cmcd, a: Admin) -> str:
    """A new session for A (by a recovery code: each works once, so no wait for the next TOTP step)."""
    status, _, body = d.http("POST", "/v1/sessions", {"login": a.login, "password": a.password,
                                                      "recovery_code": a.recovery.pop()})  # fmt: skip
    assert status == 201, body
    assert body["token"].startswith("cms_")
    return str(body["token"])


def works(d: Cmcd, token: str) -> int:
    """The status of a request only an admin credential may make."""
    return d.http("GET", "/v1/users", token=token)[0]


def auth_plain(c: smtplib.SMTP, user: str, password: str) -> tuple[int, str]:
    """One AUTH PLAIN exchange (smtplib's login() would try LOGIN after a failed PLAIN: two attempts)."""
    blob = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    code, reply = c.docmd("AUTH", f"PLAIN {blob}")
    return code, reply.decode()


def wait_for(what: str, done: Any, timeout: float = 10) -> Any:
    return wait_until(done, what, timeout)


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory, ca: Any) -> Iterator[Cmcd]:
    """One daemon with the API on; no address throttle (many failed logins are made on purpose)."""
    daemon = Cmcd(tmp_path_factory.mktemp("sessions"), ca, {"api": {"listen": "127.0.0.1:0"},
                                                             "smtp": {"auth_fail_limit": 0}})  # fmt: skip
    daemon.start().provision()
    yield daemon
    daemon.stop()


# -- sessions end ---------------------------------------------------------------------------------


def test_a_password_change_ends_the_sessions(d: Cmcd) -> None:
    a = new_admin(d)
    token = sign_in(d, a)
    assert works(d, token) == 200
    d.admin("user.passwd", tenant="acme", login=a.login, password="a brand new secret")
    assert works(d, token) == 401
    a.password = "a brand new secret"
    assert works(d, sign_in(d, a)) == 200


def test_disable_ends_the_sessions_and_enable_does_not_bring_them_back(d: Cmcd) -> None:
    a = new_admin(d)
    token = sign_in(d, a)
    assert works(d, token) == 200
    assert cmcctl(d, "user", "disable", "acme", a.login).returncode == 0
    assert works(d, token) == 401
    assert cmcctl(d, "user", "enable", "acme", a.login).returncode == 0
    assert works(d, token) == 401
    assert works(d, sign_in(d, a)) == 200


def test_a_role_change_ends_the_sessions(d: Cmcd) -> None:
    a = new_admin(d)
    token, kept_key = sign_in(d, a), d.admin("apikey.add", tenant="acme", login=a.login, role="sender")["token"]
    admin_key = d.admin("apikey.add", tenant="acme", login=a.login)["token"]
    proc = cmcctl(d, "user", "set-role", "acme", a.login, "sender")
    assert proc.returncode == 0 and "now has role sender" in proc.stdout, proc.stderr
    assert works(d, token) == 401
    # a key the user may no longer hold (admin, made while an admin) stops working; a sender key goes on
    assert d.http("GET", "/v1/blocks", token=admin_key)[0] == 401
    assert d.http("GET", "/v1/users", token=kept_key)[0] == 403
    d.admin("user.set-role", tenant="acme", login=a.login, role="admin")  # back: the old session stays ended
    assert works(d, token) == 401
    assert works(d, admin_key) == 200
    ops = [(o["target"], o["result"]) for o in d.ops_log() if o["action"] == "user.set-role"]
    assert (f"acme/{a.login} role=sender", "ok") in ops
    with pytest.raises(AdminError, match="role 'root'"):
        d.admin("user.set-role", tenant="acme", login=a.login, role="root")
    assert works(d, admin_key) == 200  # a refused change ends nothing


def test_a_totp_reset_ends_the_sessions(d: Cmcd) -> None:
    a = new_admin(d)
    token = sign_in(d, a)
    assert cmcctl(d, "user", "otp-disable", "acme", a.login).returncode == 0
    assert works(d, token) == 401
    a.otp, a.recovery = enrol(d, a.login)  # re-enrolment: the old session stays ended, a new one works
    assert works(d, token) == 401
    assert works(d, sign_in(d, a)) == 200


def test_deleting_the_user_through_the_api_ends_its_sessions(d: Cmcd) -> None:
    doomed, other = new_admin(d), new_admin(d)
    token, admin = sign_in(d, doomed), sign_in(d, other)
    assert d.http("DELETE", f"/v1/users/{doomed.login}", token=admin)[0] == 204
    assert works(d, token) == 401
    assert works(d, admin) == 200


def test_deleting_the_user_through_cmcctl_ends_its_sessions(d: Cmcd) -> None:
    a = new_admin(d)
    token = sign_in(d, a)
    assert cmcctl(d, "user", "delete", "acme", a.login).returncode == 0
    assert works(d, token) == 401


def test_sign_out_ends_only_the_callers_session(d: Cmcd) -> None:
    a = new_admin(d)
    token, other = sign_in(d, a), sign_in(d, a)
    status, _, body = d.http("DELETE", "/v1/sessions", token=token)
    assert (status, body) == (204, None)
    assert works(d, token) == 401
    assert d.http("DELETE", "/v1/sessions", token=token)[0] == 401
    assert works(d, other) == 200
    key = d.admin("apikey.add", tenant="acme", login=a.login)["token"]
    status, _, problem = d.http("DELETE", "/v1/sessions", token=key)
    assert status == 400 and problem["type"] == "urn:cmcd:problem:not-a-session"
    assert works(d, key) == 200
    rows = wait_for("the sign-out in the operation log",
                    lambda: [o for o in d.ops_log() if o["action"] == "api.sessions.delete"])  # fmt: skip
    assert rows[-1]["result"] == "ok" and rows[-1]["actor"].startswith(f"api:{a.login} (session:")
    assert token not in json.dumps(d.ops_log())


def test_cmcctl_lists_and_revokes_a_users_sessions(d: Cmcd) -> None:
    a = new_admin(d)
    first, second = sign_in(d, a), sign_in(d, a)
    proc = cmcctl(d, "--json", "session", "list", "acme", a.login)
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)
    assert len(listed) == 2 and {"id", "created", "expires", "last_used"} <= set(listed[0])
    assert all(r["created"] <= r["last_used"] < r["expires"] for r in listed)
    human = cmcctl(d, "session", "list", "acme", a.login).stdout
    assert "LAST-USED" in human and listed[0]["id"] in human
    for token in (first, second):
        assert token not in proc.stdout and token[4:] not in human
    # revoke the first listed: exactly one of the two tokens stops working
    proc = cmcctl(d, "session", "revoke", "acme", a.login, listed[0]["id"])
    assert proc.returncode == 0 and "revoked 1 session(s)" in proc.stdout, proc.stderr
    assert sorted([works(d, first), works(d, second)]) == [200, 401]
    proc = cmcctl(d, "session", "revoke", "acme", a.login, listed[0]["id"])
    assert proc.returncode == 1 and "has no session" in proc.stderr
    assert cmcctl(d, "session", "revoke", "acme", a.login).returncode != 0  # an id or --all is needed
    proc = cmcctl(d, "session", "revoke", "acme", a.login, "--all")
    assert proc.returncode == 0 and "revoked 1 session(s)" in proc.stdout, proc.stderr
    assert works(d, first) == works(d, second) == 401
    assert json.loads(cmcctl(d, "--json", "session", "list", "acme", a.login).stdout) == []
    ops = [(o["action"], o["result"]) for o in d.ops_log() if o["target"].startswith(f"acme/{a.login}")]
    assert ops.count(("session.revoke", "ok")) == 2 and ("session.revoke", "refused") in ops


# -- one answer for every failed login ------------------------------------------------------------


def test_every_failed_login_gets_one_answer_at_about_the_same_cost(d: Cmcd) -> None:
    """Status and body the same for every reason; the time each reason takes within a factor of the
    others (medians of a few tries: scrypt runs on every path, a dummy hash for an unknown login)."""
    # a bad code counts towards the user's pause (10): each reason that reaches it has its own admin
    a, a2, a3, no_totp, off = new_admin(d), new_admin(d), new_admin(d), new_admin(d, totp=False), new_admin(d)
    d.admin("user.disable", tenant="acme", login=off.login)
    d.admin("user.add", tenant="acme", login="plain-sender", role="sender", password="plain sender secret")

    def bad_code(admin: Admin) -> str:
        good = {admin.otp.at(time.time() + k * 30) for k in (-1, 0, 1)}
        return next(c for c in ("000000", "111111", "222222", "333333") if c not in good)

    def good_code(admin: Admin) -> str:
        return str(admin.otp.at(time.time()))

    cases = {
        "unknown login": lambda: {"login": "nobody-here", "password": a.password, "otp": "123456"},
        "wrong password": lambda: {"login": a.login, "password": "not the password", "otp": good_code(a)},
        "wrong code": lambda: {"login": a.login, "password": a.password, "otp": bad_code(a)},
        "empty code": lambda: {"login": a2.login, "password": a2.password, "otp": ""},
        "bad recovery code": lambda: {"login": a3.login, "password": a3.password, "recovery_code": "aaaa-bbbb"},
        "not an admin": lambda: {"login": "plain-sender", "password": "plain sender secret", "otp": "123456"},
        "no TOTP enrolled": lambda: {"login": no_totp.login, "password": no_totp.password, "otp": "123456"},
        "disabled": lambda: {"login": off.login, "password": off.password, "otp": good_code(off)},
    }
    answers: dict[str, tuple[int, str, Any]] = {}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(5):
        for name, body in cases.items():
            started = time.perf_counter()
            status, headers, problem = d.http("POST", "/v1/sessions", body())
            times[name].append(time.perf_counter() - started)
            answers.setdefault(name, (status, headers["Content-Type"], problem))
            assert (status, headers["Content-Type"], problem) == answers[name], name
    first = answers["unknown login"]
    assert first[0] == 401 and first[2]["type"] == "urn:cmcd:problem:login-failed"
    assert {name: got for name, got in answers.items() if got != first} == {}
    # after all that, the right password and a valid code still sign in
    assert works(d, sign_in(d, a)) == 200
    medians = {name: statistics.median(t) for name, t in times.items()}
    assert max(medians.values()) < 3 * min(medians.values()), medians
    # a missing code is a malformed request: 422 whatever the password, so it tells nothing either
    missing = [d.http("POST", "/v1/sessions", {"login": a.login, "password": p})[::2] for p in (a.password, "x")]
    assert missing[0] == missing[1] and missing[0][0] == 422
    # only the login log tells the reasons apart
    details = wait_for("the failed logins in the login log", lambda: {
        r["detail"] for r in d.login_log() if r["mechanism"] == "API-SESSION" and r["result"] == "fail"
    } >= {"unknown login", "bad password", "bad or reused one-time code", "disabled", "bad recovery code",
          "not a tenant admin with TOTP enrolled"})  # fmt: skip
    assert details


# -- SMTP AUTH takes SMTP credentials only --------------------------------------------------------


def test_a_totp_admins_password_is_refused_for_smtp(d: Cmcd) -> None:
    a = new_admin(d, totp=False)
    with d.smtp(login=None) as c:
        assert auth_plain(c, a.login, a.password)[0] == 235  # before TOTP: a plain password still works
    a.otp, a.recovery = enrol(d, a.login)
    with d.smtp(login=None) as c:
        code, reply = auth_plain(c, a.login, a.password)
        assert (code, reply) == (535, "5.7.8 Authentication credentials invalid")
        assert c.mail(f"{a.login}@acme.test")[0] == 530  # still not authenticated
    with d.smtps(login=None) as c, pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        c.login(a.login, a.password)
    assert refused.value.smtp_code == 535
    rows = wait_for("the refusal in the login log", lambda: [
        r for r in d.login_log() if r["login"] == a.login and r["result"] == "fail" and "TOTP" in r["detail"]
    ])  # fmt: skip
    assert rows[0]["mechanism"] == "PLAIN"
    # the admin's application sends with an API key instead
    key = d.admin("apikey.add", tenant="acme", login=a.login)["token"]
    with d.smtp(login=None) as c:
        assert auth_plain(c, "apikey", key)[0] == 235


def test_an_api_key_is_the_smtp_password_until_it_is_revoked(d: Cmcd) -> None:
    made = d.admin("apikey.add", tenant="acme", login="alice")
    key, key_id = made["token"], made["key_id"]
    with d.smtp(login="apikey", password=key) as c:  # smtplib's own login(): AUTH PLAIN
        assert c.mail("orders@acme.test")[0] == 250
        assert c.rcpt("someone@dst.test")[0] == 250
        code, reply = c.data(message(sender="orders@acme.test", to="someone@dst.test"))
        assert code == 250, reply
        qid = queue_id(reply)
    assert d.wait_mail_log(lambda rows: any(r["event"] == "accepted" for r in rows), qid)
    with d.smtps(login=key_id, password=key) as c:  # the key's id as the user name, over implicit TLS
        assert c.mail("orders@acme.test")[0] == 250
    with d.smtp(login=None) as c:  # AUTH LOGIN
        assert c.docmd("AUTH", "LOGIN " + base64.b64encode(b"apikey").decode())[0] == 334
        assert c.docmd(base64.b64encode(key.encode()).decode())[0] == 235
    with d.smtp(login=None) as c:  # a key with another key's id as the user name is not that key
        assert auth_plain(c, "abcdefghijkm", key)[0] == 535
    d.admin("apikey.revoke", tenant="acme", key_id=key_id)
    with d.smtp(login=None) as c:
        assert auth_plain(c, "apikey", key)[0] == 535

    def key_logins() -> list[tuple[str, str]]:
        return [(r["login"], r["result"]) for r in d.login_log() if r["login"] == f"apikey:{key_id}"]

    logins = wait_for("the key's logins in the login log", lambda: len(key_logins()) >= 4 and key_logins())
    assert logins.count((f"apikey:{key_id}", "ok")) == 3 and (f"apikey:{key_id}", "fail") in logins
    assert key.split("_", 2)[2] not in json.dumps(d.login_log())  # never the secret


def test_a_key_that_may_not_send_is_refused_for_smtp(d: Cmcd) -> None:
    d.admin("user.add", tenant="acme", login="reader", role="viewer", password="reader long secret")
    viewer = d.admin("apikey.add", tenant="acme", login="reader")["token"]
    with d.smtp(login=None) as c:
        assert auth_plain(c, "apikey", viewer)[0] == 535
        assert auth_plain(c, "reader", "reader long secret")[0] == 535  # a viewer's password neither
        assert auth_plain(c, "apikey", "not a key at all")[0] == 535
    d.admin("user.add", tenant="acme", login="sleeper", role="sender", password="sleeper long secret")
    key = d.admin("apikey.add", tenant="acme", login="sleeper")["token"]
    d.admin("user.disable", tenant="acme", login="sleeper")
    with d.smtp(login=None) as c:
        assert auth_plain(c, "apikey", key)[0] == 535  # the key of a disabled user


def test_failed_key_logins_count_for_the_address_throttle(make_cmcd: Any) -> None:
    d = make_cmcd({"smtp": {"auth_fail_limit": 3}})
    key = d.admin("apikey.add", tenant="acme", login="alice")["token"]
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    with d.smtp(login=None) as c:
        assert [auth_plain(c, "apikey", forged)[0] for _ in range(3)] == [535, 535, 535]
    with d.smtp(login=None) as c:  # whichever worker takes it: failures are counted in the store
        assert auth_plain(c, "apikey", key)[0] == 421  # the address is held back, good key or not
