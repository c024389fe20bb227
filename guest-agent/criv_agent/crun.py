"""Running crun (asyncio subprocesses; never blocking the event loop).

Cgroup v1 hybrid hosts (v1 controllers plus a cgroup2 mount at /sys/fs/cgroup/unified
holding a controller) make crun 1.8 refuse every container ("cgroups in hybrid mode not
supported, drop all controllers from cgroupv2"). On such hosts each crun runs in a
mount namespace of its own (util-linux ``unshare``) where that cgroup2 mount is covered
by an empty tmpfs, so crun sees a plain v1 host. A fresh namespace per call (not one
for the agent) keeps crun's view of host mounts current: this host's mounts are private,
so mounts made later by criv (container rootfs, volumes) would not propagate into a
namespace made once.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from criv_agent.errors import NotFound, RuntimeFailure

CGROUP_ROOT = "/sys/fs/cgroup"


def cgroup_version() -> str:
    return "v2" if os.path.exists(f"{CGROUP_ROOT}/cgroup.controllers") else "v1"


def hybrid_needs_cover() -> bool:
    try:
        with open(f"{CGROUP_ROOT}/unified/cgroup.controllers", encoding="ascii") as f:
            return bool(f.read().strip())
    except OSError:
        return False


# Runs crun with the cgroup2 mount covered, in a mount namespace of its own.
# util-linux's unshare/mount (on every such host) rather than a preexec_fn: fork() in a
# process with gRPC threads runs gRPC's fork handlers and breaks the child.
# Propagation stays as on the host (shared mounts stay peers), so that a container's
# PROPAGATION_BIDIRECTIONAL volume reaches the host; only the covered mount is made
# private first, so that the cover does not propagate back.
_COVER = (
    f"mount --make-private {CGROUP_ROOT}/unified && "
    f"mount -t tmpfs -o size=4k tmpfs {CGROUP_ROOT}/unified || exit 121; "
    'exec "$0" "$@"'
)


def _cover_prefix() -> list[str]:
    return ["unshare", "--mount", "--propagation", "unchanged", "sh", "-c", _COVER]


def root_is_initramfs() -> bool:
    """True in a VM guest whose / is the initramfs: pivot_root(2) cannot move the initial
    rootfs, so crun has to use --no-pivot there (MS_MOVE + chroot)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if fields[4] == "/":
                    fstype = fields[fields.index("-") + 1]
                    return fstype in ("rootfs", "ramfs")
    except (OSError, ValueError, IndexError):
        pass
    return False


@dataclass
class Result:
    rc: int
    stdout: bytes
    stderr: bytes


class Crun:
    def __init__(self, binary: str, root: str) -> None:
        self.binary = binary
        self.root = root
        os.makedirs(root, mode=0o700, exist_ok=True)
        self._prefix = _cover_prefix() if hybrid_needs_cover() else []
        self._no_pivot = root_is_initramfs()

    def argv(self, *args: str) -> list[str]:
        if self._no_pivot and args and args[0] in ("create", "run"):
            args = (args[0], "--no-pivot", *args[1:])
        return [*self._prefix, self.binary, "--root", self.root, *args]

    async def spawn(
        self,
        args: Sequence[str],
        *,
        stdin: int | None = asyncio.subprocess.DEVNULL,
        stdout: int | None = asyncio.subprocess.PIPE,
        stderr: int | None = asyncio.subprocess.PIPE,
        pass_fds: Sequence[int] = (),
    ) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *self.argv(*args),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            pass_fds=pass_fds,
        )

    async def run(self, *args: str, input: bytes | None = None) -> Result:
        proc = await self.spawn(
            args, stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL
        )
        out, err = await proc.communicate(input)
        return Result(proc.returncode or 0, out, err)

    async def check(self, *args: str, input: bytes | None = None) -> Result:
        r = await self.run(*args, input=input)
        if r.rc != 0:
            msg = (r.stderr or r.stdout).decode(errors="replace").strip()
            if "does not exist" in msg or "No such file" in msg:
                raise NotFound(f"crun {args[0]}: {msg}")
            raise RuntimeFailure(f"crun {args[0]} failed ({r.rc}): {msg}")
        return r

    async def state(self, cid: str) -> dict[str, Any] | None:
        r = await self.run("state", cid)
        if r.rc != 0:
            return None
        data: dict[str, Any] = json.loads(r.stdout)
        return data

    async def list_ids(self) -> list[str]:
        r = await self.run("list", "-q")
        return [line for line in r.stdout.decode().split() if line]

    async def kill(self, cid: str, sig: int, all_procs: bool = False) -> None:
        args = ["kill", *(["--all"] if all_procs else []), cid, str(sig)]
        r = await self.run(*args)
        if r.rc != 0:
            msg = r.stderr.decode(errors="replace").strip()
            raise RuntimeFailure(f"crun kill: {msg}")

    async def delete(self, cid: str) -> None:
        r = await self.run("delete", "--force", cid)
        if r.rc != 0 and cid in await self.list_ids():
            raise RuntimeFailure(f"crun delete: {r.stderr.decode(errors='replace').strip()}")
