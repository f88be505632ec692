"""TLS as a scanner sees it: sslscan against the implicit-TLS port, STARTTLS on the submission port and the API."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import trustme

from tests.conftest import Cmcd, need

WEAK = re.compile(r"RC4|DES|NULL|EXPORT|anon|MD5|IDEA|SEED|CAMELLIA128", re.I)


def scan(port: int, starttls: bool) -> str:
    sslscan = need("sslscan")
    args = [sslscan, "--no-colour", "--no-fallback", "--no-heartbleed", "--no-check-certificate"]
    if starttls:
        args.append("--starttls-smtp")
    proc = subprocess.run([*args, f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def with_api(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> Iterator[Cmcd]:
    d = Cmcd(tmp_path_factory.mktemp("tls-api"), ca, {"api": {"listen": "127.0.0.1:0"}}).start()
    yield d
    d.stop()


@pytest.mark.peer
@pytest.mark.parametrize("listener", ["implicit-tls", "starttls", "api"])
def test_no_protocol_below_tls_1_2_and_no_weak_cipher(with_api: Cmcd, listener: str) -> None:
    port = {"implicit-tls": with_api.smtps_port, "starttls": with_api.smtp_port, "api": with_api.api_port}[listener]
    out = scan(port, listener == "starttls")
    protocols = dict(re.findall(r"^(SSLv[23]|TLSv1\.[0-3])\s+(enabled|disabled)", out, re.M))
    assert protocols.get("TLSv1.2") == "enabled" and protocols.get("TLSv1.3") == "enabled", out
    for old in ("SSLv2", "SSLv3", "TLSv1.0", "TLSv1.1"):
        assert protocols.get(old) == "disabled", (old, out)
    accepted = re.findall(r"^(?:Preferred|Accepted)\s+(TLSv1\.[0-3])\s+(\d+) bits\s+(\S+)", out, re.M)
    assert accepted, out
    for version, bits, cipher in accepted:
        assert version in ("TLSv1.2", "TLSv1.3") and int(bits) >= 128 and not WEAK.search(cipher), (version, cipher)


def _served_certificate(d: Cmcd) -> bytes:
    import socket

    ctx = d.client_context()
    ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", d.smtps_port), timeout=10) as raw:
        with ctx.wrap_socket(raw) as tls:
            cert = tls.getpeercert(binary_form=True)
            assert cert is not None
            return cert


def test_certificate_reloads_on_sighup(cmcd: Any) -> None:
    import signal

    import trustme

    before = _served_certificate(cmcd)
    fresh = cmcd.ca.issue_cert("localhost", "127.0.0.1", "renewed.test")  # a renewed certificate, same CA
    tls = cmcd.root / "tls"
    fresh.cert_chain_pems[0].write_to_path(str(tls / "cert.pem"))
    fresh.private_key_pem.write_to_path(str(tls / "key.pem"))
    assert isinstance(cmcd.ca, trustme.CA) and cmcd.proc is not None
    cmcd.proc.send_signal(signal.SIGHUP)
    cmcd.wait_log("event=reloaded")
    after = _served_certificate(cmcd)
    assert after != before and b"renewed.test" in after
