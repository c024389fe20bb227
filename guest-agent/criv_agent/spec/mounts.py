"""OCI mounts: containerd's default mounts, the pod's shared files, and CRI mounts.

Precedence as in containerd: a CRI mount replaces a default or pod-file mount with the
same destination; mounts are ordered so that parents come before children.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from criv_agent.api.runtime.v1 import api_pb2

_PROPAGATION = {
    api_pb2.MountPropagation.PROPAGATION_PRIVATE: "rprivate",
    api_pb2.MountPropagation.PROPAGATION_HOST_TO_CONTAINER: "rslave",
    api_pb2.MountPropagation.PROPAGATION_BIDIRECTIONAL: "rshared",
}


def default_mounts(privileged: bool) -> list[dict[str, Any]]:
    """containerd's populateDefaultUnixSpec mounts without /run (CRI drops it), plus the
    cgroup mount CRI adds; sysfs and cgroup are writable only for privileged."""
    ro = [] if privileged else ["ro"]
    return [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", *ro]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", *ro]},
    ]  # fmt: skip


def bind(src: str, dst: str, readonly: bool, propagation: str = "rprivate") -> dict[str, Any]:
    return {
        "destination": dst,
        "type": "bind",
        "source": src,
        "options": ["rbind", propagation, "ro" if readonly else "rw"],
    }


@dataclass(frozen=True)
class PodFiles:
    """The pod's shared files as the agent sees them; None when the pod has none."""

    hostname: str | None
    hosts: str | None
    resolv_conf: str | None
    shm: str | None  # the pod /dev/shm (IPC POD) or the node's (IPC NODE)


def pod_file_mounts(files: PodFiles, readonly_rootfs: bool) -> list[dict[str, Any]]:
    out = []
    for src, dst in (
        (files.hostname, "/etc/hostname"),
        (files.hosts, "/etc/hosts"),
        (files.resolv_conf, "/etc/resolv.conf"),
    ):
        if src:
            out.append(bind(src, dst, readonly_rootfs))
    if files.shm:
        out.append(
            {
                "destination": "/dev/shm",
                "type": "bind",
                "source": files.shm,
                "options": ["rbind", "rprivate", "rw", "nosuid", "nodev", "noexec"],
            }
        )
    return out


def cri_mounts(mounts: list[api_pb2.Mount], agent_paths: list[str]) -> list[dict[str, Any]]:
    """CRI mounts with the host-resolved sources, same order as given."""
    out = []
    for m, src in zip(mounts, agent_paths, strict=True):
        opts = ["rbind", _PROPAGATION.get(m.propagation, "rprivate"), "ro" if m.readonly else "rw"]
        out.append({"destination": m.container_path, "type": "bind", "source": src,
                    "options": opts})  # fmt: skip
    return out


def _depth(dst: str) -> int:
    return len([p for p in os.path.normpath(dst).split("/") if p])


def merge_mounts(
    defaults: list[dict[str, Any]], pod: list[dict[str, Any]], cri: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Later groups override earlier ones by destination; stable sort by depth."""
    cri_dst = {os.path.normpath(m["destination"]) for m in cri}
    pod_dst = {os.path.normpath(m["destination"]) for m in pod}
    keep = [m for m in defaults if os.path.normpath(m["destination"]) not in cri_dst | pod_dst]
    keep += [m for m in pod if os.path.normpath(m["destination"]) not in cri_dst]
    # containerd sorts only the CRI mounts; defaults are all shallower or siblings
    keep += sorted(cri, key=lambda m: _depth(m["destination"]))
    return keep
