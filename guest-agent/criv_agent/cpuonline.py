"""Online the vCPUs the host hot-plugs into the VM (UpdatePodSandboxResources).

The guest kernel announces a hot-added vCPU (ACPI) and registers it offline; a distro's
udev would online it, and this guest has no udev. The agent, in a VM only (never on a
host: ``host`` pods run it there), listens for the kernel's uevents on a netlink socket
and onlines every offline vCPU when a ``cpu`` device is added. Hot-unplug needs nothing
here: the kernel offlines a vCPU the host ejects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from pathlib import Path

log = logging.getLogger("criv_agent.cpuonline")

NETLINK_KOBJECT_UEVENT = 15
KERNEL_GROUP = 1  # the kernel's own uevents (udev re-broadcasts on group 2)
CPU_DIR = Path("/sys/devices/system/cpu")
MAX_UEVENT = 8192


def online_all(cpu_dir: Path = CPU_DIR) -> list[int]:
    """Online every present vCPU that is offline; returns their numbers."""
    done = []
    for d in sorted(cpu_dir.glob("cpu[0-9]*")):
        f = d / "online"
        if not f.exists():  # cpu0: it cannot go offline
            continue
        try:
            if f.read_text().strip() == "0":
                f.write_text("1")
                done.append(int(d.name[3:]))
        except (OSError, ValueError) as e:
            log.warning("cannot online %s: %s", d.name, e)
    return done


def is_cpu_add(msg: bytes) -> bool:
    """A kernel uevent (``add@/devices/system/cpu/cpu1\\0ACTION=add\\0...``) adding a vCPU."""
    _head, _, rest = msg.partition(b"\0")
    fields = dict(kv.split(b"=", 1) for kv in rest.split(b"\0") if b"=" in kv)
    return fields.get(b"ACTION") == b"add" and fields.get(b"SUBSYSTEM") == b"cpu"


class CpuOnliner:
    def __init__(self, cpu_dir: Path = CPU_DIR) -> None:
        self._cpu_dir = cpu_dir
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Listen (needs the running loop); then online what came before we listened."""
        try:
            sock = socket.socket(
                socket.AF_NETLINK,
                socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                NETLINK_KOBJECT_UEVENT,
            )
            sock.bind((0, KERNEL_GROUP))
        except OSError as e:
            log.warning("no uevents (%s): hot-plugged vCPUs stay offline", e)
            return
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)
        self._online()

    def _online(self) -> None:
        if done := online_all(self._cpu_dir):
            log.info("onlined hot-plugged vCPU(s) %s", done)

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        added = False
        while True:
            try:
                msg = sock.recv(MAX_UEVENT)
            except BlockingIOError:
                break
            except OSError as e:  # ENOBUFS: events were dropped; look at all vCPUs anyway
                log.warning("uevent socket: %s", e)
                added = True
                break
            added = added or is_cpu_add(msg)
        if added:
            self._online()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(sock.fileno())
        sock.close()
