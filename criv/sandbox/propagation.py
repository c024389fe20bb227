"""Mount propagation of CRI volumes: the checks containerd makes before it asks for it.

``PROPAGATION_HOST_TO_CONTAINER`` (rslave) only carries the host's later mounts into
the container if the volume's source is on a shared (or slave) mount, and
``PROPAGATION_BIDIRECTIONAL`` (rshared) only reaches back if it is on a shared one;
otherwise the container silently gets a private copy. As containerd
(``ensureShared``/``ensureSharedOrSlave``), criv refuses such a volume instead, naming
the mount and the fix.

A vm pod's guest has its own kernel: the host's mounts reach it through the share
(virtio-fs submounts), but a mount made in the guest never becomes a host mount, so
``PROPAGATION_BIDIRECTIONAL`` is refused there (:func:`refuse_in_vm`).
"""

from __future__ import annotations

import os
import re

from criv.errors import FailedPrecondition, InvalidArgument

# runtime.v1.MountPropagation values (the sandbox layer keeps CRI ints, not protos)
PRIVATE = 0
HOST_TO_CONTAINER = 1
BIDIRECTIONAL = 2

_OCTAL = re.compile(r"\\([0-7]{3})")


def _mount_of(path: str, mountinfo: str) -> tuple[str, list[str]]:
    """(mount point, optional fields) of the mount ``path`` lies on: the deepest mount
    point above it, the last one mounted there."""
    real = os.path.realpath(path)
    best, fields = "/", []
    for line in mountinfo.splitlines():
        f = line.split()
        if len(f) < 7 or "-" not in f:
            continue
        point = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), f[4])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fields = point, f[6 : f.index("-")]
    return best, fields


def check_source(host_path: str, propagation: int, mountinfo: str | None = None) -> None:
    """FAILED_PRECONDITION when the host side cannot propagate as asked."""
    if propagation not in (HOST_TO_CONTAINER, BIDIRECTIONAL):
        return
    if mountinfo is None:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            mountinfo = f.read()
    point, fields = _mount_of(host_path, mountinfo)
    shared = any(x.startswith("shared:") for x in fields)
    slave = any(x.startswith("master:") for x in fields)
    if propagation == BIDIRECTIONAL and not shared:
        raise FailedPrecondition(
            f"volume {host_path[:200]} asks PROPAGATION_BIDIRECTIONAL but is on mount "
            f"{point[:200]}, which is not shared (mount --make-shared {point[:200]})"
        )
    if propagation == HOST_TO_CONTAINER and not (shared or slave):
        raise FailedPrecondition(
            f"volume {host_path[:200]} asks PROPAGATION_HOST_TO_CONTAINER but is on mount "
            f"{point[:200]}, which is neither shared nor slave "
            f"(mount --make-shared {point[:200]})"
        )


def refuse_in_vm(propagation: int, container_path: str) -> None:
    if propagation == BIDIRECTIONAL:
        raise InvalidArgument(
            f"mount {container_path[:200]}: PROPAGATION_BIDIRECTIONAL is not possible in "
            "vm isolation (a mount made in the guest cannot reach the host through the "
            "pod's virtio-fs share); use a runtime handler with host isolation"
        )
