"""What the agent's host (the guest kernel in a vm pod, the node in host mode) offers
containers: the cgroup version, swap accounting and the capability bounding set."""

from __future__ import annotations

import os

from criv_agent.crun import cgroup_version
from criv_agent.spec import HostInfo


def host_info() -> HostInfo:
    v2 = cgroup_version() == "v2"
    if v2:
        swap = _any_swap_v2()
    else:
        swap = os.path.exists("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes")
    bounding = (1 << 41) - 1
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapBnd:"):
                    bounding = int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return HostInfo(cgroup_v2=v2, swap_accounting=swap, cap_bounding=bounding)


def _any_swap_v2() -> bool:
    """memory.swap.max exists only below the root, and only with swap accounting."""
    try:
        dirs = [e.path for e in os.scandir("/sys/fs/cgroup") if e.is_dir()]
    except OSError:
        return False
    return any(os.path.exists(os.path.join(d, "memory.swap.max")) for d in dirs)
