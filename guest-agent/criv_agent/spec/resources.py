"""``linux.resources`` from CRI LinuxContainerResources (containerd's WithResources)."""

from __future__ import annotations

from typing import Any

from criv_agent.api.runtime.v1 import api_pb2


def resources(r: api_pb2.LinuxContainerResources, swap_accounting: bool) -> dict[str, Any]:
    """Only what CRI set; zero means unset, as in containerd."""
    out: dict[str, Any] = {}
    cpu: dict[str, Any] = {}
    if r.cpu_shares:
        cpu["shares"] = r.cpu_shares
    # A negative quota is "unlimited" (as in cgroup v1): a new cgroup already is, and
    # crun 1.8 writes -1 to cpu.cfs_quota_us as 2^64-1 (ERANGE), so it is never passed on;
    # an update applies it itself (cgroups.unlimit_cpu_quota).
    if r.cpu_quota > 0:
        cpu["quota"] = r.cpu_quota
    if r.cpu_period:
        cpu["period"] = r.cpu_period
    if r.cpuset_cpus:
        cpu["cpus"] = r.cpuset_cpus
    if r.cpuset_mems:
        cpu["mems"] = r.cpuset_mems
    if cpu:
        out["cpu"] = cpu
    mem: dict[str, Any] = {}
    if r.memory_limit_in_bytes:
        mem["limit"] = r.memory_limit_in_bytes
        if swap_accounting:
            # containerd: without an explicit swap limit, no swap beyond the memory limit
            mem["swap"] = r.memory_swap_limit_in_bytes or r.memory_limit_in_bytes
    if mem:
        out["memory"] = mem
    if r.hugepage_limits:
        out["hugepageLimits"] = [
            {"pageSize": h.page_size, "limit": h.limit} for h in r.hugepage_limits
        ]
    if r.unified:
        out["unified"] = dict(r.unified)
    return out


def update_resources(r: api_pb2.LinuxContainerResources, swap_accounting: bool) -> dict[str, Any]:
    """The JSON ``crun update --resources`` takes (same shape as linux.resources)."""
    return resources(r, swap_accounting)
