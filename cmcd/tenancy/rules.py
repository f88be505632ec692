"""The one rule for each name a tenant gives cmcd: addresses, logins, tenant names, domains,
roles, passwords, time zones. Every door checks with these and nothing else; pure, no I/O."""

from __future__ import annotations

import re
import zoneinfo

from cmcd import intl
from cmcd.tenancy.refusals import Reason, Refusal, Refused, invalid

#: C0 and C1 controls, DEL, spaces and the Unicode line separators (a UTF-8 local part may hold any other)
_BAD_ADDRESS_CHARS = re.compile("[\x00-\x20\x7f-\x9f\u2028\u2029]")
_MAIL_DOMAIN = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z0-9-]{2,63}$|^\[[0-9A-Fa-f:.]+\]$"
)
#: used with fullmatch: "$" alone would let a trailing newline through ("acme\n" beside "acme")
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
LOGIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
SENDER_DOMAIN = re.compile(r"(?=.{1,253}\Z)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}")
ROLES = ("admin", "sender", "viewer")
#: roles whose credentials may send mail (SMTP AUTH, POST /v1/email)
SEND_ROLES = ("admin", "sender")
MIN_PASSWORD_CHARS = 12
MAX_PASSWORD_CHARS = 1024
#: RFC 5321 §4.5.3.1.3's path limit (256 octets) less the angle brackets, and §4.5.3.1.1's local-part
#: limit; both count octets, and RFC 6531 §3.3 keeps them in octets of UTF-8
MAX_ADDRESS_OCTETS = 254
MAX_LOCAL_PART_OCTETS = 64


def address_refusal(address: str, *, smtputf8: bool = True) -> Refusal | None:
    """Why ADDRESS cannot be taken (501 5.1.3), or None. SMTPUTF8 says whether a non-ASCII
    address may be used (an SMTP client must ask for it; the API and the admin socket may). A
    UTF-8 local part is taken as it is; a U-label domain must have an A-label form (RFC 6531 §3.3).
    The lengths are octets of UTF-8: "ユーザー" is 4 characters and 12 octets."""
    if _BAD_ADDRESS_CHARS.search(address):
        return Refusal(
            Reason.BAD_ADDRESS, 501, "5.1.3", "Bad address syntax: control characters or spaces are not allowed"
        )
    if not smtputf8 and not address.isascii():
        return Refusal(Reason.BAD_ADDRESS, 501, "5.1.3", "Non-ASCII address requires SMTPUTF8")
    if octets(address) > MAX_ADDRESS_OCTETS:
        return Refusal(Reason.BAD_ADDRESS, 501, "5.1.3", f"Address too long (at most {MAX_ADDRESS_OCTETS} octets)")
    local, at, domain = address.rpartition("@")
    if not at or not local or not _mail_domain(domain):
        return Refusal(Reason.BAD_ADDRESS, 501, "5.1.3", "Bad address syntax: expected local-part@domain")
    if octets(local) > MAX_LOCAL_PART_OCTETS:
        return Refusal(
            Reason.BAD_ADDRESS, 501, "5.1.3", f"Local part too long (at most {MAX_LOCAL_PART_OCTETS} octets)"
        )
    return None


def octets(text: str) -> int:
    """TEXT's length in octets of UTF-8 (a lone surrogate, which no address may hold, counts as 3)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _mail_domain(domain: str) -> bool:
    """DOMAIN is a mail domain: ASCII as _MAIL_DOMAIN has it, or an internationalised name whose
    A-label form (UTS #46, cmcd.intl.to_alabel) is one."""
    if domain.isascii():
        return _MAIL_DOMAIN.match(domain) is not None
    try:
        return _MAIL_DOMAIN.match(intl.to_alabel(domain)) is not None
    except ValueError:
        return False


def check_address(address: str, field: str = "address") -> str:
    """ADDRESS when the address rule takes it; else Refused naming FIELD."""
    refusal = address_refusal(address)
    if refusal is not None:
        raise Refused(Refusal(refusal.reason, refusal.code, refusal.enhanced, f"{field}: {refusal.text}", field))
    return address


def check_tenant_name(name: str) -> str:
    if not TENANT_NAME.fullmatch(name):
        raise invalid(f"tenant name {name!r}: use letters, digits, '.', '_' or '-' (up to 63)", "name")
    return name


def check_login(login: str) -> str:
    if not LOGIN.fullmatch(login):
        raise invalid(f"login {login!r}: use letters, digits and . _ @ + - (up to 128)", "login")
    return login


def check_role(role: str) -> str:
    if role not in ROLES:
        raise invalid(f"role {role!r}: expected one of {', '.join(ROLES)}", "role")
    return role


def check_password(password: str) -> str:
    """One password policy for every door: at least 12 characters, at most 1024, no NUL."""
    if len(password) < MIN_PASSWORD_CHARS or len(password) > MAX_PASSWORD_CHARS or "\x00" in password:
        raise invalid(
            f"password: at least {MIN_PASSWORD_CHARS} characters (at most {MAX_PASSWORD_CHARS}, no NUL), "
            "or leave it out to have one generated",
            "password",
        )
    return password


def sender_domain(name: str) -> str:
    """NAME as a tenant's sending domain, normalised (lower case, no trailing dot), or Refused."""
    domain = name.strip().lower().rstrip(".")
    if not SENDER_DOMAIN.fullmatch(domain):
        raise invalid(f"{name!r} is not a domain name (like example.com)", "domain")
    return domain


def check_timezone(name: str) -> str:
    """An IANA time zone name this machine knows ("Asia/Tokyo", "UTC")."""
    try:
        if len(name) > 64 or name != name.strip():
            raise ValueError(name)
        zoneinfo.ZoneInfo(name)
    except (ValueError, zoneinfo.ZoneInfoNotFoundError):
        raise invalid(f"timezone: {name[:64]!r} is no IANA time zone name (e.g. Asia/Tokyo, UTC)", "timezone") from None
    return name
