#!/usr/bin/env python3
"""DKIM signing benchmark: cmcd.dkim against dkimpy, same message and keys, same run.

    .venv/bin/python bench/dkim.py [--rounds R] [--seconds S] [--body-kb K]

Signs one typical message (multipart/alternative, text and HTML, about 4 KB in all unless
--body-kb says otherwise; 9 header fields signed) with RSA-2048, with Ed25519, and with both
(one message, two DKIM-Signature fields), relaxed/relaxed, through cmcd.dkim.sign and through
dkimpy's dkim.sign (for "both": two dkim.sign calls, RSA then Ed25519, as dkimpy signs one key
per call). Also timed: the bare private-key operations through `cryptography` (RSA-2048
PKCS#1 v1.5 over SHA-256, Ed25519), the floor under any signer in Python on this machine.

Per round every case runs for S seconds (default 0.5) in an order that rotates from round to
round; the table shows, per case, the median over the R rounds (default 5) of the mean time
per signing call, and the best round. The machine is shared and its speed varies from minute
to minute: compare numbers from the same run only. dkimpy needs PyNaCl for Ed25519; without
it those rows say n/a.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# This file is named dkim.py too: keep its own folder off the path so "dkim" is dkimpy.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
dkimpy: Any = importlib.import_module("dkim")

from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa  # noqa: E402

from cmcd import dkim  # noqa: E402

DOMAIN = "bench.example"


def typical_message(body_kb: float) -> bytes:
    text_line = "Hello Suzie,  here is the weekly report you asked for; numbers are attached below.\r\n"
    html_line = '    <p class="para">Hello Suzie, here is the <b>weekly report</b> you asked for.</p>\r\n'
    per_part = max(1, int(body_kb * 1024 / 2 / len(text_line)))
    head = (
        "Received: from client.example (client.example [192.0.2.7])\r\n"
        "\tby mx.bench.example (cmcd) with ESMTPSA id 4F3A9B2C1D; Mon, 6 May 2024 10:15:01 +0000\r\n"
        "From: Joe Example <joe@bench.example>\r\n"
        "To: Suzie Q <suzie@shopping.example.net>, Bob <bob@shopping.example.net>\r\n"
        "Cc: team@bench.example\r\n"
        "Subject: Weekly report: week 19\r\n"
        "Date: Mon, 6 May 2024 10:15:00 +0000\r\n"
        "Message-ID: <20240506101500.4F3A9B2C1D@bench.example>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/alternative; boundary="=_b1"\r\n'
        "X-Mailer: bench\r\n"
        "\r\n"
    )
    body = (
        "--=_b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + text_line * per_part
        + "--=_b1\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + "<html>\r\n  <body>\r\n"
        + html_line * per_part
        + "  </body>\r\n</html>\r\n--=_b1--\r\n"
    )
    return (head + body).encode()


def measure(fn: Callable[[], object], seconds: float) -> float:
    """Mean microseconds per call over about `seconds`."""
    fn()
    n, start = 0, time.perf_counter()
    deadline = start + seconds
    batch = 1
    while True:
        for _ in range(batch):
            fn()
        n += batch
        now = time.perf_counter()
        if now >= deadline:
            return (now - start) / n * 1e6
        batch = min(batch * 2, 256)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.5, help="per case per round")
    ap.add_argument("--body-kb", type=float, default=3.5, help="body size in KiB (the header adds about 0.6)")
    args = ap.parse_args()

    message = typical_message(args.body_kb)
    rsa_key = dkim.DkimKey.generate_rsa(DOMAIN, "rsa")
    ed_key = dkim.DkimKey.generate_ed25519(DOMAIN, "ed")
    assert isinstance(rsa_key.private_key, rsa.RSAPrivateKey)
    assert isinstance(ed_key.private_key, ed25519.Ed25519PrivateKey)
    rsa_private, ed_private = rsa_key.private_key, ed_key.private_key
    rsa_pem = rsa_private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    ed_seed = base64.b64encode(
        ed_private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
    )
    try:
        import nacl.signing  # noqa: F401

        have_nacl = True
    except ImportError:
        have_nacl = False

    # dkimpy signs the same header list as cmcd (taken from cmcd's h=, oversigned names included).
    signed = dkim.sign(message, [rsa_key, ed_key])
    h_value = signed.split(b" h=", 1)[1].split(b";", 1)[0]
    include = [n.strip() for n in h_value.replace(b"\r\n", b"").split(b":")]
    records = {f"{k.dns_name}.".encode(): k.dns_txt().encode() for k in (rsa_key, ed_key)}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)

    d = dkimpy.DKIM(signed)
    assert d.verify(idx=0, dnsfunc=dnsfunc), "cmcd's RSA signature does not verify with dkimpy"
    if have_nacl:
        assert d.verify(idx=1, dnsfunc=dnsfunc), "cmcd's Ed25519 signature does not verify with dkimpy"

    def dkimpy_sign(msg: bytes, selector: bytes, key: bytes, algorithm: bytes) -> bytes:
        return dkimpy.sign(
            msg,
            selector,
            DOMAIN.encode(),
            key,
            canonicalize=(b"relaxed", b"relaxed"),
            signature_algorithm=algorithm,
            include_headers=include,
        )

    def dkimpy_both() -> bytes:
        first = dkimpy_sign(message, b"rsa", rsa_pem, b"rsa-sha256") + message
        return dkimpy_sign(first, b"ed", ed_seed, b"ed25519-sha256")

    digest_input = b"x" * 600  # about the size of the signed header data
    cases: dict[str, Callable[[], object] | None] = {
        "cmcd rsa-2048": lambda: dkim.sign(message, [rsa_key]),
        "cmcd ed25519": lambda: dkim.sign(message, [ed_key]),
        "cmcd both": lambda: dkim.sign(message, [rsa_key, ed_key]),
        "dkimpy rsa-2048": lambda: dkimpy_sign(message, b"rsa", rsa_pem, b"rsa-sha256"),
        "dkimpy ed25519": (lambda: dkimpy_sign(message, b"ed", ed_seed, b"ed25519-sha256")) if have_nacl else None,
        "dkimpy both": dkimpy_both if have_nacl else None,
        "floor: OpenSSL rsa-2048 sign": lambda: rsa_private.sign(digest_input, padding.PKCS1v15(), hashes.SHA256()),
        "floor: OpenSSL ed25519 sign": lambda: ed_private.sign(hashlib.sha256(digest_input).digest()),
    }
    runnable = [name for name, fn in cases.items() if fn is not None]
    results: dict[str, list[float]] = {name: [] for name in runnable}
    print(
        f"message {len(message)} bytes, {len(include)} h= entries; {args.rounds} rounds x {args.seconds}s per case;"
        f" load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    for r in range(args.rounds):
        order = runnable[r % len(runnable) :] + runnable[: r % len(runnable)]
        for name in order:
            fn = cases[name]
            assert fn is not None
            results[name].append(measure(fn, args.seconds))
        print(f"  round {r + 1}/{args.rounds} done, load average {os.getloadavg()[0]:.2f}", flush=True)

    med = {name: statistics.median(v) for name, v in results.items()}
    print(f"\n{'case':32} {'median us':>10} {'best us':>9} {'sign/s':>8}")
    for name in cases:
        if name not in med:
            print(f"{name:32} {'n/a (PyNaCl missing)':>29}")
            continue
        print(f"{name:32} {med[name]:10.1f} {min(results[name]):9.1f} {1e6 / med[name]:8.0f}")
    print("\ndkimpy / cmcd (median time per signing call):")
    for what in ("rsa-2048", "ed25519", "both"):
        if f"dkimpy {what}" in med:
            print(f"  {what:9} {med[f'dkimpy {what}'] / med[f'cmcd {what}']:6.1f}x")
    best = {name: min(v) for name, v in results.items()}
    floor = best["floor: OpenSSL rsa-2048 sign"] + best["floor: OpenSSL ed25519 sign"]
    print(
        f"\ncmcd both, best rounds: {best['cmcd both']:.0f} us, of which {floor:.0f} us are the two bare"
        f" private-key operations; cmcd's own work (parse, canonicalize, hash, format) about"
        f" {best['cmcd both'] - floor:.0f} us (ed25519 alone: {best['cmcd ed25519'] - best['floor: OpenSSL ed25519 sign']:.0f} us)"
    )


if __name__ == "__main__":
    main()
