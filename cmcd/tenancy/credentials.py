"""Tenancy commands for how a tenant admin signs in as a person: TOTP enrolment (enrol, confirm
with the first code, disable) and ending sessions. Never sees a session token: a session is
named by its public id.

Secrets leave once, in a command's result: the TOTP secret (to put in an authenticator app) from
otp_enroll, the recovery codes from otp_confirm. The store keeps the TOTP secret encrypted and
only digests of recovery codes. Enrolling again, disabling, and (in accounts.py) a password, role
or enabled change each end the user's sessions in the same transaction.
"""

from __future__ import annotations

from typing import TypeVar

from cmcd import totp
from cmcd.store.store import Store
from cmcd.tenancy.core import Core, Op
from cmcd.tenancy.refusals import invalid

T = TypeVar("T")


class Credentials:
    def __init__(self, core: Core):
        self.core = core

    async def otp_enroll(self, op: Op, tenant: str, login: str, issuer: str) -> tuple[str, str]:
        """Start (or restart) TOTP enrolment of tenant admin LOGIN: (the provisioning URI, the
        secret in base32 to type in by hand), shown once. Refused for a user who is not an admin
        and for one already enrolled (otp_disable first)."""
        secret = totp.new_secret()
        await self.core.change(op, tenant, lambda s: s.otp_enroll(tenant, login, secret))
        return totp.provisioning_uri(secret, f"{tenant}/{login}", issuer), totp.b32(secret)

    async def otp_confirm(self, op: Op, tenant: str, login: str, code: str, now: float) -> list[str]:
        """The first CODE from the authenticator app confirms enrolment: the recovery codes, once."""
        user = await self.core.need(op, tenant, self.core.store.user, tenant, login)
        state = await self.core.need(op, tenant, self.core.store.otp_state, user.id)
        if state is None or state[1]:
            await self.core.refuse(
                op, tenant, invalid(f"user {login!r} of tenant {tenant!r} has no enrolment waiting for confirmation")
            )
        step = totp.verify(state[0], code, now, state[3])
        if step is None:
            await self.core.refuse(
                op, tenant, invalid("that code does not match; check the device's clock and try the next code", "code")
            )
        codes = totp.recovery_codes()
        digests = [totp.hash_recovery(c) for c in codes]

        def change(s: Store) -> None:
            if not s.otp_use_step(user.id, step, confirm_with=digests):
                raise invalid("that code was already used; wait for the next one", "code")

        await self.core.change(op, tenant, change)
        return codes

    async def otp_disable(self, op: Op, tenant: str, login: str) -> None:
        """Remove LOGIN's TOTP enrolment (and end its sessions); refused when there is none."""
        await self.core.change(op, tenant, lambda s: s.otp_disable(tenant, login))

    async def session_revoke(self, op: Op, tenant: str, login: str, session_id: str | None) -> int:
        """End LOGIN's session SESSION_ID, or every session of LOGIN (None): how many ended.
        An id that is not one of this user's sessions is refused."""
        return await self.core.change(op, tenant, lambda s: s.session_revoke(tenant, login, session_id))
