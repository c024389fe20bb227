"""A real OpenSSH server for the SSH layer's tests (the fixture is in conftest.py)."""

from __future__ import annotations

import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from criv.vmimage.sshconn import SSHTarget
from criv.vmimage.sshkeys import HostKeyPin, PodKey

SSHD = "/usr/sbin/sshd"


@dataclass
class Sshd:
    port: int
    dir: Path
    key: PodKey
    pin: HostKeyPin
    proc: subprocess.Popen[bytes]

    def target(self, **kw: object) -> SSHTarget:
        args: dict[str, object] = {
            "host": "127.0.0.1", "port": self.port, "user": "root", "key": self.key.load(),
            "pin": self.pin, "connect_timeout": 5.0,
        }  # fmt: skip
        args.update(kw)
        return SSHTarget(**args)  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
