"""cmcd's delivery client against scripted servers on loopback: dot-stuffing, pipelining, STARTTLS safety."""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import AsyncIterator, Callable

import pytest
import trustme

from cmcd.deliver.client import SmtpClient, SmtpError, dot_stuff
from cmcd.deliver.engine import client_tls_context
from cmcd.deliver.routing import Host, Route
from tests.peers import Sink, SmtpSinkProcess


@pytest.mark.parametrize(
    ("body", "wire"),
    [
        (b"", b".\r\n"),
        (b"a\r\n", b"a\r\n.\r\n"),
        (b"no final newline", b"no final newline\r\n.\r\n"),
        (b".\r\n", b"..\r\n.\r\n"),
        (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"a\r\n..x\r\n", b"a\r\n...x\r\n.\r\n"),
        (b".leading\r\n", b"..leading\r\n.\r\n"),
        (b"a\r\n.", b"a\r\n..\r\n.\r\n"),
    ],
)
def test_dot_stuff(body: bytes, wire: bytes) -> None:
    assert dot_stuff(body) == wire


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], object]


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Script], object]]:
    servers: list[asyncio.Server] = []

    async def start(script: Script) -> int:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await script(reader, writer)  # type: ignore[misc]
            except ConnectionError:
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(run, "127.0.0.1", 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for s in servers:
        s.close()
        await s.wait_closed()


async def connect(port: int) -> SmtpClient:
    return await SmtpClient.connect("mx.test", "127.0.0.1", port, connect_timeout=2, command_timeout=2, data_timeout=2)


async def test_starttls_refuses_replies_injected_before_the_handshake(scripted: Callable[[Script], object]) -> None:
    """A server that sends '220 go ahead' and a forged reply in one write must not be believed."""

    async def evil(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 evil.test ESMTP\r\n")
        await reader.readline()
        writer.write(b"250-evil.test\r\n250 STARTTLS\r\n")
        await reader.readline()
        writer.write(b"220 2.0.0 Ready to start TLS\r\n250 2.1.0 Sender OK (injected)\r\n")
        await writer.drain()
        await reader.read()
        writer.close()

    port = await scripted(evil)  # type: ignore[misc]
    client = await connect(port)
    with pytest.raises(SmtpError) as err:
        await client.hello("cmcd.test", "opportunistic", client_tls_context())
    assert err.value.enhanced == "4.7.5" and "after its STARTTLS reply" in str(err.value)
    assert client.closed or not client.tls_version
    client.abort()


async def test_garbled_and_overlong_replies_fail_the_connection(scripted: Callable[[Script], object]) -> None:
    async def garbled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello there\r\n")
        await writer.drain()
        await reader.read()

    client = await connect(await scripted(garbled))  # type: ignore[misc]
    with pytest.raises(SmtpError, match="garbled"):
        await client.hello("cmcd.test", "opportunistic", None)

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 " + b"x" * 10_000)
        await writer.drain()
        await reader.read()

    client = await connect(await scripted(endless))  # type: ignore[misc]
    with pytest.raises(SmtpError, match="too long"):
        await client.hello("cmcd.test", "opportunistic", None)


async def test_silent_server_times_out(scripted: Callable[[Script], object]) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    client = await SmtpClient.connect(
        "mx.test",
        "127.0.0.1",
        await scripted(silent),
        connect_timeout=2,
        command_timeout=0.3,
        data_timeout=0.3,  # type: ignore[misc]
    )
    with pytest.raises(SmtpError, match="timed out"):
        await client.hello("cmcd.test", "opportunistic", None)


async def test_required_tls_without_starttls_fails(scripted: Callable[[Script], object]) -> None:
    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 plain.test\r\n")
        await reader.readline()
        writer.write(b"250-plain.test\r\n250 PIPELINING\r\n")
        await writer.drain()
        await reader.read()

    client = await connect(await scripted(plain))  # type: ignore[misc]
    with pytest.raises(SmtpError) as err:
        await client.hello("cmcd.test", "required", client_tls_context())
    assert err.value.enhanced == "4.7.5"
    client.abort()


async def test_pipelined_transactions_with_partial_acceptance_and_tls(ca: trustme.CA) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.test").configure_cert(server_ctx)

    def refuse(address: str) -> str | None:
        return "550 5.1.1 unknown" if address.startswith("bad") else None

    with Sink("127.0.0.2", tls_context=server_ctx, rcpt_reply=refuse) as sink:
        client = await SmtpClient.connect(
            "mx.test", "127.0.0.2", sink.port, connect_timeout=2, command_timeout=5, data_timeout=5
        )
        assert await client.hello("cmcd.test", "opportunistic", client_tls_context()) is None
        assert client.tls_version.startswith("TLSv1.")
        assert "PIPELINING" not in client.extensions  # aiosmtpd does not offer it: one command at a time
        mail, rcpts, data = await client.transaction("a@acme.test", ["good@x.test", "bad@x.test"], b"S: 1\r\n\r\n.\r\n")
        assert mail is None and [r.code for r in rcpts] == [250, 550] and data is not None and data.code == 250
        mail, rcpts, data = await client.transaction("a@acme.test", ["bad2@x.test"], b"S: 2\r\n\r\nx\r\n")
        assert mail is None and [r.code for r in rcpts] == [550] and data is None  # nothing sent
        mail, rcpts, data = await client.transaction("a@acme.test", ["ok@x.test"], b"S: 3\r\n\r\ny\r\n")
        assert data is not None and data.code == 250
        await client.quit()
        got = sink.wait_for(2)
        assert [(m.rcpt_tos, m.data, m.tls) for m in got] == [
            (["good@x.test"], b"S: 1\r\n\r\n.\r\n", True),
            (["ok@x.test"], b"S: 3\r\n\r\ny\r\n", True),
        ]
        assert sink.connections == 1


def test_attempt_order_keeps_preference_and_each_hosts_addresses_together() -> None:
    a = Host("a.test", ("127.0.0.1", "::1"), 25)
    b = Host("b.test", ("127.0.0.2",), 25)
    c = Host("c.test", ("127.0.0.3", "127.0.0.4"), 25)
    d = Host("d.test", ("127.0.0.5",), 25)
    route = Route("a.test,b.test,c.test,d.test", ((a,), (b, c), (d,)))
    seen = set()
    for seed in range(40):
        order = [(h.name, ip) for h, ip in route.attempt_order(random.Random(seed))]
        assert order[:2] == [("a.test", "127.0.0.1"), ("a.test", "::1")] and order[-1] == ("d.test", "127.0.0.5")
        middle = order[2:5]
        names = [n for n, _ in middle]
        assert names in (["b.test", "c.test", "c.test"], ["c.test", "c.test", "b.test"])
        seen.add(names[0])
    assert seen == {"b.test", "c.test"}  # equal preferences are shuffled


async def test_pipelining_with_postfix_smtp_sink() -> None:
    """Postfix's smtp-sink offers PIPELINING: MAIL, RCPTs and DATA go in one write, many messages per connection."""
    with SmtpSinkProcess("127.0.0.1", dump=True) as sink:
        client = await connect(sink.port)
        assert await client.hello("cmcd.test", "disabled", None) is None
        assert "PIPELINING" in client.extensions
        for n in range(5):
            body = f"Subject: {n}\r\n\r\n.\r\nline\r\n".encode()
            mail, rcpts, data = await client.transaction("a@acme.test", [f"r{n}@x.test", "s@y.test"], body)
            assert mail is None and [r.code for r in rcpts] == [250, 250] and data is not None and data.code == 250
        await client.quit()
        await sink.wait_for_async(5, 10)
        assert client.transactions == 5  # one connection, RSET between transactions
        assert all(b"\r\n.\r\nline" in m or b"\n.\nline" in m for m in sink.messages())
