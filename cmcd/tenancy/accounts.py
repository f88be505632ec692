"""Tenancy commands for tenants, their settings, users, IP credentials, API keys and suppressions.

Each command checks its arguments with cmcd.tenancy.rules, makes its change through Core.change
(one transaction, one operation-log row, the directory current before it returns) and raises
Refused for anything it will not do. Reads are plain store reads.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any, TypeVar

import cmcd.tenancy.rules as rules
from cmcd import bounces, crypto
from cmcd.records import STREAMS, IpCredential, Tenant, User
from cmcd.store.store import MIN_IPCRED_PREFIX, Store
from cmcd.tenancy.core import Core, Op
from cmcd.tenancy.refusals import invalid

T = TypeVar("T")

SUPPRESSED_RCPT_MODES = ("accept", "refuse")
#: the reason on a one-click unsubscribe's suppression and mail-log row
UNSUBSCRIBE_REASON = "unsubscribed (one-click)"


class Accounts:
    def __init__(self, core: Core):
        self.core = core

    async def tenant_add(self, op: Op, name: str) -> Tenant:
        await self.core.checked(op, None, lambda: rules.check_tenant_name(name))
        return await self.core.change(op, name, lambda s: s.tenant_add(name))

    async def tenant_set(
        self,
        op: Op,
        name: str,
        *,
        dsn: bool | None = None,
        suppressed_rcpt: str | None = None,
        console_otp: bool | None = None,
        timezone: str | None = None,
        block_actions: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Whether the tenant's senders get bounces, what RCPT does with a suppressed address,
        whether every console user must sign in with a one-time password, the time zone of
        the tenant's console pages ("": the server's), and the tenant's own action for bounce
        classes (BLOCK_ACTIONS: class -> suppress, count, alert or none, or "default" for the
        host's [bounces] action; the classes not named keep theirs). Every worker decides by the
        new actions once this returns (the directory is bumped)."""
        blocks = dict(block_actions or {})

        def check() -> None:
            if dsn is None and suppressed_rcpt is None and console_otp is None and timezone is None and not blocks:
                raise invalid(
                    "tenant.set: nothing to change (dsn, suppressed_rcpt, console_otp, timezone, block_actions)"
                )
            try:
                bounces.check_tenant_actions(blocks)
            except ValueError as exc:
                raise invalid(str(exc), "block_actions") from None
            if suppressed_rcpt is not None and suppressed_rcpt not in SUPPRESSED_RCPT_MODES:
                raise invalid(
                    f"suppressed_rcpt must be 'accept' or 'refuse', not {suppressed_rcpt!r}", "suppressed_rcpt"
                )
            if timezone:
                rules.check_timezone(timezone)

        await self.core.checked(op, name, check)

        def change(s: Store) -> dict[str, Any]:
            s.tenant_set(
                name, dsn=dsn, suppressed_rcpt=suppressed_rcpt, console_otp=console_otp, timezone=timezone,
                block_actions=blocks,
            )  # fmt: skip
            return s.tenant_summary(name)

        def detail(_: dict[str, Any]) -> str:
            said = ",".join(f"{cls}={action}" for cls, action in blocks.items())
            return " ".join(x for x in (op.detail, f"block_actions {said}" if said else "") if x)

        return await self.core.change(op, name, change, detail)

    # -- users -----------------------------------------------------------------------------

    async def _password(self, op: Op, tenant: str, password: str | None) -> tuple[str, bool]:
        """(the password to set, whether cmcd made it up)."""
        if password is None:
            return crypto.generate_password(), True
        return await self.core.checked(op, tenant, lambda: rules.check_password(password)), False

    async def user_add(
        self, op: Op, tenant: str, login: str, role: str, password: str | None
    ) -> tuple[User, str | None]:
        """A new user; (the user, the password when cmcd generated one: shown once)."""

        def check() -> None:
            rules.check_login(login)
            rules.check_role(role)

        await self.core.checked(op, tenant, check)
        secret, generated = await self._password(op, tenant, password)
        await self.core.need(op, tenant, self.core.store.tenant, tenant)  # before hashing
        digest = await self.core.hash_password(secret)
        user = await self.core.change(op, tenant, lambda s: s.user_add(tenant, login, role, digest))
        return user, secret if generated else None

    async def user_passwd(self, op: Op, tenant: str, login: str, password: str | None) -> tuple[User, str | None]:
        """A new password (it ends the user's API sessions); the generated one is returned once."""
        secret, generated = await self._password(op, tenant, password)
        await self.core.need(op, tenant, self.core.store.user, tenant, login)  # before hashing
        digest = await self.core.hash_password(secret)
        user = await self.core.change(op, tenant, lambda s: s.user_update(tenant, login, password_hash=digest))
        return user, secret if generated else None

    async def user_enable(self, op: Op, tenant: str, login: str, enabled: bool) -> User:
        return await self.core.change(op, tenant, lambda s: s.user_update(tenant, login, enabled=enabled))

    async def user_set_role(self, op: Op, tenant: str, login: str, role: str) -> User:
        """A new role; like a password change or disable, it ends the user's API sessions."""
        await self.core.checked(op, tenant, lambda: rules.check_role(role))
        return await self.core.change(op, tenant, lambda s: s.user_update(tenant, login, role=role))

    async def user_require_otp(self, op: Op, tenant: str, login: str, required: bool) -> User:
        """Whether LOGIN must sign in to the console with a one-time password (enrolling at its
        next sign-in when it has none); removing the requirement keeps an enrolment it has."""
        return await self.core.change(op, tenant, lambda s: s.user_set_otp_required(tenant, login, required))

    async def user_set_stream(self, op: Op, tenant: str, login: str, stream: str) -> User:
        """The stream of LOGIN's mail when neither the message nor the API request names one; every
        worker sends by it once this returns (the directory is bumped)."""

        def check() -> None:
            if stream not in STREAMS:
                raise invalid(f"stream must be one of {', '.join(STREAMS)}, not {stream!r}", "stream")

        await self.core.checked(op, tenant, check)
        return await self.core.change(op, tenant, lambda s: s.user_set_stream(tenant, login, stream))

    async def user_delete(self, op: Op, tenant: str, login: str) -> None:
        await self.core.change(op, tenant, lambda s: s.user_delete(tenant, login))

    # -- IP credentials --------------------------------------------------------------------

    async def ipcred_add(self, op: Op, tenant: str, login: str, cidr: str) -> IpCredential:
        """LOGIN sends without a password from CIDR (no wider than /16 or /48, overlapping no
        other tenant's)."""

        def check() -> str:
            try:
                net = ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise invalid(f"{cidr!r} is not an address or CIDR network (like 192.0.2.0/24)", "cidr") from None
            shortest = MIN_IPCRED_PREFIX[net.version]
            if net.prefixlen < shortest:
                raise invalid(
                    f"{net} is too wide for an IP credential: it would let every host in it send without a "
                    f"password; use /{shortest} or narrower",
                    "cidr",
                )
            return str(net)

        net = await self.core.checked(op, tenant, check)
        return await self.core.change(op, tenant, lambda s: s.ipcred_add(tenant, login, net))

    async def ipcred_delete(self, op: Op, tenant: str, login: str, cidr: str) -> None:
        def check() -> str:
            try:
                return str(ipaddress.ip_network(cidr, strict=False))
            except ValueError:
                raise invalid(f"{cidr!r} is not an address or CIDR network", "cidr") from None

        net = await self.core.checked(op, tenant, check)
        await self.core.change(op, tenant, lambda s: s.ipcred_delete(tenant, login, net))

    # -- API keys --------------------------------------------------------------------------

    async def apikey_add(self, op: Op, tenant: str, login: str, role: str | None) -> tuple[dict[str, Any], str]:
        """A new API key for LOGIN: (its listing row, the token, shown once)."""
        if role is not None:
            await self.core.checked(op, tenant, lambda: rules.check_role(role))
        return await self.core.change(op, tenant, lambda s: s.apikey_add(tenant, login, role))

    async def apikey_revoke(self, op: Op, tenant: str, key_id: str) -> None:
        await self.core.change(op, tenant, lambda s: s.apikey_revoke(tenant, key_id))

    # -- suppressions ----------------------------------------------------------------------

    async def suppression_add(self, op: Op, tenant: str, address: str, reason: str) -> bool:
        """ADDRESS on TENANT's suppression list; False when it already was."""
        await self.core.checked(op, tenant, lambda: rules.check_address(address))
        return await self.core.change(
            op, tenant, lambda s: s.suppression_add(tenant, address, reason), accounts=False,
            detail=lambda added: op.detail or ("added" if added else "already listed"),
        )  # fmt: skip

    async def suppression_delete(self, op: Op, tenant: str, address: str, stream: str = "") -> None:
        """Lift ADDRESS's suppression (STREAM ''), or its recipient's unsubscribe from STREAM (the
        operator's alone to lift: the API and the console never pass it)."""
        await self.core.change(
            op, tenant, lambda s: s.suppression_delete(tenant, address, stream), accounts=False, removals=True
        )

    async def unsubscribe(self, op: Op, tenant: str, tenant_id: int, address: str, stream: str, now: float) -> bool:
        """A recipient's one-click unsubscribe (cmcd/api/unsubscribe.py): ADDRESS held back from
        TENANT's STREAM mail, with its mail-log row "unsubscribed", in the command's transaction;
        False when it was unsubscribed already. The address comes from a token cmcd sealed, so it
        is not checked again; a tenant gone since is refused (NOT_FOUND)."""
        return await self.core.change(
            op, tenant, lambda s: s.unsubscribe(tenant_id, address, stream, UNSUBSCRIBE_REASON, now), accounts=False,
            detail=lambda added: f"stream={stream} " + ("unsubscribed" if added else "already unsubscribed"),
        )  # fmt: skip
