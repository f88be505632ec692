"""URLs as records may keep them: host, port and path only; never opens a file or a socket.

A webhook URL can carry its receiver's secret in the query string (`?token=...`), in user
information (`https://user:password@host/`) or in the fragment. The operation log keeps its
rows for years and shows a tenant its own through /v1/audit, and the daemon's log goes wherever
journald sends it: both get URLs through redact_url (one URL) or redact_urls (free text such as
an error message that quotes one). The stored webhook row keeps the URL as given: it is the
address the dispatcher posts to.
"""

from __future__ import annotations

import re

#: what stands where a secret was
REDACTED = "REDACTED"

#: a URL inside free text: a scheme, then everything up to white space, a quote or a bracket
_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]{}]+")


def redact_url(url: str) -> str:
    """URL with its user information, query string and fragment replaced by REDACTED; scheme,
    host, port and path kept ("https://REDACTED@hooks.example/x?REDACTED#REDACTED")."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    base, tail = rest[:cut], rest[cut:]
    slash = base.find("/")
    authority, path = (base, "") if slash < 0 else (base[:slash], base[slash:])
    if "@" in authority:
        authority = f"{REDACTED}@{authority.rpartition('@')[2]}"
    query, hash_, _fragment = tail.partition("#")
    out = f"{scheme}{sep}{authority}{path}"
    if query:  # starts with "?"
        out += f"?{REDACTED}"
    if hash_:
        out += f"#{REDACTED}"
    return out


def redact_urls(text: str) -> str:
    """TEXT with every URL in it passed through redact_url."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
