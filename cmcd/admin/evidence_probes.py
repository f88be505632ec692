"""The evidence report's blocking measurements, each run in a worker thread: free space, a backup
restored into a private temporary file and read, the clock's NTP state (timedatectl, chronyc),
and TLS handshakes with the daemon's own listeners. Never changes anything it measures.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import ssl
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from cmcd import crypto
from cmcd.config import split_hostport
from cmcd.store.backup import restore_backup

#: each TLS probe connection: connect, SMTP dialogue and handshake must end within this
PROBE_TIMEOUT_S = 5.0
#: tables and columns that would hold a message body; a backup must have none of them
BODY_TABLES = frozenset({"messages", "recipients", "bodies", "spool", "events", "audit_events", "api_requests"})
BODY_COLUMNS = frozenset({"body", "body_enc", "raw", "raw_enc", "content", "payload", "message", "data"})


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def inspect_backup(file: Path, key_file: Path, store_path: Path, keys: crypto.DataKeys) -> dict[str, Any]:
    """Restore FILE (backup.py's own restore) into a private temporary directory beside the store,
    then read the copy: integrity and row counts (from the restore's verification), whether KEYS
    open it, and every table and column that would hold a message body. The copy is removed."""
    with tempfile.TemporaryDirectory(prefix=".cmcd-evidence-", dir=store_path.parent) as tmp:
        restored = restore_backup(file, key_file, Path(tmp) / "store.db", now=time.time())
        conn = sqlite3.connect(restored.store_path.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            tables = [str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            body_columns = [
                f"{t}.{c[1]}" for t in tables for c in conn.execute(f'PRAGMA table_info("{t}")') if c[1] in BODY_COLUMNS
            ]
            row = conn.execute("SELECT value FROM meta WHERE key = 'key_check'").fetchone()
        finally:
            conn.close()
    try:
        key_ok = row is not None and keys.decrypt(bytes.fromhex(row[0])) == "cmcd key check"
    except Exception:
        key_ok = False
    v = restored.verified
    return {
        "tables": tables,
        "body_tables": sorted(t for t in tables if t in BODY_TABLES),
        "body_columns": body_columns,
        "integrity": v.integrity,
        "rows": dict(v.rows),
        "data_key_ok": key_ok,
    }


def ntp_state() -> tuple[bool | None, str]:
    """(synchronised?, what was asked and answered); None when neither timedatectl nor chronyc could tell."""
    tried = []
    for argv in (["timedatectl", "show", "-p", "NTPSynchronized", "--value"], ["chronyc", "-n", "tracking"]):
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=5, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            tried.append(f"{argv[0]}: {type(exc).__name__}")
            continue
        out = proc.stdout.strip()
        if proc.returncode != 0:
            said = (proc.stderr.strip() or out).splitlines()
            tried.append(f"{argv[0]}: exit {proc.returncode} ({said[0][:100] if said else 'no output'})")
            continue
        if argv[0] == "timedatectl":
            if out in ("yes", "no"):
                return out == "yes", f"timedatectl: NTPSynchronized={out}"
            tried.append(f"timedatectl: {out[:40]!r}")
            continue
        leap = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Leap status")), "")
        if leap:
            return leap == "Normal", f"chronyc tracking: Leap status {leap}"
        tried.append("chronyc: no Leap status")
    return None, "; ".join(tried)


# -- TLS probes ------------------------------------------------------------------------------------

_OLD = ("TLSv1", "TLSv1.1")
_LABEL = {"TLSv1": "TLS 1.0", "TLSv1.1": "TLS 1.1"}


def _read_reply(sock: socket.socket) -> tuple[int, list[str]]:
    """One SMTP reply (all its lines), read byte by byte so nothing past it is consumed."""
    data = b""
    lines: list[str] = []
    while True:
        ch = sock.recv(1)
        if not ch:
            raise ConnectionError("the server closed the connection")
        data += ch
        if data.endswith(b"\r\n"):
            line = data[:-2].decode("utf-8", "replace")
            data = b""
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return int(line[:3]), lines
        if len(data) > 4096:
            raise ConnectionError("reply line too long")


def _connect(address: str, starttls: bool) -> tuple[socket.socket, list[str]]:
    """A TCP connection to ADDRESS, past EHLO and STARTTLS when STARTTLS; and the EHLO keywords."""
    host, port = split_hostport(address)
    sock = socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S)
    keywords: list[str] = []
    if starttls:
        try:
            code, _ = _read_reply(sock)
            if code != 220:
                raise ConnectionError(f"greeting {code}")
            sock.sendall(b"EHLO evidence.cmcd.invalid\r\n")
            code, lines = _read_reply(sock)
            keywords = [ln[4:].split(" ")[0].upper() for ln in lines[1:]]
            sock.sendall(b"STARTTLS\r\n")
            code, _ = _read_reply(sock)
            if code != 220:
                raise ConnectionError(f"STARTTLS answered {code}")
        except BaseException:
            sock.close()
            raise
    return sock, keywords


def _handshake(address: str, starttls: bool, version: str | None, ciphers: str | None = None) -> dict[str, Any]:
    """One handshake offering only VERSION (None: what this host's OpenSSL offers by default)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # asking what the listener negotiates, not whether to trust it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0 and 1.1 are offered on purpose
        try:
            if version is not None:
                v = {
                    "TLSv1": ssl.TLSVersion.TLSv1,
                    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
                    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
                }
                ctx.minimum_version = ctx.maximum_version = v[version]
                ctx.set_ciphers(ciphers or "ALL:@SECLEVEL=0")
        except (ValueError, ssl.SSLError) as exc:
            return {"result": "untested", "detail": f"this host's OpenSSL cannot offer it ({exc})"}
    try:
        sock, keywords = _connect(address, starttls)
    except OSError as exc:
        return {"result": "error", "detail": f"cannot connect: {exc}"}
    try:
        with ctx.wrap_socket(sock) as tls:
            cipher = tls.cipher()
            return {
                "result": "accepted",
                "version": tls.version(),
                "cipher": cipher[0] if cipher else "",
                "keywords": keywords,
            }
    except (ssl.SSLError, ConnectionError, EOFError) as exc:
        return {"result": "refused", "detail": str(exc)[:120], "keywords": keywords}
    except OSError as exc:
        return {"result": "error", "detail": str(exc)[:120], "keywords": keywords}
    finally:
        sock.close()


def probe_listener(address: str, starttls: bool) -> dict[str, Any]:
    """Offer the listener at ADDRESS TLS 1.0, 1.1, 1.2 alone, weak ciphers over 1.2, then the best
    this host can: which it took, at what version and cipher, and (STARTTLS) whether AUTH was
    offered before TLS."""
    out = {name: _handshake(address, starttls, name) for name in (*_OLD, "TLSv1.2")}
    out["weak"] = _handshake(address, starttls, "TLSv1.2", "NULL:EXPORT:RC4:3DES:DES:MD5:aNULL:@SECLEVEL=0")
    out["best"] = _handshake(address, starttls, None)
    return out


def probe_text(res: dict[str, Any], starttls: bool) -> str:
    parts = []
    for name in _OLD:
        parts.append(f"{_LABEL[name]} {res[name]['result']}")
    r12, best, weak = res["TLSv1.2"], res["best"], res["weak"]
    if r12["result"] == "accepted":
        parts.append(f"TLS 1.2 accepted with {r12['cipher']}")
    else:
        parts.append(f"TLS 1.2 {r12['result']}")
    parts.append(f"weak ciphers (NULL, EXPORT, RC4, 3DES, DES, MD5, anonymous) {weak['result']}")
    if best["result"] == "accepted":
        parts.append(f"negotiated by default: {best['version']} {best['cipher']}")
    else:
        parts.append(f"default handshake {best['result']}: {best.get('detail', '')}")
    if starttls:
        kw = best.get("keywords") or []
        parts.append("AUTH offered before STARTTLS" if "AUTH" in kw else "no AUTH before STARTTLS")
    return "; ".join(parts)


def judge_probe(res: dict[str, Any], starttls: bool) -> tuple[str, str]:
    accepted_old = [n for n in _OLD if res[n]["result"] == "accepted"]
    if accepted_old:
        return "fail", f"the listener accepts {', '.join(accepted_old)}"
    if res["weak"]["result"] == "accepted":
        return "fail", f"the listener accepts a weak cipher ({res['weak'].get('cipher')})"
    if res["best"]["result"] != "accepted":
        return "fail", "no TLS handshake succeeded: " + str(res["best"].get("detail", ""))
    if starttls and "AUTH" in (res["best"].get("keywords") or []):
        return "fail", "AUTH is offered before TLS: passwords could cross in the clear"
    untested = [n for n in _OLD if res[n]["result"] != "refused"]
    if untested:
        return "attention", f"{', '.join(untested)} could not be tried from this host: {res[untested[0]].get('detail')}"
    return "ok", "TLS 1.0 and 1.1 refused by the listener itself; TLS 1.2+ with strong ciphers"
