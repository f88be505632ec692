"""Admin verbs for tenants, their settings, users, IP credentials and suppression lists: each
change is one tenancy command (cmcd.tenancy.accounts), which checks it and writes its
operation-log row; reads are store reads. Never validates a name or a password itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cmcd.admin.verb import Args, BadRequest, Context, Verb, command, read
from cmcd.records import Stream, User

SUPPRESSION_LIST_DEFAULT = 100
SUPPRESSION_LIST_MAX = 10_000


def _user(u: User) -> dict[str, Any]:
    return {"tenant": u.tenant, "login": u.login, "role": u.role, "enabled": u.enabled, "created": u.created,
            "stream": u.stream}  # fmt: skip


# -- tenants ---------------------------------------------------------------------------------------


async def _tenant_add(ctx: Context, a: Args) -> Any:
    return dataclasses.asdict(await ctx.tenancy.accounts.tenant_add(a.op, a.text("name")))


async def _tenant_list(ctx: Context, a: Args) -> Any:
    tenants = await ctx.astore.call(ctx.store.tenants)
    own = await ctx.astore.call(ctx.store.tenant_block_actions)
    return [dataclasses.asdict(t) | {"block_actions": dict(own.get(t.id, {}))} for t in tenants]


def _with_block_policy(ctx: Context, summary: dict[str, Any]) -> dict[str, Any]:
    """A tenant's summary with the block policy in force for it: every class's action (its own
    block_actions over the host's [bounces] actions) and the host's threshold, window and watch period."""
    policy = ctx.config.bounces.policy()
    effective = policy.effective(summary.get("block_actions") or {})
    return summary | {
        "block_policy": ",".join(f"{cls}={action}" for cls, action in effective.items()),
        "block_count_threshold": policy.count_threshold,
        "block_count_window_s": policy.count_window_s,
        "block_watch_s": policy.watch_s,
    }


async def _tenant_show(ctx: Context, a: Args) -> Any:
    return _with_block_policy(ctx, await ctx.astore.call(ctx.store.tenant_summary, a.text("name")))


def _timezone(a: Args) -> str | None:
    """tenant.set's time zone: a name, "" (back to server.timezone) or None (unchanged)."""
    value = a.raw.get("timezone")
    if value is None or value == "":
        return value
    return a.text("timezone")


async def _tenant_set(ctx: Context, a: Args) -> Any:
    dsn = a.raw.get("dsn")
    if dsn is not None and not isinstance(dsn, bool):
        raise BadRequest("tenant.set: dsn must be true or false")
    console_otp = a.raw.get("console_otp")
    if console_otp is not None and not isinstance(console_otp, bool):
        raise BadRequest("tenant.set: console_otp must be true or false")
    blocks = a.raw.get("block_actions")
    if blocks is not None and not (
        isinstance(blocks, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in blocks.items())
    ):
        raise BadRequest('tenant.set: block_actions must be an object like {"mailbox_full": "suppress"}')
    summary = await ctx.tenancy.accounts.tenant_set(
        a.op,
        a.text("name"),
        dsn=dsn,
        suppressed_rcpt=a.optional_text("suppressed_rcpt"),
        console_otp=console_otp,
        timezone=_timezone(a),
        block_actions=blocks,
    )
    return _with_block_policy(ctx, summary)


# -- users -----------------------------------------------------------------------------------------


def _with_password(u: User, generated: str | None) -> dict[str, Any]:
    """The user, and the password cmcd generated for it (shown once)."""
    return _user(u) | ({"password": generated} if generated is not None else {})


async def _user_add(ctx: Context, a: Args) -> Any:
    tenant, login, role = a.text("tenant"), a.text("login"), a.optional_text("role") or "sender"
    u, generated = await ctx.tenancy.accounts.user_add(a.op, tenant, login, role, a.password())
    return _with_password(u, generated)


async def _user_list(ctx: Context, a: Args) -> Any:
    return [_user(u) for u in await ctx.astore.call(ctx.store.users, a.text("tenant"))]


async def _user_passwd(ctx: Context, a: Args) -> Any:
    u, generated = await ctx.tenancy.accounts.user_passwd(a.op, a.text("tenant"), a.text("login"), a.password())
    return _with_password(u, generated)


async def _user_disable(ctx: Context, a: Args) -> Any:
    return _user(await ctx.tenancy.accounts.user_enable(a.op, a.text("tenant"), a.text("login"), False))


async def _user_enable(ctx: Context, a: Args) -> Any:
    return _user(await ctx.tenancy.accounts.user_enable(a.op, a.text("tenant"), a.text("login"), True))


async def _user_set_role(ctx: Context, a: Args) -> Any:
    """A new role for LOGIN; like a password change or disable, it ends the user's API sessions."""
    tenant, login, role = a.text("tenant"), a.text("login"), a.text("role")
    return _user(await ctx.tenancy.accounts.user_set_role(a.op, tenant, login, role))


async def _user_set_stream(ctx: Context, a: Args) -> Any:
    """The stream of LOGIN's mail when neither the message nor the API request names one."""
    tenant, login, stream = a.text("tenant"), a.text("login"), a.text("stream")
    return _user(await ctx.tenancy.accounts.user_set_stream(a.op, tenant, login, stream))


async def _user_otp_require(ctx: Context, a: Args) -> Any:
    """Whether LOGIN must sign in to the console with a one-time password (enrolling at its next
    sign-in when it has none); lifting it keeps an enrolment the user has."""
    required = a.raw.get("required")
    if not isinstance(required, bool):
        raise BadRequest("user.otp-require: required must be true or false")
    u = await ctx.tenancy.accounts.user_require_otp(a.op, a.text("tenant"), a.text("login"), required)
    return _user(u) | {"otp_required": required}


async def _user_delete(ctx: Context, a: Args) -> Any:
    tenant, login = a.text("tenant"), a.text("login")
    await ctx.tenancy.accounts.user_delete(a.op, tenant, login)
    return {"tenant": tenant, "login": login, "deleted": True}


# -- IP credentials --------------------------------------------------------------------------------


async def _ipcred_add(ctx: Context, a: Args) -> Any:
    c = await ctx.tenancy.accounts.ipcred_add(a.op, a.text("tenant"), a.text("login"), a.text("cidr"))
    return {"tenant": c.tenant, "login": c.login, "cidr": c.cidr}


async def _ipcred_list(ctx: Context, a: Args) -> Any:
    creds = await ctx.astore.call(ctx.store.ipcreds, a.optional_text("tenant"))
    return [{"tenant": c.tenant, "login": c.login, "cidr": c.cidr} for c in creds]


async def _ipcred_delete(ctx: Context, a: Args) -> Any:
    tenant, login, cidr = a.text("tenant"), a.text("login"), a.text("cidr")
    await ctx.tenancy.accounts.ipcred_delete(a.op, tenant, login, cidr)
    return {"tenant": tenant, "login": login, "cidr": cidr, "deleted": True}


# -- suppressions ----------------------------------------------------------------------------------


async def _suppression_list(ctx: Context, a: Args) -> Any:
    limit = a.integer("limit", SUPPRESSION_LIST_DEFAULT, 1, SUPPRESSION_LIST_MAX)
    return await ctx.astore.call(ctx.store.suppressions, a.text("tenant"), limit)


async def _suppression_add(ctx: Context, a: Args) -> Any:
    tenant, address = a.text("tenant"), a.text("address")
    added = await ctx.tenancy.accounts.suppression_add(a.op, tenant, address, "added by operator")
    return {"tenant": tenant, "address": address, "added": added}


async def _suppression_delete(ctx: Context, a: Args) -> Any:
    tenant, address = a.text("tenant"), a.text("address")
    stream = Stream.BROADCAST if a.flag("unsubscribe") else ""
    await ctx.tenancy.accounts.suppression_delete(a.op, tenant, address, stream)
    return {"tenant": tenant, "address": address, "deleted": True, "unsubscribe": bool(stream)}


TENANT_VERBS: dict[str, Verb] = {
    "tenant.add": command(_tenant_add, ("name",), "{name}", tenant_arg="name"),
    "tenant.list": read(_tenant_list),
    "tenant.show": read(_tenant_show, "name"),
    "tenant.set": command(
        _tenant_set,
        ("name", "dsn", "suppressed_rcpt", "console_otp", "timezone", "block_actions"),
        "{name}",
        tenant_arg="name",
    ),
    "user.add": command(_user_add, ("tenant", "login", "role", "password"), "{tenant}/{login}"),
    "user.list": read(_user_list, "tenant"),
    "user.passwd": command(_user_passwd, ("tenant", "login", "password"), "{tenant}/{login}"),
    "user.disable": command(_user_disable, ("tenant", "login"), "{tenant}/{login}"),
    "user.enable": command(_user_enable, ("tenant", "login"), "{tenant}/{login}"),
    "user.delete": command(_user_delete, ("tenant", "login"), "{tenant}/{login}"),
    "user.set-role": command(_user_set_role, ("tenant", "login", "role"), "{tenant}/{login} role={role}"),
    "user.otp-require": command(_user_otp_require, ("tenant", "login", "required"), "{tenant}/{login}"),
    "user.set-stream": command(_user_set_stream, ("tenant", "login", "stream"), "{tenant}/{login} stream={stream}"),
    "ipcred.add": command(_ipcred_add, ("tenant", "login", "cidr"), "{tenant}/{login} {cidr}"),
    "ipcred.list": read(_ipcred_list, "tenant"),
    "ipcred.delete": command(_ipcred_delete, ("tenant", "login", "cidr"), "{tenant}/{login} {cidr}"),
    "suppression.list": read(_suppression_list, "tenant", "limit"),
    "suppression.add": command(_suppression_add, ("tenant", "address"), "{tenant}"),
    "suppression.delete": command(_suppression_delete, ("tenant", "address", "unsubscribe"), "{tenant}"),
}
