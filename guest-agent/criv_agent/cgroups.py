"""Reading container cgroups (v2, and v1 as on this CI host) and removing empty parents.

Containers get ``linux.cgroupsPath`` = ``<parent>/<container id>`` with crun's cgroupfs
manager, so the directory is ``/sys/fs/cgroup/<path>`` (v2) or
``/sys/fs/cgroup/<controller>/<path>`` (v1).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

ROOT = "/sys/fs/cgroup"
_V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids", "devices", "freezer", "blkio",
                   "hugetlb", "net_cls", "net_prio", "perf_event", "rdma", "misc",
                   "systemd")  # fmt: skip
_UNLIMITED = 1 << 60


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except OSError:
        return None


def _int(path: str) -> int:
    text = _read(path)
    if text is None:
        return 0
    text = text.strip()
    if text == "max" or not text:
        return 0
    try:
        return int(text.split()[0])
    except ValueError:
        return 0


def _kv(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (_read(path) or "").splitlines():
        k, _, v = line.partition(" ")
        try:
            out[k] = int(v)
        except ValueError:
            continue
    return out


@dataclass
class Stats:
    timestamp_ns: int = 0
    cpu_ns: int = 0
    memory_usage: int = 0
    working_set: int = 0
    rss: int = 0
    page_faults: int = 0
    major_page_faults: int = 0
    available: int = 0
    pids: int = 0


def is_v2() -> bool:
    return os.path.exists(f"{ROOT}/cgroup.controllers")


def _v1(controller: str, path: str) -> str:
    return os.path.join(ROOT, controller, path.lstrip("/"))


def read_stats(path: str) -> Stats:
    st = Stats(timestamp_ns=time.time_ns())
    if is_v2():
        d = os.path.join(ROOT, path.lstrip("/"))
        st.cpu_ns = _kv(f"{d}/cpu.stat").get("usage_usec", 0) * 1000
        st.memory_usage = _int(f"{d}/memory.current")
        ms = _kv(f"{d}/memory.stat")
        inactive = ms.get("inactive_file", 0)
        st.rss = ms.get("anon", 0)
        st.page_faults = ms.get("pgfault", 0)
        st.major_page_faults = ms.get("pgmajfault", 0)
        limit = _int(f"{d}/memory.max")
        st.pids = _int(f"{d}/pids.current")
    else:
        st.cpu_ns = _int(f"{_v1('cpuacct', path)}/cpuacct.usage")
        m = _v1("memory", path)
        st.memory_usage = _int(f"{m}/memory.usage_in_bytes")
        ms = _kv(f"{m}/memory.stat")
        inactive = ms.get("total_inactive_file", ms.get("inactive_file", 0))
        st.rss = ms.get("total_rss", ms.get("rss", 0))
        st.page_faults = ms.get("total_pgfault", ms.get("pgfault", 0))
        st.major_page_faults = ms.get("total_pgmajfault", ms.get("pgmajfault", 0))
        limit = _int(f"{m}/memory.limit_in_bytes")
        st.pids = _int(f"{_v1('pids', path)}/pids.current")
    # kubelet's working set: usage minus inactive file pages
    st.working_set = max(st.memory_usage - inactive, 0)
    if 0 < limit < _UNLIMITED:
        st.available = max(limit - st.working_set, 0)
    return st


def memory_events_file(path: str) -> str | None:
    """The container's ``memory.events`` (cgroup v2; None on v1, which has no such file
    to watch)."""
    return os.path.join(ROOT, path.lstrip("/"), "memory.events") if is_v2() else None


def oom_kills(path: str) -> int:
    """OOM kills in the container's memory cgroup so far (0 when unknown)."""
    events = memory_events_file(path)
    if events is not None:
        return _kv(events).get("oom_kill", 0)
    return _kv(f"{_v1('memory', path)}/memory.oom_control").get("oom_kill", 0)


def unlimit_cpu_quota(path: str) -> None:
    """Lift the container's CFS quota (``max`` in v2, -1 in v1), keeping its period."""
    if is_v2():
        target, value = os.path.join(ROOT, path.lstrip("/"), "cpu.max"), "max"
    else:
        target, value = f"{_v1('cpu', path)}/cpu.cfs_quota_us", "-1"
    with open(target, "w", encoding="ascii") as f:
        f.write(value)


def remove_tree_if_empty(path: str) -> None:
    """rmdir ``path`` (a cgroup parent criv created, e.g. /criv/<sandbox>) and then each of
    its ancestors named in ``path`` that is empty, in every hierarchy."""
    bases = [ROOT] if is_v2() else [os.path.join(ROOT, c) for c in _V1_CONTROLLERS]
    for base in bases:
        parts = [p for p in path.split("/") if p]
        while parts:
            try:
                os.rmdir(os.path.join(base, *parts))
            except FileNotFoundError:
                pass
            except OSError:
                break
            parts.pop()
