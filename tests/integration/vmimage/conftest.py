"""A real OpenSSH server for the SSH layer's tests: ``sshd -D -e -f CONFIG`` on
127.0.0.1 at a free port, with its own host key and an authorized_keys holding the
test's pod key; killed at teardown."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sshd_support import SSHD, Sshd, free_port

from criv.vmimage.sshkeys import HostKeyPin, ensure_pod_key


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    if not os.path.exists(SSHD) or shutil.which("ssh-keygen") is None:
        pytest.skip("openssh-server is not installed (make apt)")
    d = tmp_path / "sshd"
    d.mkdir(mode=0o700)
    key = ensure_pod_key(tmp_path / "keys", "criv-test")
    (d / "authorized_keys").write_text(key.public_line + "\n")
    hostkey = d / "host_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)], check=True)
    printed = subprocess.run(
        ["ssh-keygen", "-l", "-f", f"{hostkey}.pub"], check=True, capture_output=True, text=True
    ).stdout
    pin = HostKeyPin.parse(printed)
    port = free_port()
    cfg = d / "sshd_config"
    cfg.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {hostkey}\nPidFile none\n"
        f"AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "StrictModes no\nPrintMotd no\nPrintLastLog no\nPermitTTY yes\nLogLevel ERROR\n"
    )
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
    proc = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                pytest.fail(f"sshd exited {proc.returncode}: {err}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("sshd did not listen within 10s")
                time.sleep(0.05)
        yield Sshd(port, d, key, pin, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
