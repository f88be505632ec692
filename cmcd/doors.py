"""What every way in may hold: connection caps per listener, the descriptor reserve, and the one
memory budget for message bytes in flight; never opens a socket or reads a message.

No door can take another down (DESIGN.md). Three things are shared by every listener of the
process, and each is bounded here:

- **Connections.** A Door admits a connection under its listener's caps (in all and per client,
  policy.client_group: an IPv4 address or an IPv6 /64, as auth throttling counts) and counts what it refused and what timed out, by reason and phase, for /metrics. The API
  and metrics listeners admit before any TLS byte is read; SMTP keeps its own registry
  (smtp/listener.py) and only counts here.
- **Descriptors.** At start the soft RLIMIT_NOFILE is raised to the hard limit (as Postfix's
  event loop does for every daemon that does not use select(): util/events.c, open_limit), then
  the API and metrics caps are cut so that together they can never hold more than their share of
  the descriptors left: see listener_caps. SMTP intake, delivery, the store, the spool and the
  admin socket keep the rest whatever the API is sent.
- **Memory.** DataBudget is smtp.max_data_in_flight: the bytes of SMTP DATA and of API request
  bodies read and not yet spooled or dropped, together. A door that would pass it refuses (452
  4.3.1 for SMTP, 503 with Retry-After for the API) instead of reading. An API body is held as
  its bytes arrive (never as declared: a trickled body holds what came, not what it promised),
  and its parsed JSON is held too (json_nodes x JSON_NODE_BYTES), because JSON expands: 3 bytes
  of "{}," become a 72-byte dict and list slot.
"""

from __future__ import annotations

import os
import re
import resource
from dataclasses import dataclass

from cmcd import policy

LISTENERS = ("smtp", "api", "metrics")
#: why a connection was closed before it was served
REFUSALS = ("max_connections", "max_connections_per_ip", "descriptors")
#: the wait that ran out: the TLS handshake, request headers, a request body, an idle keep-alive
#: connection (HTTP); an SMTP command or DATA
PHASES = {
    "smtp": ("handshake", "command", "data"),
    "api": ("handshake", "headers", "body", "idle"),
    "metrics": ("handshake", "headers", "idle"),
}

#: what an API request body weighs in the data budget, per byte: while it is parsed and composed
#: it is in memory about this many times over (the bytes, the decoded JSON text, the message built
#: from it), where an SMTP message is held about once before it is spooled
JSON_BODY_WEIGHT = 3
#: what one JSON node (json_nodes) may weigh once parsed, beyond the body's own bytes: at most
#: ~90 bytes measured with tracemalloc (a one-key dict with a distinct string value; an empty
#: dict or list and its slot ~40), plus the allocator's slack
JSON_NODE_BYTES = 128
#: JSON nodes of one request beyond its recipient entries: envelope, headers, tags, attachments
JSON_NODE_MARGIN = 1024
#: a mark outside strings (group 1), or a run of strings and other bytes. Every position starts a
#: match (a string left open runs to the end), so nothing backtracks and a scan is linear
_JSON_TOKEN = re.compile(rb'([{\[,:])|(?:"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)|[^"{\[,:])+', re.S)
#: descriptors kept back beyond those open at start: the store and spool files and their WALs,
#: backups, DNS queries, webhook requests, log files, admin clients
FD_RESERVE = 64
#: the share of the descriptors left (soft limit - open at start - FD_RESERVE) each HTTP listener may hold
API_FD_SHARE = 1 / 4
METRICS_FD_SHARE = 1 / 32


class Door:
    """One listener's connection caps (0 = none) and what it refused and timed out.

    Written on the event loop thread only; read by /metrics.
    """

    def __init__(self, name: str, max_total: int, max_per_ip: int = 0):
        self.name = name
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.open = 0
        self.per_ip: dict[str, int] = {}  # by policy.client_group
        self.refused = dict.fromkeys(REFUSALS, 0)
        self.timeouts = dict.fromkeys(PHASES.get(name, ()), 0)

    def admit(self, ip: str) -> str | None:
        """Take a slot for a connection from IP (counted per policy.client_group: IPv6 by /64);
        or the reason it is refused (counted)."""
        ip = policy.client_group(ip)
        reason = None
        if self.max_total and self.open >= self.max_total:
            reason = "max_connections"
        elif self.max_per_ip and self.per_ip.get(ip, 0) >= self.max_per_ip:
            reason = "max_connections_per_ip"
        if reason is not None:
            self.refused[reason] += 1
            return reason
        self.open += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return None

    def release(self, ip: str) -> None:
        """Give back the slot admit(IP) took; call it exactly once per admitted connection."""
        ip = policy.client_group(ip)
        self.open -= 1
        n = self.per_ip.get(ip, 1) - 1
        if n > 0:
            self.per_ip[ip] = n
        else:
            self.per_ip.pop(ip, None)

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def timed_out(self, phase: str) -> None:
        self.timeouts[phase] = self.timeouts.get(phase, 0) + 1


class DataBudget:
    """Message bytes in memory, read from a client and not yet spooled or dropped, from every door
    together (smtp.max_data_in_flight). A holder takes bytes with hold and gives exactly as many
    back with release; nothing here waits."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.held_bytes = 0

    def room_for(self, n: int) -> bool:
        """Whether N more bytes fit now."""
        return self.held_bytes + n <= self.limit_bytes

    def over(self) -> bool:
        return self.held_bytes > self.limit_bytes

    def hold(self, n: int) -> None:
        self.held_bytes += n

    def release(self, n: int) -> None:
        self.held_bytes -= n


def json_node_cap(max_entries: int, max_rcpts: int, max_merge_keys: int) -> int:
    """The most JSON nodes (json_nodes) a request may hold: a bulk request of MAX_ENTRIES
    recipient entries, each with up to MAX_RCPTS addresses and MAX_MERGE_KEYS merge fields (a key
    and a value each), plus JSON_NODE_MARGIN. Defaults (1000, 100, 50): 317,024 nodes, at most
    ~39 MiB of parsed JSON (JSON_NODE_BYTES), which the data budget is charged for."""
    return max_entries * (2 * (max_rcpts + max_merge_keys) + 16) + JSON_NODE_MARGIN


def json_nodes(raw: bytes | bytearray, cap: int) -> int:
    """The JSON nodes RAW can make a parser build, counted without building any: the '{', '[',
    ',' and ':' outside strings (each value after the first of a container follows a ',' or ':';
    each container opens with '{' or '['). Exact up to the first syntax error, where a parser
    stops; past CAP, CAP + 1. O(n) and allocation-free: the strings are skipped (a regex scan)
    only when the count with them is over CAP, so a body of ordinary text costs four
    bytes.count() calls."""
    n = sum(raw.count(m) for m in (b"{", b"[", b",", b":"))
    if n <= cap:
        return n
    n = 0
    for token in _JSON_TOKEN.finditer(raw):  # one match object at a time: nothing kept
        if token.lastindex:
            n += 1
            if n > cap:
                break
    return n


@dataclass(frozen=True)
class DescriptorPlan:
    """The descriptor limit at start and the connection caps it allows the HTTP listeners."""

    soft_limit: int
    hard_limit: int
    open_at_start: int
    api_max_connections: int
    metrics_max_connections: int


def listener_caps(soft_limit: int, open_at_start: int, api_max: int, metrics_max: int) -> tuple[int, int]:
    """(API cap, metrics cap): each configured cap, cut to its share of the descriptors left for
    connections (SOFT_LIMIT - OPEN_AT_START - FD_RESERVE), and at least 1. The rest, at least
    1 - API_FD_SHARE - METRICS_FD_SHARE of them, stays for SMTP, delivery and the admin socket."""
    spare = max(0, soft_limit - open_at_start - FD_RESERVE)
    return (
        max(1, min(api_max, int(spare * API_FD_SHARE))),
        max(1, min(metrics_max, int(spare * METRICS_FD_SHARE))),
    )


def open_descriptors() -> int:
    """Descriptors this process holds now (Linux: /proc/self/fd; elsewhere a guess of 32)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # the listing's own descriptor
    except OSError:
        return 32


def raise_descriptor_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (nothing here uses select()); (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # e.g. above fs.nr_open: keep what we have
            pass
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


def plan_descriptors(api_max: int, metrics_max: int) -> DescriptorPlan:
    """Raise the descriptor limit, then size the HTTP listeners' caps from it (listener_caps)."""
    soft, hard = raise_descriptor_limit()
    in_use = open_descriptors()
    soft_n = soft if soft != resource.RLIM_INFINITY else 1 << 20
    api_cap, metrics_cap = listener_caps(soft_n, in_use, api_max, metrics_max)
    return DescriptorPlan(soft_n, hard if hard != resource.RLIM_INFINITY else -1, in_use, api_cap, metrics_cap)
