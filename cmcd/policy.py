"""Pure policy: line-ending rules for DATA, the token bucket, quota arithmetic, auth-failure windows.

Nothing here opens a socket, reads a clock or touches a file; callers pass `now`.
"""

from __future__ import annotations

import ipaddress
import re
from collections import deque
from dataclasses import dataclass

_ANY_NEWLINE = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class DataVerdict:
    """The outcome of checking a message's bytes: body to keep, or a problem to reply with."""

    body: bytes | None
    problem: str = ""


_STUFFED = re.compile(rb"(\A|\r\n)\.(?!\r\n|\Z)")


def unstuff(raw: bytes) -> bytes:
    """Undo SMTP dot-stuffing (RFC 5321 4.5.2) on data that ends with CRLF or is empty: a line that
    starts with a period and has more characters loses that first period. (A line of a single
    period cannot arrive over SMTP, where it ends DATA; one made by bare-newline normalisation
    is content and stays.)"""
    if not raw.startswith(b".") and b"\r\n." not in raw:
        return raw
    return _STUFFED.sub(rb"\1", raw)


def check_data(raw: bytes, bare_newlines: str) -> DataVerdict:
    """Apply the bare-CR/LF and NUL rules to unstuffed message bytes.

    NUL is refused in every mode (no SMTP client has a reason to send it). A bare CR or
    bare LF is refused in "reject" mode and becomes CRLF in "normalize" mode, as Postfix
    3.9 does, so nothing cmcd relays can be read as a second end-of-data by another server.
    """
    if b"\0" in raw:
        return DataVerdict(None, "550 5.6.0 Message contains a NUL character")
    crlf = raw.count(b"\r\n")
    if raw.count(b"\n") == crlf and raw.count(b"\r") == crlf:
        return DataVerdict(raw)
    if bare_newlines == "reject":
        return DataVerdict(None, "550 5.6.0 Message contains a bare CR or LF; lines must end with CRLF")
    return DataVerdict(_ANY_NEWLINE.sub(b"\r\n", raw))


def too_slow(received_bytes: int, elapsed_s: float, min_rate: float, grace_s: float) -> bool:
    """True when a client has been sending DATA for longer than the grace period below min_rate."""
    if min_rate <= 0 or elapsed_s <= grace_s:
        return False
    return received_bytes < min_rate * elapsed_s


def slow_after_s(received_bytes: int, min_rate: float, grace_s: float) -> float | None:
    """Seconds from the start of a transfer after which too_slow becomes true if no byte beyond
    RECEIVED_BYTES arrives (None: min_rate 0, never)."""
    if min_rate <= 0:
        return None
    return max(grace_s, received_bytes / min_rate)


def client_group(client_ip: str) -> str:
    """What per-client caps and auth throttling count against: an IPv4 address (also one written
    as IPv4-mapped IPv6), or the /64 of an IPv6 address (one host's usual share: a client with a
    /64 has 2**64 addresses to spread connections over)."""
    if ":" not in client_ip:
        return client_ip
    try:
        addr = ipaddress.IPv6Address(client_ip.partition("%")[0])
    except ValueError:
        return client_ip
    if addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))


class SlidingWindow:
    """Counts events per key within the last window_s seconds (auth failures per IP, sends per tenant)."""

    def __init__(self, window_s: float, max_keys: int = 100_000):
        self.window_s = window_s
        self.max_keys = max_keys
        self._events: dict[object, deque[float]] = {}

    def _trim(self, key: object, now: float) -> deque[float]:
        q = self._events.get(key)
        if q is None:
            if len(self._events) >= self.max_keys:  # bound memory: forget the oldest key
                self._events.pop(next(iter(self._events)))
            q = self._events[key] = deque()
        cutoff = now - self.window_s
        while q and q[0] <= cutoff:
            q.popleft()
        return q

    def count(self, key: object, now: float) -> int:
        return len(self._trim(key, now))

    def add(self, key: object, now: float) -> int:
        q = self._trim(key, now)
        q.append(now)
        return len(q)


@dataclass
class Bucket:
    """One token bucket, the only one in cmcd: TOKENS as of time STAMP (seconds on whatever clock
    the caller keeps to). It refills at rate_per_s up to its burst, max(1, rate_per_s) unless the
    caller gives one; a rate of 0 or less is no limit at all."""

    tokens: float
    stamp: float

    @classmethod
    def full(cls, rate_per_s: float, now: float, burst: float | None = None) -> Bucket:
        return cls(_burst(rate_per_s, burst), now)

    def take(self, rate_per_s: float, now: float, burst: float | None = None) -> float:
        """Seconds to wait: 0.0 when a token was there and is now taken; otherwise how long until
        one will be (nothing is taken then: ask again when that time has passed)."""
        if rate_per_s <= 0:
            return 0.0
        self.tokens = min(_burst(rate_per_s, burst), self.tokens + (now - self.stamp) * rate_per_s)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / rate_per_s


def _burst(rate_per_s: float, burst: float | None) -> float:
    return max(1.0, rate_per_s if burst is None else burst)


class TokenBucket:
    """A Bucket per key (a tenant's send rate), each full when its key is first seen."""

    def __init__(self) -> None:
        self._buckets: dict[object, Bucket] = {}

    def take(self, key: object, rate_per_s: float, now: float) -> bool:
        if rate_per_s <= 0:
            return True
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = Bucket.full(rate_per_s, now)
        return bucket.take(rate_per_s, now) == 0.0

    def charge(self, key: object, rate_per_s: float, now: float, n: int) -> bool:
        """Admit a request of N messages if a token is there, then take all N: the bucket may go
        below zero, so later requests wait until the average rate is back under the limit."""
        if rate_per_s <= 0 or n <= 0:
            return True
        if not self.take(key, rate_per_s, now):
            return False
        self._buckets[key].tokens -= n - 1
        return True

    def debit(self, key: object, rate_per_s: float, now: float, n: int) -> None:
        """Take N more messages that were already admitted (a broadcast's copies past the first, found
        only at the end of DATA): the bucket may go below zero, as with charge."""
        if rate_per_s <= 0 or n <= 0:
            return
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = Bucket.full(rate_per_s, now)
        taken = bucket.take(rate_per_s, now) == 0.0  # refilled up to NOW; the first of the N if a token was there
        bucket.tokens -= n - 1 if taken else n


def over_daily_quota(sent_today: int, limit: int) -> bool:
    return limit > 0 and sent_today >= limit


# -- delivery outcomes ------------------------------------------------------------------------

DELIVERED = "delivered"
DEFERRED = "deferred"
BOUNCED = "bounced"

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")


@dataclass(frozen=True)
class Outcome:
    """What one reply (or one network fault) means for a recipient."""

    verdict: str  # delivered, deferred or bounced
    code: int  # the basic reply code; 0 for a network fault
    enhanced: str  # "5.1.1", or "" when the server sent none
    text: str  # the reply as it will be logged: "550 5.1.1 no such user"

    @property
    def hard(self) -> bool:
        """A permanent failure about the address itself (5.1.x): the recipient goes on the suppression list."""
        return self.verdict == BOUNCED and self.enhanced.startswith("5.1.")


def classify(code: int, message: str) -> Outcome:
    """Classify an SMTP reply by its basic code, refined by its enhanced code (RFC 3463).

    2xx delivered, 4xx deferred, 5xx bounced. An enhanced code whose class disagrees with the
    basic code is ignored (RFC 3463 section 2: the basic code wins); a reply outside 200-599 is a
    protocol error and deferred, since nothing was refused for good.
    """
    message = " ".join(message.split())
    m = _ENHANCED.match(message)
    enhanced = m.group(0).strip() if m and int(m.group(1)) == code // 100 else ""
    text = f"{code} {message}".strip()
    if 200 <= code < 300:
        return Outcome(DELIVERED, code, enhanced, text)
    if 500 <= code < 600:
        return Outcome(BOUNCED, code, enhanced, text)
    return Outcome(DEFERRED, code, enhanced, text)


def network_fault(reason: str, enhanced: str = "4.4.1") -> Outcome:
    """A connection refused, a timeout, a reset or a failed TLS handshake: always deferred.

    4.4.1 no answer from host, 4.4.2 bad connection, 4.4.7 delivery time expired, 4.7.5 TLS.
    """
    return Outcome(DEFERRED, 0, enhanced, f"{enhanced} {reason}")


def permanent_failure(enhanced: str, reason: str) -> Outcome:
    """A failure decided without a server's reply (null MX, NXDOMAIN): bounced, no code."""
    return Outcome(BOUNCED, 0, enhanced, f"{enhanced} {reason}")


def retry_delay(attempts: int, schedule: tuple[float, ...], jitter: float, rand: float) -> float:
    """Seconds until the next attempt after ATTEMPTS failed ones (1 = the first failed).

    The schedule's last step repeats. RAND in [0, 1) spreads retries by +-jitter (a fraction),
    so a destination that was down does not get every deferred message back in the same second.
    """
    if not schedule:
        raise ValueError("empty retry schedule")
    base = schedule[min(max(attempts, 1), len(schedule)) - 1]
    return base * (1.0 + jitter * (2.0 * rand - 1.0))


def expired(received_ts: float, now: float, max_lifetime_s: float) -> bool:
    return now - received_ts >= max_lifetime_s
