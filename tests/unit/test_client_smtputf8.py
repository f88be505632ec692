"""The delivery client and SMTPUTF8 (RFC 6531), against aiosmtpd sinks on loopback that offer it or not:
the parameter goes when the server offers it and the message needs it; elsewhere domains go as A-labels."""

from __future__ import annotations

import pytest

from cmcd.deliver.client import SmtpClient
from tests.peers import Sink

ASCII_BODY = b"Received: from c by m with ESMTPSA id Q;\r\n\tThu, 1 Jan 2026 00:00:00 +0000\r\nSubject: a\r\n\r\nx\r\n"
UTF8_BODY = "Received: from c by m with UTF8SMTPSA id Q;\r\n\tdate\r\nSubject: Grüße\r\n\r\nx\r\n".encode()


@pytest.mark.parametrize(
    ("offered", "sender", "rcpt", "body", "sent_rcpt", "smtputf8"),
    [
        (True, "a@acme.test", "b@dst.test", ASCII_BODY, "b@dst.test", False),
        (True, "a@acme.test", "ユーザー@例え.jp", ASCII_BODY, "ユーザー@例え.jp", True),
        (True, "a@acme.test", "user@bücher.example", ASCII_BODY, "user@bücher.example", True),
        (True, "a@acme.test", "b@dst.test", UTF8_BODY, "b@dst.test", True),
        (False, "a@acme.test", "user@bücher.example", ASCII_BODY, "user@xn--bcher-kva.example", False),
        (False, "a@bücher.example", "b@dst.test", ASCII_BODY, "b@dst.test", False),
        (False, "a@acme.test", "b@dst.test", ASCII_BODY, "b@dst.test", False),
    ],
    ids=[
        "offered-ascii-no-parameter",
        "offered-utf8-local-part",
        "offered-idn-domain-as-written",
        "offered-utf8-header-of-an-smtputf8-message",
        "not-offered-idn-domain-as-a-label",
        "not-offered-idn-sender-as-a-label",
        "not-offered-ascii",
    ],
)
async def test_smtputf8_parameter_and_address_forms(
    offered: bool, sender: str, rcpt: str, body: bytes, sent_rcpt: str, smtputf8: bool
) -> None:
    with Sink("127.0.0.2", smtputf8=offered) as sink:
        client = await SmtpClient.connect(
            "mx.test", "127.0.0.2", sink.port, connect_timeout=2, command_timeout=5, data_timeout=5
        )
        assert await client.hello("cmcd.test", "disabled", None) is None
        assert ("SMTPUTF8" in client.extensions) is offered
        mail, rcpts, data = await client.transaction(sender, [rcpt], body)
        assert mail is None and [r.code for r in rcpts] == [250] and data is not None and data.code == 250
        await client.quit()
        (got,) = sink.wait_for(1)
        assert got.rcpt_tos == [sent_rcpt] and got.data == body
        assert got.mail_from == (sender if offered else sender.replace("bücher", "xn--bcher-kva"))
        assert ("SMTPUTF8" in got.mail_options) is smtputf8
