"""A ``host`` pod's own cgroup on the host: where it is, what it uses, its limits.

The agent parents each container's cgroup at the pod's cgroup (``<parent>/<cid>``, crun's
cgroupfs manager): kubelet's ``cgroup_parent`` when it is a path, else criv's
``/criv/<pod id>`` (guest-agent/criv_agent/sandbox.py). Here criv reads that cgroup's
usage (the pod-level metrics) and writes its limits (UpdatePodSandboxResources), on
cgroup v2 or v1 (as on this CI host).
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass
from pathlib import Path

from criv.errors import FailedPrecondition, Unimplemented
from criv.sandbox.records import PodRecord
from criv_agent.api.runtime.v1 import api_pb2

ROOT = Path("/sys/fs/cgroup")
_UNLIMITED = 1 << 60


def pod_cgroup(pod: PodRecord) -> str:
    """The pod's cgroup path (relative to a hierarchy's root), as the agent names it."""
    parent = api_pb2.PodSandboxConfig.FromString(pod.config).linux.cgroup_parent
    if parent and not parent.endswith(".slice"):
        return parent.rstrip("/")
    return f"/criv/{pod.id}"


def is_v2() -> bool:
    return (ROOT / "cgroup.controllers").exists()


def _dir(controller: str, path: str) -> Path:
    rel = path.lstrip("/")
    return ROOT / rel if is_v2() else ROOT / controller / rel


def _read(p: Path) -> str:
    try:
        return p.read_text(encoding="ascii")
    except OSError:
        return ""


def _int(p: Path) -> int:
    text = _read(p).strip()
    try:
        return int(text.split()[0]) if text and text != "max" else 0
    except ValueError:
        return 0


def _kv(p: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in _read(p).splitlines():
        k, _, v = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[k] = int(v)
    return out


@dataclass(frozen=True)
class CgroupUsage:
    cpu_ns: int
    memory_usage: int
    working_set: int
    rss: int


def read_usage(path: str) -> CgroupUsage | None:
    """The cgroup's CPU and memory use; None when it does not exist (no container yet)."""
    if is_v2():
        d = _dir("", path)
        if not d.is_dir():
            return None
        cpu = _kv(d / "cpu.stat").get("usage_usec", 0) * 1000
        usage = _int(d / "memory.current")
        ms = _kv(d / "memory.stat")
        inactive, rss = ms.get("inactive_file", 0), ms.get("anon", 0)
    else:
        m = _dir("memory", path)
        if not m.is_dir():
            return None
        cpu = _int(_dir("cpuacct", path) / "cpuacct.usage")
        usage = _int(m / "memory.usage_in_bytes")
        ms = _kv(m / "memory.stat")
        inactive = ms.get("total_inactive_file", 0)
        rss = ms.get("total_rss", 0)
    # kubelet's working set: usage minus inactive file pages
    return CgroupUsage(cpu, usage, max(usage - inactive, 0), rss)


def _total(
    res: api_pb2.LinuxContainerResources, over: api_pb2.LinuxContainerResources
) -> dict[str, int]:
    """The pod's limits: its containers' sum plus the overhead (0: leave unlimited)."""
    quota = res.cpu_quota if res.cpu_quota > 0 else 0
    memory = res.memory_limit_in_bytes
    return {
        "period": res.cpu_period or over.cpu_period,
        "quota": quota + max(over.cpu_quota, 0) if quota else 0,
        "shares": res.cpu_shares + over.cpu_shares if res.cpu_shares else 0,
        "memory": memory + max(over.memory_limit_in_bytes, 0) if memory else 0,
    }


def _writes(
    res: api_pb2.LinuxContainerResources, over: api_pb2.LinuxContainerResources
) -> list[tuple[str, str, str]]:
    """(controller, file, value) to write, in an order the kernel accepts."""
    t = _total(res, over)
    out: list[tuple[str, str, str]] = []
    if is_v2():
        if t["quota"] or t["period"]:
            quota = str(t["quota"]) if t["quota"] else "max"
            out.append(("", "cpu.max", f"{quota} {t['period'] or 100000}"))
        if t["shares"]:
            weight = 1 + ((min(t["shares"], 262144) - 2) * 9999) // 262142
            out.append(("", "cpu.weight", str(weight)))
        out.append(("", "memory.max", str(t["memory"]) if t["memory"] else "max"))
        if res.cpuset_cpus:
            out.append(("", "cpuset.cpus", res.cpuset_cpus))
        if res.cpuset_mems:
            out.append(("", "cpuset.mems", res.cpuset_mems))
        return out
    if t["period"]:
        out.append(("cpu", "cpu.cfs_period_us", str(t["period"])))
    if t["quota"] or t["period"]:
        out.append(("cpu", "cpu.cfs_quota_us", str(t["quota"] or -1)))
    if t["shares"]:
        out.append(("cpu", "cpu.shares", str(t["shares"])))
    out.append(("memory", "memory.limit_in_bytes", str(t["memory"] or -1)))
    if res.cpuset_cpus:
        out.append(("cpuset", "cpuset.cpus", res.cpuset_cpus))
    if res.cpuset_mems:
        out.append(("cpuset", "cpuset.mems", res.cpuset_mems))
    return out


def _unsupported(res: api_pb2.LinuxContainerResources) -> list[str]:
    """Fields this writer does not apply to a pod cgroup (named in the refusal)."""
    names = []
    if res.hugepage_limits:
        names.append("hugepage_limits")
    if res.unified:
        names.append("unified")
    if res.memory_swap_limit_in_bytes:
        names.append("memory_swap_limit_in_bytes")
    return names


def apply_limits(
    path: str, res: api_pb2.LinuxContainerResources, over: api_pb2.LinuxContainerResources
) -> dict[str, str]:
    """Write the pod's limits (resources + overhead) into its cgroup; returns what was
    written (``controller/file`` -> value). criv's own ``/criv/<id>`` is created when no
    container made it yet; kubelet's parent must exist (kubelet made it)."""
    for name, r in (("resources", res), ("overhead", over)):
        bad = _unsupported(r)
        if bad:
            raise Unimplemented(
                f"{name}.{bad[0]}: not applied to a pod cgroup by criv (set it per container "
                "with UpdateContainerResources)"
            )
    own = path.startswith("/criv/")
    done: dict[str, str] = {}
    for controller, name, value in _writes(res, over):
        d = _dir(controller, path)
        if not d.is_dir():
            if not own:
                raise FailedPrecondition(f"pod cgroup {d} does not exist (kubelet's parent)")
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise FailedPrecondition(f"cannot create pod cgroup {d}: {e}") from e
            if controller == "cpuset":
                _inherit_cpuset(d)
        try:
            (d / name).write_text(value, encoding="ascii")
        except OSError as e:
            why = (
                "below what the pod uses now"
                if e.errno == errno.EBUSY
                else os.strerror(e.errno or 0)
            )
            raise FailedPrecondition(f"pod cgroup {d / name} = {value}: {why}") from e
        done[f"{controller or 'unified'}/{name}"] = value
    return done


def _inherit_cpuset(d: Path) -> None:
    """A new v1 cpuset cgroup starts empty: copy its parent's, as crun does."""
    for name in ("cpuset.cpus", "cpuset.mems"):
        for p in reversed([d, *d.parents]):
            if p.parent != p and (p / name).exists() and not _read(p / name).strip():
                with contextlib.suppress(OSError):
                    (p / name).write_text(_read(p.parent / name).strip() or "0")
