"""Tenancy's credential commands without a daemon, on a Store in tmp_path: TOTP enrolment (enrol,
confirm with the app's first code, disable) and ending sessions; each change one operation-log
row, each refusal typed, on record and changing nothing. Codes are computed with a clock passed in."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from cmcd import totp
from cmcd.store import Store
from cmcd.tenancy import Op, Tenancy
from cmcd.tenancy.refusals import Reason, Refused
from tests.unit import tenancy_parts as parts
from tests.unit.tenancy_parts import open_tenancy

PASSWORD = "correct horse battery"
ISSUER = "cmcd mx.cmcd.test"
STATE_TABLES = ("users", "otp", "api_sessions", "directory")


@dataclass
class World:
    store: Store
    tenancy: Tenancy

    def ops(self) -> list[tuple[Any, ...]]:
        """(action, target, result, detail), oldest first."""
        return self.store.conn.execute("SELECT action, target, result, detail FROM ops_log ORDER BY id").fetchall()

    def state(self) -> dict[str, list[tuple[Any, ...]]]:
        return {t: self.store.conn.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall() for t in STATE_TABLES}

    def sessions(self, login: str) -> list[str]:
        return [s["id"] for s in self.store.sessions("acme", login)]

    def start_session(self, login: str, token: str) -> str:
        u = self.store.user("acme", login)
        return self.store.session_add(token, u.id, u.tenant_id, time.time() + 3600)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with open_tenancy(tmp_path) as tenancy:
        await tenancy.accounts.tenant_add(op("tenant.add"), "acme")
        await tenancy.accounts.user_add(op("user.add"), "acme", "boss", "admin", PASSWORD)
        await tenancy.accounts.user_add(op("user.add"), "acme", "app", "sender", PASSWORD)
        yield World(tenancy.core.store, tenancy)


def op(action: str, target: str = "acme/boss") -> Op:
    return parts.op(action, target)


async def refused(w: World, reason: Reason, text: str, call: Any) -> None:
    """CALL is refused for REASON with TEXT, changes nothing and writes one refused row."""
    before, rows = w.state(), len(w.ops())
    with pytest.raises(Refused) as caught:
        await call
    assert caught.value.refusal.reason is reason and text in str(caught.value), str(caught.value)
    assert w.state() == before
    assert [(r[2], r[3]) for r in w.ops()[rows:]] == [("refused", str(caught.value))]


def secret_of(uri: str) -> bytes:
    b32 = parse_qs(urlsplit(uri).query)["secret"][0]
    return base64.b32decode(b32 + "=" * (-len(b32) % 8))


async def test_enrol_confirm_disable(world: World) -> None:
    w = world
    c = w.tenancy.credentials
    w.start_session("boss", "tok-1")
    uri, shown = await c.otp_enroll(op("user.otp-enroll"), "acme", "boss", ISSUER)
    assert uri.startswith("otpauth://totp/cmcd%20mx.cmcd.test:acme%2Fboss?") and f"secret={shown}" in uri
    assert w.sessions("boss") == []  # enrolling ends the user's sessions
    secret = secret_of(uri)
    now = 1_900_000_000.0
    await refused(
        w, Reason.INVALID, "that code does not match",
        c.otp_confirm(op("user.otp-confirm"), "acme", "boss", "000000" if totp.totp(secret, now) != "000000" else "111111", now),
    )  # fmt: skip
    codes = await c.otp_confirm(op("user.otp-confirm"), "acme", "boss", totp.totp(secret, now), now)
    assert len(codes) == 10 and len(set(codes)) == 10
    state = w.store.otp_state(w.store.user("acme", "boss").id)
    assert state is not None and state[1] and state[2] == [totp.hash_recovery(x) for x in codes]
    await refused(
        w, Reason.INVALID, "has no enrolment waiting for confirmation",
        c.otp_confirm(op("user.otp-confirm"), "acme", "boss", totp.totp(secret, now + 30), now + 30),
    )  # fmt: skip
    await refused(
        w, Reason.CONFLICT, "is already enrolled", c.otp_enroll(op("user.otp-enroll"), "acme", "boss", ISSUER)
    )
    await c.otp_disable(op("user.otp-disable"), "acme", "boss")
    assert w.store.otp_state(w.store.user("acme", "boss").id) is None
    await refused(w, Reason.NOT_FOUND, "has no TOTP enrolment", c.otp_disable(op("user.otp-disable"), "acme", "boss"))
    assert [(a, r) for a, _, r, _ in w.ops() if a.startswith("user.otp")] == [
        ("user.otp-enroll", "ok"),
        ("user.otp-confirm", "refused"),
        ("user.otp-confirm", "ok"),
        ("user.otp-confirm", "refused"),
        ("user.otp-enroll", "refused"),
        ("user.otp-disable", "ok"),
        ("user.otp-disable", "refused"),
    ]
    assert not any(code in str(w.ops()) for code in codes) and shown not in str(w.ops())


async def test_enrolment_refusals(world: World) -> None:
    w = world
    c = w.tenancy.credentials
    await refused(
        w, Reason.INVALID, "only admins and viewers sign in with TOTP",
        c.otp_enroll(op("user.otp-enroll", "acme/app"), "acme", "app", ISSUER),
    )  # fmt: skip
    await refused(
        w, Reason.NOT_FOUND, "no user 'ghost' in tenant 'acme'",
        c.otp_enroll(op("user.otp-enroll", "acme/ghost"), "acme", "ghost", ISSUER),
    )  # fmt: skip
    await refused(
        w, Reason.NOT_FOUND, "no user 'ghost' in tenant 'acme'",
        c.otp_confirm(op("user.otp-confirm", "acme/ghost"), "acme", "ghost", "123456", time.time()),
    )  # fmt: skip
    await refused(
        w, Reason.INVALID, "has no enrolment waiting for confirmation",
        c.otp_confirm(op("user.otp-confirm"), "acme", "boss", "123456", time.time()),
    )  # fmt: skip


async def test_session_revoke(world: World) -> None:
    w = world
    c = w.tenancy.credentials
    first = w.start_session("boss", "tok-1")
    w.start_session("boss", "tok-2")
    other = w.start_session("app", "tok-3")
    assert await c.session_revoke(op("session.revoke", f"acme/boss {first}"), "acme", "boss", first.upper()) == 1
    assert len(w.sessions("boss")) == 1
    await refused(
        w,
        Reason.NOT_FOUND,
        f"has no session {other!r}",
        c.session_revoke(op("session.revoke", f"acme/boss {other}"), "acme", "boss", other),
    )  # fmt: skip  (another user's session is not this user's)
    assert await c.session_revoke(op("session.revoke"), "acme", "boss", None) == 1
    assert await c.session_revoke(op("session.revoke"), "acme", "boss", None) == 0
    assert w.sessions("boss") == [] and w.sessions("app") == [other]
    assert [(a, t, r) for a, t, r, _ in w.ops() if a == "session.revoke"] == [
        ("session.revoke", f"acme/boss {first}", "ok"),
        ("session.revoke", f"acme/boss {other}", "refused"),
        ("session.revoke", "acme/boss", "ok"),
        ("session.revoke", "acme/boss", "ok"),
    ]
