"""Opening an outbound session: a site's hosts in order, the TLS fallback, and the Outcome a
session that ended early defers its recipients with. Never queues jobs, never judges a site's
window (deliver/ready.py does), never writes an outcome (the engine does).
"""

from __future__ import annotations

import ssl

from cmcd import policy
from cmcd.config import DeliveryConfig
from cmcd.deliver.client import SmtpClient, SmtpConnectError, SmtpError
from cmcd.deliver.routing import Route
from cmcd.policy import Outcome


async def open_session(
    route: Route,
    tls_mode: str,
    d: DeliveryConfig,
    helo_name: str,
    tls_context: ssl.SSLContext,
    failures: dict[str, int],
) -> SmtpClient | Outcome:
    """Connect to ROUTE's hosts in order until one greets us and finishes EHLO (and STARTTLS).

    The client ready for MAIL, or the last failure after every address failed. Each failed
    attempt is counted in FAILURES by its stage ("connect", "hello").
    """
    failure: Outcome | None = None
    for host, address in route.attempt_order():
        for attempt_tls in (tls_mode, "disabled") if tls_mode == "opportunistic+plain" else (tls_mode,):
            try:
                client = await SmtpClient.connect(
                    host.name, address, host.port, connect_timeout=d.connect_timeout,
                    command_timeout=d.command_timeout, data_timeout=d.data_timeout,
                    data_xfer_timeout=d.data_xfer_timeout,
                )  # fmt: skip
            except SmtpConnectError as exc:
                failures["connect"] += 1
                failure = policy.network_fault(str(exc), exc.enhanced)
                break  # this address is unreachable; next address
            try:
                refused = await client.hello(helo_name, attempt_tls, tls_context)
            except SmtpError as exc:
                client.abort()
                failures["hello"] += 1
                failure = failure_outcome(f"{host.name}[{address}]", exc, "during the greeting or EHLO")
                if exc.enhanced == "4.7.5" and attempt_tls == "opportunistic+plain":
                    continue  # the policy allows plain text after a failed handshake
                break
            if refused is not None:
                await client.quit()
                failures["hello"] += 1
                failure = policy.classify(refused.code, f"{refused.text} (from {host.name}[{address}])")
                break  # a host that will not talk to us: try the next one (as Postfix does)
            return client
    return failure or policy.network_fault("no address to connect to")


def failure_outcome(where: str, exc: SmtpError, stage: str) -> Outcome:
    """A session that ended early, in the destination's words when it said any (a 421 before the
    close is classified like any reply; a timeout or garbled line is a network fault)."""
    if exc.reply is not None:  # the reply first, so that its enhanced code is read (RFC 3463)
        return policy.classify(exc.reply.code, f"{exc.reply.text} (from {where} {stage})")
    return policy.network_fault(f"{where}: {exc} ({stage})", exc.enhanced)
