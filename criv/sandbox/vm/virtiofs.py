"""A vm pod's virtiofsd: QEMU 7.2's own virtio-fs daemon, one per pod, started by criv
(root) in its namespace sandbox with the pod's read-only share view as its root, so that
QEMU runs unprivileged and never opens a host file of the share itself.

virtiofsd runs in a session of its own (it outlives a criv restart, like the domain) and
exits when QEMU disconnects. It may not create device nodes (``modcaps=-mknod``); binds
criv adds to the share later reach it by mount propagation (docs/security.md) and are
announced to the guest as submounts.
"""

from __future__ import annotations

import asyncio
import grp
import os
import time
from pathlib import Path

from criv.commands import spawn_detached
from criv.errors import Internal
from criv.procscan import find_processes, kill_group, process_start_time
from criv.sandbox.isolation import PodPaths

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
READY_TIMEOUT = 10.0


def fs_socket(paths: PodPaths) -> Path:
    return paths.run / "fs.sock"


def argv(paths: PodPaths, qemu_group: str, binary: str = VIRTIOFSD) -> list[str]:
    return [
        binary,
        f"--socket-path={fs_socket(paths)}",
        f"--socket-group={qemu_group}",
        "-o", f"source={paths.shared}",
        "-o", "cache=none",  # the host changes the tree (binds) under the guest
        "-o", "sandbox=namespace",
        "-o", "announce_submounts",
        "-o", "xattr",  # file capabilities in images (security.capability)
        "-o", "modcaps=-mknod",
    ]  # fmt: skip


def spawn(paths: PodPaths, qemu_group: str) -> int:
    """Start it and wait until it listens (blocking); its pid."""
    log = paths.state / "virtiofsd.log"
    sock = fs_socket(paths)
    sock.unlink(missing_ok=True)
    proc = spawn_detached(argv(paths, qemu_group), log)
    deadline = time.monotonic() + READY_TIMEOUT
    while not sock.exists():
        if proc.poll() is not None:
            raise Internal(f"virtiofsd exited ({proc.returncode}) before listening; see {log}")
        if time.monotonic() > deadline:
            kill_group(proc.pid)
            raise Internal(f"virtiofsd did not listen on {sock} in {READY_TIMEOUT:.0f}s")
        time.sleep(0.01)
    # virtiofsd sets the group itself, but only after the socket appears: QEMU must not
    # find it root-only in between
    os.chown(sock, 0, grp.getgrnam(qemu_group).gr_gid)
    os.chmod(sock, 0o660)
    return proc.pid


async def start(paths: PodPaths, qemu_group: str) -> tuple[int, int]:
    """Start the pod's virtiofsd and wait until it listens; (pid, start time)."""
    pid = await asyncio.to_thread(spawn, paths, qemu_group)
    return pid, await asyncio.to_thread(process_start_time, pid) or 0


def pids(socket_prefix: str) -> list[int]:
    """virtiofsd processes whose socket path starts with ``socket_prefix``."""
    want = f"--socket-path={socket_prefix}".encode()
    return find_processes(
        lambda a: bool(a) and a[0].endswith(b"virtiofsd") and any(x.startswith(want) for x in a)
    )


async def stop(paths: PodPaths) -> None:
    for pid in await asyncio.to_thread(pids, str(fs_socket(paths))):
        kill_group(pid)


async def sweep(run_root: Path, keep_runs: set[str]) -> list[int]:
    """Kill virtiofsd processes under ``run_root`` whose pod run dir (its socket's
    parent, named by the sandbox id's first 12 characters) is not in ``keep_runs``."""
    killed = []
    for pid in await asyncio.to_thread(pids, f"{run_root}/"):
        if Path(await asyncio.to_thread(_socket_arg, pid)).parent.name not in keep_runs:
            kill_group(pid)
            killed.append(pid)
    return killed


def _socket_arg(pid: int) -> str:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    for a in args:
        if a.startswith(b"--socket-path="):
            return a.split(b"=", 1)[1].decode(errors="replace")
    return ""
