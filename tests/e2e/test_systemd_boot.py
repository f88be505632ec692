"""The systemd unit booted for real: systemd as PID 1 in a systemd-nspawn container of Debian 12.

The container's root is a debootstrap of bookworm (minbase + systemd), built once and cached in
ROOTFS (about 300 MB, a minute or two from the Debian mirror); each test boots it with
--volatile=overlay, so nothing a test does stays. cmcd is installed inside the way README's
"Installing on a Debian host" says, except that /opt/cmcd's site-packages are this checkout's
.venv (bind-mounted read-only, with the checkout at its own path), so the test runs the code
under test and needs no network. Needs root, systemd-nspawn (systemd-container) and debootstrap;
skipped (failed under CMCD_REQUIRE_PEERS=1) without them.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need
from tests.peers import free_port

ROOT = Path(__file__).resolve().parents[2]
INNER_ROOT = "/srv/cmcd-src"  # where the container sees this checkout
ROOTFS = Path("/var/cache/cmcd-test-rootfs")
MARK = ROOTFS / ".cmcd-rootfs-2"  # written last: a rootfs without it is incomplete
PACKAGES = "systemd,systemd-sysv,dbus,procps,python3,python3-venv,ca-certificates"  # procps: /bin/kill (ExecReload)
MIRROR = "http://deb.debian.org/debian"


def build_rootfs() -> None:
    """debootstrap bookworm into ROOTFS once (under a lock; a half-built one is thrown away)."""
    ROOTFS.parent.mkdir(parents=True, exist_ok=True)
    with open(str(ROOTFS) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if MARK.exists():
            return
        work = Path(str(ROOTFS) + ".build")
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ROOTFS, ignore_errors=True)
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm", str(work), MIRROR],
            check=True, capture_output=True, timeout=1200,
        )  # fmt: skip
        subprocess.run(
            ["chroot", str(work), "/usr/bin/python3", "-m", "venv", "--without-pip", "/opt/cmcd"], check=True
        )
        work.rename(ROOTFS)
        MARK.write_text(PACKAGES + "\n")


class Container:
    """A booted container; run() executes a command inside it (nsenter into PID 1's namespaces)."""

    def __init__(self, files: Path):
        site = Path(sysconfig.get_paths()["purelib"])  # this venv's site-packages
        inner_site = "/opt/cmcd/lib/python3.11/site-packages"
        self.log = files / "console.log"
        self._console = self.log.open("w")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--volatile=overlay",
             "-D", str(ROOTFS), f"--bind-ro={ROOT}:{INNER_ROOT}", f"--bind-ro={site}:{inner_site}",
             f"--bind-ro={files}:/srv/cmcd-test", "--boot"],
            stdin=subprocess.DEVNULL, stdout=self._console, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.leader = 0
        deadline = time.monotonic() + 90
        state = ""
        while time.monotonic() < deadline and self.proc.poll() is None:
            self.leader = self.leader or _child_named(self.proc.pid, "systemd")
            if self.leader:
                state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.5)
        self.close()
        raise AssertionError(
            f"the container did not boot (leader {self.leader})  (state {state!r}); console:\n{self.log.read_text()[-3000:]}"
        )

    def run(self, *cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "--", *cmd],
            capture_output=True, text=True, timeout=timeout, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )  # fmt: skip
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)}: exit {out.returncode}\n{out.stdout}\n{out.stderr}")
        return out

    def sh(self, script: str, check: bool = True) -> str:
        return self.run("/bin/sh", "-ec", script, check=check).stdout

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # nspawn asks the container's systemd to power off
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._console.close()


def _child_named(pid: int, comm: str) -> int:
    """The first descendant of PID whose command name is COMM (0 if none yet)."""
    todo = [pid]
    while todo:
        p = todo.pop(0)
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for c in map(int, children):
            try:
                if Path(f"/proc/{c}/comm").read_text().strip() == comm:
                    return c
            except OSError:
                continue
            todo.append(c)
    return 0


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    if os.geteuid() != 0:
        pytest.skip("booting a container needs root")
    need("systemd-nspawn")
    need("debootstrap")
    need("nsenter")
    build_rootfs()
    files = tmp_path_factory.mktemp("unit")
    for name in ("cmcd.service", "cmcd.sysusers", "cmcd.tmpfiles"):
        shutil.copy(ROOT / "systemd" / name, files / name)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=mail.boot.test",
         "-keyout", str(files / "key.pem"), "-out", str(files / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    smtp, metrics = free_port(), free_port()  # the container shares the host's network
    config = (ROOT / "etc" / "cmcd.toml").read_text()
    for old, new in (
        ('hostname = "localhost"', 'hostname = "mail.boot.test"'),
        ('listen = ["127.0.0.1:587"]', f'listen = ["127.0.0.1:{smtp}"]'),
        ('tls_cert = ""\ntls_key = ""', 'tls_cert = "/etc/cmcd/tls/cert.pem"\ntls_key = "/etc/cmcd/tls/key.pem"'),
        ('listen = "127.0.0.1:9465"', f'listen = "127.0.0.1:{metrics}"'),
    ):
        assert old in config, old
        config = config.replace(old, new, 1)
    (files / "cmcd.toml").write_text(config)
    # the checkout is imported from INNER_ROOT, not through the venv's editable-install hook: that names
    # the checkout's own path, which may be under /tmp, where the container's systemd mounts a tmpfs
    run = f"#!/bin/sh\nPYTHONPATH={INNER_ROOT} exec /opt/cmcd/bin/python3 -m"
    (files / "cmcd").write_text(f'{run} cmcd.daemon "$@"\n')
    (files / "cmcctl").write_text(f'{run} cmcd.admin.cli "$@"\n')
    c = Container(files)
    try:
        # README, "Installing on a Debian host", with /srv/cmcd-test as the checkout
        c.sh(
            "cd /srv/cmcd-test\n"
            "install -m 0755 cmcd /usr/bin/cmcd && install -m 0755 cmcctl /usr/bin/cmcctl\n"
            "install -m 0644 cmcd.sysusers /usr/lib/sysusers.d/cmcd.conf && systemd-sysusers\n"
            "install -m 0644 cmcd.tmpfiles /usr/lib/tmpfiles.d/cmcd.conf && systemd-tmpfiles --create\n"
            "install -m 0640 -g cmcd cmcd.toml /etc/cmcd/cmcd.toml\n"
            "install -d -m 0750 -g cmcd /etc/cmcd/tls\n"
            "install -m 0644 cert.pem /etc/cmcd/tls/cert.pem && install -m 0640 -g cmcd key.pem /etc/cmcd/tls/key.pem\n"
            "install -m 0644 cmcd.service /etc/systemd/system/cmcd.service\n"
            "systemctl daemon-reload\n"
        )
        yield c
    finally:
        c.close()


def _show(c: Container, *props: str) -> dict[str, str]:
    out = c.run("systemctl", "show", "cmcd", "-p", ",".join(props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_the_unit_starts_reloads_and_stops_under_systemd(container: Container) -> None:
    c = container
    start = c.run("systemctl", "start", "cmcd", check=False)  # Type=notify: returns once READY=1 came
    journal = c.run("journalctl", "-u", "cmcd", "--no-pager", "-o", "cat", check=False).stdout
    assert start.returncode == 0, f"systemctl start cmcd failed: {start.stderr}\njournal:\n{journal[-4000:]}"
    assert c.run("systemctl", "is-active", "cmcd").stdout.strip() == "active"
    shown = _show(c, "MainPID", "NRestarts", "StatusErrno", "Result")
    pid = shown["MainPID"]
    assert pid != "0" and shown["NRestarts"] == "0"
    assert "event=ready" in c.run("journalctl", "-u", "cmcd", "--no-pager", "-o", "cat").stdout

    # the hardening is in force in the running process (the kernel's view, not the unit file's)
    status = c.run("cat", f"/proc/{pid}/status").stdout
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"  # a filter (SystemCallFilter=)
    assert int(fields["CapBnd"].strip(), 16) == 1 << 10  # CAP_NET_BIND_SERVICE only
    assert fields["Uid"].split()[0] != "0"
    assert c.sh(f"stat -c %U /proc/{pid}").strip() == "cmcd"
    # as cmcd, in cmcd's own mount namespace: only the ReadWritePaths (and its *Directory=s) take writes
    probe = (
        f"nsenter -t {pid} -m setpriv --reuid=cmcd --regid=cmcd --clear-groups "
        "sh -c 'for d in /etc/cmcd /usr/lib /opt/cmcd /var/tmp /var/spool/cmcd /var/lib/cmcd /run/cmcd; do "
        'if touch "$d/.probe" 2>/dev/null; then rm -f "$d/.probe"; echo "$d rw"; else echo "$d ro"; fi; done\''
    )
    access = dict(line.split() for line in c.sh(probe).splitlines())
    assert access == {
        "/etc/cmcd": "ro", "/usr/lib": "ro", "/opt/cmcd": "ro", "/var/tmp": "rw",  # PrivateTmp: its own /var/tmp
        "/var/spool/cmcd": "rw", "/var/lib/cmcd": "rw", "/run/cmcd": "rw",
    }  # fmt: skip
    assert c.sh("stat -c '%a %U %G' /run/cmcd/admin.sock").split()[0] == "660"
    assert '"pid"' in c.run("cmcctl", "--socket", "/run/cmcd/admin.sock", "--json", "status").stdout

    # systemctl reload: SIGHUP, the same process, still active, the reload logged
    c.run("systemctl", "reload", "cmcd")
    deadline = time.monotonic() + 30
    while "event=reloaded" not in c.run("journalctl", "-u", "cmcd", "--no-pager", "-o", "cat").stdout:
        assert time.monotonic() < deadline, "no event=reloaded in the journal after systemctl reload"
        time.sleep(0.5)
    assert _show(c, "MainPID")["MainPID"] == pid
    assert c.run("systemctl", "is-active", "cmcd").stdout.strip() == "active"

    # systemctl stop: well within TimeoutStopSec (60 s), a clean exit, not a kill
    t = time.monotonic()
    c.run("systemctl", "stop", "cmcd")
    took = time.monotonic() - t
    shown = _show(c, "Result", "ExecMainStatus", "ExecMainCode")
    assert took < 30, f"stop took {took:.1f} s"
    assert shown["Result"] == "success" and shown["ExecMainStatus"] == "0", shown
