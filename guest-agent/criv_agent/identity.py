"""A pod VM takes its identity at SetupSandbox (``GuestIdentity``).

A VM cloned from a template wakes with the template's wall clock (stale, possibly by
hours), its kernel RNG state, Python's ``random`` state and /etc/machine-id, and without
the pod's share and NIC, which the host hot-plugs after the clone resumes. The agent
therefore, in this order: sets CLOCK_REALTIME from the host; mixes the host's random
bytes into the kernel pool (credited) and reseeds the crng, then reseeds Python's PRNG;
writes /etc/machine-id; and mounts the virtio-fs share at the shared dir once the device
is there (waiting up to ``wait_seconds``). The NIC wait is network.apply's, with what is
left of the same budget.

Only in a VM: a host-mode agent runs on the real host, where setting the clock or
touching the RNG or machine-id would be wrong, so it ignores the message. Every input is
checked before anything is changed. The operations are injected (:class:`Ops`) so tests
hand in fakes.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import logging
import os
import random
import re
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from criv_agent.atomicfile import write_atomic
from criv_agent.errors import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    from criv_agent.api.agent.v1 import agent_pb2

log = logging.getLogger(__name__)

# where images/init mounts the pod's share at boot (the host's criv/sandbox/vm/layout.py
# GUEST_SHARED)
SHARED_DIR = "/run/criv/shared"
MACHINE_ID = "/etc/machine-id"
VIRTIOFS_DRIVER = "/sys/bus/virtio/drivers/virtiofs"
MAX_ENTROPY = 512  # bytes; fcntl.ioctl copies at most 1024 bytes of argument
MAX_WAIT = 60  # seconds
POLL = 0.01  # seconds between looks for a hot-plugged device (a listdir)
RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)
_MACHINE_ID = re.compile(r"[0-9a-f]{32}")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,35}")  # virtio-fs tags: at most 36 bytes


@dataclass(frozen=True)
class Identity:
    """A checked ``GuestIdentity``."""

    entropy: bytes
    host_time_ns: int
    machine_id: str
    share_tag: str
    wait_seconds: int


def check(msg: agent_pb2.GuestIdentity) -> Identity:
    """The message's values, or InvalidArgument; ``wait_seconds`` is capped at MAX_WAIT."""
    if not 0 < len(msg.entropy) <= MAX_ENTROPY:
        raise InvalidArgument(f"identity: entropy must be 1 to {MAX_ENTROPY} bytes")
    if msg.host_time_ns <= 0:
        raise InvalidArgument("identity: host_time_ns must be positive")
    if not _MACHINE_ID.fullmatch(msg.machine_id):
        raise InvalidArgument("identity: machine_id must be 32 lowercase hex characters")
    if msg.share_tag and not _TAG.fullmatch(msg.share_tag):
        raise InvalidArgument(f"identity: bad share tag {msg.share_tag[:64]!r}")
    return Identity(
        entropy=bytes(msg.entropy),
        host_time_ns=int(msg.host_time_ns),
        machine_id=msg.machine_id,
        share_tag=msg.share_tag,
        wait_seconds=min(int(msg.wait_seconds), MAX_WAIT),
    )


# --- the real operations ---------------------------------------------------------------


def set_realtime(ns: int) -> None:
    time.clock_settime_ns(time.CLOCK_REALTIME, ns)


def rnd_add_and_reseed(entropy: bytes) -> None:
    """RNDADDENTROPY (credited: 8 bits a byte), then RNDRESEEDCRNG; OSError if refused."""
    info = struct.pack("ii", 8 * len(entropy), len(entropy)) + entropy
    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, info)
        fcntl.ioctl(fd, RNDRESEEDCRNG, 0)
    finally:
        os.close(fd)


def mix_into_urandom(entropy: bytes) -> None:
    """Mixed into the pool without credit: the fallback when the ioctls are refused."""
    with open("/dev/urandom", "wb", buffering=0) as f:
        f.write(entropy)


def virtiofs_bound() -> bool:
    """A virtio-fs device has its driver (its tag can be mounted)."""
    try:
        return any(n.startswith("virtio") for n in os.listdir(VIRTIOFS_DRIVER))
    except OSError:
        return False


def mount_virtiofs(tag: str, target: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(tag.encode(), target.encode(), b"virtiofs", ctypes.c_ulong(0), None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount -t virtiofs {tag} {target}: {os.strerror(err)}")


@dataclass(frozen=True)
class Ops:
    """What taking an identity does to the machine; tests replace any of it."""

    set_clock: Callable[[int], None] = set_realtime
    add_entropy: Callable[[bytes], None] = rnd_add_and_reseed
    write_urandom: Callable[[bytes], None] = mix_into_urandom
    reseed_python: Callable[[], None] = random.seed
    machine_id_path: str = MACHINE_ID
    shared_dir: str = SHARED_DIR
    is_mountpoint: Callable[[str], bool] = os.path.ismount
    fs_device_bound: Callable[[], bool] = virtiofs_bound
    mount: Callable[[str, str], None] = mount_virtiofs
    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep


class IdentityTaker:
    """Applies SetupSandbox's ``identity``; ``in_vm`` is false for a host-mode agent."""

    def __init__(self, in_vm: bool, ops: Ops | None = None) -> None:
        self.in_vm = in_vm
        self.ops = ops or Ops()

    async def take(self, msg: agent_pb2.GuestIdentity) -> float:
        """Apply ``msg``; returns the seconds left of its wait budget (for the NIC)."""
        if not self.in_vm:
            log.debug("host mode: the guest identity in SetupSandbox is ignored")
            return 0.0
        ident = check(msg)
        ops = self.ops
        until = ops.monotonic() + ident.wait_seconds
        ops.set_clock(ident.host_time_ns)
        self._reseed(ident.entropy)
        await asyncio.to_thread(
            write_atomic, ops.machine_id_path, f"{ident.machine_id}\n".encode(), 0o444
        )
        if ident.share_tag:
            await self._mount_share(ident.share_tag, until, ident.wait_seconds)
        log.info("took the pod's identity (machine-id %s)", ident.machine_id)
        return max(0.0, until - ops.monotonic())

    def _reseed(self, entropy: bytes) -> None:
        try:
            self.ops.add_entropy(entropy)
        except OSError as e:
            log.warning("RNG reseed ioctls failed (%s): mixing the bytes in uncredited", e)
            try:
                self.ops.write_urandom(entropy)
            except OSError as e2:
                log.warning("writing to /dev/urandom failed too: %s", e2)
        self.ops.reseed_python()

    async def _mount_share(self, tag: str, until: float, wait: int) -> None:
        ops = self.ops
        target = ops.shared_dir
        os.makedirs(target, mode=0o755, exist_ok=True)
        while True:
            if ops.is_mountpoint(target):
                return
            try:
                # mount only once a virtio-fs device is bound: each mount of a tag that is
                # not there yet logs a kernel error, a slow UART write under TCG
                if not ops.fs_device_bound():
                    raise OSError(errno.ENODEV, "no virtio-fs device yet")
                await asyncio.to_thread(ops.mount, tag, target)
            except OSError as e:  # not there yet (EINVAL: no such tag), or not probed yet
                if ops.monotonic() >= until:
                    raise FailedPrecondition(
                        f"the pod's share (virtio-fs tag {tag!r}) did not appear within "
                        f"{wait} s: {e.strerror or e}"
                    ) from None
                await ops.sleep(POLL)
                continue
            log.info("mounted the hot-plugged share %r at %s", tag, target)
            return
