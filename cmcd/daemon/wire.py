"""Requests to a worker's private admin socket (JSON lines, as cmcctl speaks to the admin socket),
from its supervisor or from worker 0; never serves one. Every wait has a timer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from cmcd.errors import CmcdError

MAX_LINE_BYTES = 64 * 1024 * 1024  # a worker's metrics or a 10,000-row queue page fit in one line
TIMEOUT_S = 60.0  # one request's answer
CONNECT_TIMEOUT_S = 10.0
PEER_TIMEOUT_S = 1800.0  # a peer's part of a purge: erasing a large shard takes a while


class WorkerUnavailable(CmcdError):
    """A worker did not answer (it is down or restarting)."""


class Refusal(CmcdError):
    """A worker answered {"ok": false}: its error text, for the operator."""


async def _open(path: Path, timeout_s: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        return await asyncio.wait_for(
            asyncio.open_unix_connection(str(path), limit=MAX_LINE_BYTES), min(timeout_s, CONNECT_TIMEOUT_S)
        )
    except (OSError, TimeoutError) as exc:
        raise WorkerUnavailable(f"worker socket {path.name} does not answer ({exc or 'timed out'})") from None


async def _line(reader: asyncio.StreamReader, path: Path, timeout_s: float) -> dict[str, Any]:
    try:
        raw = await asyncio.wait_for(reader.readline(), timeout_s)
    except (OSError, TimeoutError, ValueError) as exc:
        raise WorkerUnavailable(f"worker socket {path.name}: no answer ({exc or 'timed out'})") from None
    if not raw:
        raise WorkerUnavailable(f"worker socket {path.name}: closed before answering")
    reply = json.loads(raw)
    if not isinstance(reply, dict):
        raise WorkerUnavailable(f"worker socket {path.name}: not an answer")
    return reply


async def ask(path: Path, request: dict[str, Any], timeout_s: float = TIMEOUT_S) -> Any:
    """REQUEST's result from the worker at PATH; Refusal with its error, WorkerUnavailable when it is not there."""
    reader, writer = await _open(path, timeout_s)
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        await asyncio.wait_for(writer.drain(), timeout_s)
        reply = await _line(reader, path, timeout_s)
    finally:
        writer.close()
    if not reply.get("ok"):
        raise Refusal(str(reply.get("error", "refused")))
    return reply.get("result")


class Forwarded:
    """An answer being relayed as it is: the first line, then (for a stream) its rows."""

    def __init__(self, path: Path, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: dict[str, Any]):
        self.path, self._reader, self._writer, self.first = path, reader, writer, first

    @property
    def stream(self) -> bool:
        return bool(self.first.get("stream"))

    async def rows(self, timeout_s: float = TIMEOUT_S) -> AsyncIterator[dict[str, Any]]:
        """The stream's rows; raises Refusal when it ended in an error."""
        try:
            while True:
                row = await _line(self._reader, self.path, timeout_s)
                if row.get("end") is True and set(row) <= {"end", "rows", "error"}:
                    if row.get("error"):
                        raise Refusal(str(row["error"]))
                    return
                yield row
        finally:
            self.close()

    def close(self) -> None:
        self._writer.close()


async def forward(path: Path, line: bytes, timeout_s: float = TIMEOUT_S) -> Forwarded:
    """Send LINE (one request) to the worker at PATH; its answer, to relay."""
    reader, writer = await _open(path, timeout_s)
    try:
        writer.write(line.rstrip(b"\n") + b"\n")
        await asyncio.wait_for(writer.drain(), timeout_s)
        first = await _line(reader, path, timeout_s)
    except BaseException:
        writer.close()
        raise
    answer = Forwarded(path, reader, writer, first)
    if not answer.stream:
        answer.close()
    return answer


class WorkerPeers:
    """The other workers of the host, for worker 0 (admin.verb.Peers)."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)

    async def each(self, verb: str, **args: Any) -> list[Any]:
        request = {"verb": verb, "args": args, "log": False}
        results = await asyncio.gather(
            *(ask(p, request, timeout_s=PEER_TIMEOUT_S) for p in self.paths), return_exceptions=True
        )
        for path, r in zip(self.paths, results, strict=True):
            if isinstance(r, BaseException):
                raise CmcdError(f"{verb}: worker {path.name} failed ({r}); run the command again") from None
        return list(results)
