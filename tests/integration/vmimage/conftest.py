"""Real SSH servers for the SSH layer's tests, on 127.0.0.1 at a free port, each with its
own host key and an authorized key that is the test's pod key; killed at teardown.

- OpenSSH: ``sshd -D -e -f CONFIG`` (``AuthorizedKeysFile`` in the test's directory);
- dropbear (what the VM test disk runs): ``dropbear -F -E``, in a mount namespace of
  its own where the test's directory is bind-mounted on /root (dropbear reads only
  ``~/.ssh/authorized_keys``); the host's /root is untouched;
- ``sshd_in_netns``: OpenSSH inside a network namespace of its own (a pod's, for criv).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sshd_support import SSHD, Sshd, free_port

from criv.vmimage.sshkeys import HostKeyPin, PodKey, ensure_pod_key, pin_from_console
from criv.vmimage.sshwire import connect_in_netns

DROPBEAR = "/usr/sbin/dropbear"


@pytest.fixture(params=["openssh", "dropbear"])
def sshd(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Sshd]:
    key = ensure_pod_key(tmp_path / "keys", "criv-test")
    d = tmp_path / "server"
    d.mkdir(mode=0o700)
    port = free_port()
    if request.param == "openssh":
        cmd, pin = _openssh(d, key, port)
    else:
        cmd, pin = _dropbear(d, key, port)
    with _serve(cmd, d / "server.log", port, None) as proc:
        yield Sshd(port, d, key, pin, proc)


@pytest.fixture
def sshd_in_netns(tmp_path: Path) -> Iterator[tuple[Sshd, Path]]:
    """OpenSSH listening on 127.0.0.1 inside a network namespace of its own."""
    name = f"criv-sshtest-{os.getpid()}-{tmp_path.name[-20:]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        key = ensure_pod_key(tmp_path / "keys", "criv-test")
        d = tmp_path / "server"
        d.mkdir(mode=0o700)
        port = free_port()
        cmd, pin = _openssh(d, key, port)
        netns = Path("/run/netns") / name
        with _serve(["ip", "netns", "exec", name, *cmd], d / "server.log", port, netns) as proc:
            yield Sshd(port, d, key, pin, proc), netns
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


@contextlib.contextmanager
def _serve(
    cmd: list[str], log: Path, port: int, netns: Path | None
) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{cmd[0]} exited {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if netns is None:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                else:
                    connect_in_netns(netns, "127.0.0.1", port, 1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{cmd[0]} did not listen within 10s")
                time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _openssh(d: Path, key: PodKey, port: int) -> tuple[list[str], HostKeyPin]:
    if not os.path.exists(SSHD) or shutil.which("ssh-keygen") is None:
        pytest.skip("openssh-server is not installed (make apt)")
    (d / "authorized_keys").write_text(key.public_line + "\n")
    hostkey = d / "host_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)], check=True)
    printed = subprocess.run(
        ["ssh-keygen", "-l", "-f", f"{hostkey}.pub"], check=True, capture_output=True, text=True
    ).stdout
    cfg = d / "sshd_config"
    cfg.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {hostkey}\nPidFile none\n"
        f"AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "StrictModes no\nPrintMotd no\nPrintLastLog no\nPermitTTY yes\nLogLevel ERROR\n"
    )
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
    return [SSHD, "-D", "-e", "-f", str(cfg)], HostKeyPin.parse(printed)


def _dropbear(d: Path, key: PodKey, port: int) -> tuple[list[str], HostKeyPin]:
    if not os.path.exists(DROPBEAR) or shutil.which("dropbearkey") is None:
        pytest.skip("dropbear is not installed (make apt)")
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    home = d / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    os.chmod(home, 0o700)
    (home / ".ssh" / "authorized_keys").write_text(key.public_line + "\n")
    hostkey = d / "host_ed25519"
    # dropbearkey prints what dropbear prints at first start: "Public key portion is:",
    # the public key line, "Fingerprint: SHA256:..."
    printed = subprocess.run(
        ["dropbearkey", "-t", "ed25519", "-f", str(hostkey)], check=True, capture_output=True
    ).stdout
    pin = pin_from_console(printed)
    assert pin is not None, printed
    server = (
        f"mount --bind {home} /root && exec {DROPBEAR} -F -E -s -m -j -k"
        f" -p 127.0.0.1:{port} -r {hostkey} -P {d}/dropbear.pid"
    )
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", server], pin
