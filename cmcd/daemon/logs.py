"""How cmcd's processes write their log (logfmt on stderr) and speak to systemd; nothing else."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from cmcd import crypto
from cmcd.redact import redact_urls
from cmcd.textout import escape_controls


class LogfmtFormatter(logging.Formatter):
    """One line per event: ts=... level=... logger=... then the message's own key=value pairs.

    Values a client chose (a login name, a remote reply) reach the message through %s; control
    characters in the line are escaped (\\r \\n \\x00), so no value can start a line of its own.
    Anything that looks like an address loses its local part (crypto.redact_addresses): remote
    replies echo the recipient, and the log is the one record that cannot be encrypted. A URL
    keeps its host and path only (redact.redact_urls: a webhook's token is in its query string)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        msg = record.getMessage()
        if "=" not in msg.split(" ", 1)[0]:
            msg = f"msg={msg!r}"
        line = f"ts={ts} level={record.levelname.lower()} logger={record.name} {msg}"
        if record.exc_info:
            line += " exc=" + repr(self.formatException(record.exc_info))
        return escape_controls(crypto.redact_addresses(redact_urls(line)))


def setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every command at INFO
    logging.getLogger("asyncio").setLevel(logging.WARNING)


def sd_notify(notify_socket: str | None, message: str) -> None:
    """Tell systemd (Type=notify) about READY=1 / STOPPING=1; a no-op outside systemd."""
    if not notify_socket:
        return
    addr = "\0" + notify_socket[1:] if notify_socket.startswith("@") else notify_socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(message.encode())


async def watchdog(notify_socket: str | None) -> None:
    """WATCHDOG=1 at half of systemd's WatchdogSec, from the event loop: a stuck loop misses it."""
    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    if usec <= 0 or not notify_socket:
        return
    while True:
        sd_notify(notify_socket, "WATCHDOG=1")
        await asyncio.sleep(usec / 2e6)
