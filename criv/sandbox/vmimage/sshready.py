"""Reaching a vm-image VM over SSH for the first time: wait (bounded) for the host key on
its console and for its SSH server, then keep the connection on the container.

The wait is measured from the VM's start (``vm.image_ssh_wait_seconds``, 120 s by
default): a disk that never prints a key, or a server that never answers (no sshd, a cut
network), gives UNAVAILABLE naming why, with the console's tail, never a hang. Once the
wait is over each call tries one connection (a network that comes back is used again).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from criv.errors import Unavailable
from criv.sandbox.vmimage.container import VmContainer
from criv.vmimage.ssh import SSHClient
from criv.vmimage.sshconn import SSHTarget
from criv.vmimage.sshkeys import ensure_pod_key

SSH_PORT = 22
# boot to SSH answering: ~5 s under TCG when idle, far more on a loaded 2-core machine
DEFAULT_WAIT = 120.0
RETRY = 0.5
CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class SshAccess:
    """How a pod's VM is reached: its address, the pod key's directory and comment."""

    address: str
    key_dir: Path
    key_comment: str
    wait: float = DEFAULT_WAIT


async def ssh_ready(box: VmContainer, access: SshAccess) -> SSHClient:
    """The container's SSH client, connected: waits for the console's host key line and
    the server, at most ``access.wait`` from the VM's start."""
    async with box.ready:
        if box.ssh is not None:
            return box.ssh
        console = box.console
        assert console is not None
        wait = access.wait
        left = box.started_at_ns / 1e9 + wait - time.time()
        deadline = time.monotonic() + max(left, 0)
        try:
            await asyncio.wait_for(console.pinned.wait(), max(left, 0.01))
        except TimeoutError:
            raise Unavailable(
                f"vm-image container {box.cid[:12]}: no SSH host key on its console "
                f"{wait:.0f}s after boot; console tail:\n{console.tail()}"
            ) from None
        assert console.pin is not None
        key = await asyncio.to_thread(ensure_pod_key, access.key_dir, access.key_comment)
        pkey = await asyncio.to_thread(key.load)
        first = True
        while True:
            # within the wait, an attempt never runs (much) past its end; after it, one
            # attempt with the full connect timeout
            left = deadline - time.monotonic()
            timeout = (
                CONNECT_TIMEOUT if first and left <= 0 else min(CONNECT_TIMEOUT, max(left, 2.0))
            )
            first = False
            target = SSHTarget(
                access.address, SSH_PORT, box.user, pkey, console.pin, connect_timeout=timeout
            )
            ssh = SSHClient(target)
            try:
                await ssh.connect()
                break
            except Unavailable as e:
                if not box.running:
                    raise
                if time.monotonic() + RETRY > deadline:
                    raise Unavailable(
                        f"vm-image container {box.cid[:12]}: SSH not reachable at "
                        f"{access.address}:{SSH_PORT} {wait:.0f}s after boot (its host key "
                        f"was on the console): {e}; console tail:\n{console.tail(1000)}"
                    ) from None
                await asyncio.sleep(RETRY)
        box.ssh = ssh
        return ssh
