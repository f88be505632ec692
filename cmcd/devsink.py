"""Development capture server: accepts every message over SMTP on a loopback address and saves it as a file.

    python -m cmcd.devsink --listen 127.0.0.1:2526 --dir var/outbox

Each message becomes DIR/<UTC timestamp>-<n>.eml (written to a temporary file, then linked into place, so a
reader never sees half a message and nothing is overwritten), starting with X-Cmcd-Envelope-From: and one
X-Cmcd-Envelope-To: line per recipient, then the message exactly as received. One line per message goes to
stderr. `make run` starts it beside the daemon, whose development routes deliver everything here. It never
binds anything but a loopback address, and it never resolves names.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import itertools
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

log = logging.getLogger("cmcd.devsink")

DESCRIPTION = "Development capture server: saves every message it receives on loopback into a directory."
HOSTNAME = "devsink.localhost"  # given explicitly: aiosmtpd's default would call socket.getfqdn()
MAX_SIZE = 64 * 1024 * 1024


def parse_listen(text: str) -> tuple[str, int]:
    """'127.0.0.1:2526' or '[::1]:2526' -> (host, port); ValueError unless the host is a loopback IP literal."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{text!r}: expected HOST:PORT, e.g. 127.0.0.1:2526")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: the host must be a loopback IP address such as 127.0.0.1 or ::1") from None
    if not ip.is_loopback:
        raise ValueError(f"{text!r}: refusing to listen on a non-loopback address; the capture server is local only")
    return str(ip), int(port_text)


def envelope_header(mail_from: str, rcpt_tos: list[str]) -> bytes:
    lines = [f"X-Cmcd-Envelope-From: <{mail_from}>"]
    lines += [f"X-Cmcd-Envelope-To: <{rcpt}>" for rcpt in rcpt_tos]
    return "".join(line + "\r\n" for line in lines).encode("utf-8", "surrogateescape")


class Outbox:
    """Writes captured messages into a directory, one file each."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._counter = itertools.count(1)

    def save(self, mail_from: str, rcpt_tos: list[str], content: bytes) -> Path:
        data = envelope_header(mail_from, rcpt_tos) + content
        fd, tmp_name = tempfile.mkstemp(dir=self.directory, prefix=".incoming-", suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            while True:
                stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
                final = self.directory / f"{stamp}-{next(self._counter)}.eml"
                try:
                    os.link(tmp, final)  # atomic, and unlike rename never replaces an existing file
                    break
                except FileExistsError:
                    continue
        finally:
            tmp.unlink(missing_ok=True)
        return final


class CaptureHandler:
    """aiosmtpd handler: every recipient accepted, every message saved."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content if envelope.original_content is not None else envelope.content
        if isinstance(content, str):
            content = content.encode("utf-8", "surrogateescape")
        mail_from = "" if envelope.mail_from in (None, "<>") else str(envelope.mail_from)  # aiosmtpd keeps "<>"
        try:
            path = await asyncio.to_thread(self.outbox.save, mail_from, list(envelope.rcpt_tos), content or b"")
        except OSError as e:
            log.error("could not save a message from <%s>: %s", mail_from, e)
            return "451 4.3.0 could not save the message"
        peer = session.peer[0] if isinstance(session.peer, tuple) else session.peer
        log.info(
            "saved %s from=<%s> to=%s size=%d peer=%s",
            path,
            mail_from,
            ",".join(f"<{r}>" for r in envelope.rcpt_tos),
            len(content or b""),
            peer,
        )
        return f"250 2.0.0 saved as {path.name}"


async def serve(host: str, port: int, directory: Path) -> None:
    loop = asyncio.get_running_loop()
    handler = CaptureHandler(Outbox(directory))

    def factory() -> SMTP:
        return SMTP(
            handler,
            hostname=HOSTNAME,
            ident="cmcd devsink",
            decode_data=False,
            enable_SMTPUTF8=True,
            data_size_limit=MAX_SIZE,
            loop=loop,
        )

    server = await loop.create_server(factory, host, port, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    bound: Any = server.sockets[0].getsockname()
    shown = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
    log.info("listening on %s, saving messages to %s", shown, directory)
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()
        log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cmcd.devsink", description=DESCRIPTION)
    parser.add_argument("--listen", default="127.0.0.1:2526", help="loopback HOST:PORT (default %(default)s)")
    parser.add_argument("--dir", default="var/outbox", type=Path, help="where to save messages (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        host, port = parse_listen(args.listen)
    except ValueError as e:
        parser.error(str(e))
    directory: Path = args.dir
    directory.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s devsink: %(message)s")
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's per-command chatter
    try:
        asyncio.run(serve(host, port, directory))
    except OSError as e:
        log.error("cannot listen on %s: %s", args.listen, e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
