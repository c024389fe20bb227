"""UpdatePodSandboxResources: a running pod's pod-level resources (sum of its containers'
plus the overhead), after kubelet resized the pod.

- ``host``: the pod's cgroup on the host (:mod:`.podcgroup`) gets the new limits.
- ``vm``: the VM's shape is fixed at boot: its domain has no memory balloon
  (``<memballoon model='none'/>``), no virtio-mem device and no vCPUs beyond those it
  booted with, so nothing is resized live. A change that would give the VM another size
  (vm sizing, :mod:`criv.hypervisor.sizing`) is refused with FAILED_PRECONDITION naming
  the field; one that keeps its size is recorded. The containers' own limits in the guest
  follow UpdateContainerResources.

Either way the pod record keeps the new numbers (``PodRecord.resources``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os

from criv.config import Config
from criv.errors import FailedPrecondition
from criv.hypervisor.sizing import PodResources, vm_size
from criv.sandbox import podcgroup
from criv.sandbox.context import SandboxContext
from criv.sandbox.isostate import VmState
from criv.sandbox.records import PodRecord
from criv.sandbox.states import PodState
from criv_agent.api.runtime.v1 import api_pb2

log = logging.getLogger("criv.sandbox.podresources")


def sizing_inputs(
    res: api_pb2.LinuxContainerResources, over: api_pb2.LinuxContainerResources
) -> dict[str, int]:
    """As PodRecord.resources keeps them (0 = unset, left out)."""
    out = {
        "cpu_period": res.cpu_period,
        "cpu_quota": res.cpu_quota,
        "memory_limit_bytes": res.memory_limit_in_bytes,
        "overhead_cpu_quota": over.cpu_quota,
        "overhead_memory_bytes": over.memory_limit_in_bytes,
    }
    return {k: int(v) for k, v in out.items() if v}


def _vm_refusal(
    config: Config,
    st: VmState,
    new: dict[str, int],
    res: api_pb2.LinuxContainerResources,
    over: api_pb2.LinuxContainerResources,
) -> str:
    """Why this resize cannot be done to a running VM ("" when it keeps the VM's size)."""
    for name, r in (("resources", res), ("overhead", over)):
        for f in ("cpuset_cpus", "cpuset_mems"):
            if getattr(r, f):
                return f"{name}.{f}: a VM's vCPUs are not pinned by criv"
        if r.hugepage_limits:
            return f"{name}.hugepage_limits: a VM's memory is not backed by hugepages"
    size = vm_size(PodResources(**new), config.vm.vcpus, config.vm.memory_mib, os.cpu_count() or 1)
    if st.memory_mib and size.memory_mib != st.memory_mib:
        return (
            f"resources.memory_limit_in_bytes (+ overhead): the VM would need "
            f"{size.memory_mib} MiB but has {st.memory_mib} MiB, fixed at boot (its domain "
            "has no balloon or virtio-mem device); recreate the pod to resize it"
        )
    if st.vcpus and size.vcpus != st.vcpus:
        return (
            f"resources.cpu_quota (+ overhead): the VM would need {size.vcpus} vCPUs but "
            f"has {st.vcpus}, fixed at boot (no vCPU hotplug); recreate the pod to resize it"
        )
    return ""


async def update_pod_resources(
    ctx: SandboxContext,
    pod_id: str,
    res: api_pb2.LinuxContainerResources,
    over: api_pb2.LinuxContainerResources,
) -> None:
    pod = ctx.pod(pod_id)
    async with ctx.locks.hold(pod.id):
        pod = ctx.pod(pod.id)
        if pod.state is not PodState.READY:
            raise FailedPrecondition(f"pod {pod.id[:12]} is {pod.state.value}")
        new = sizing_inputs(res, over)
        st = pod.isolation_state
        if isinstance(st, VmState):
            why = _vm_refusal(ctx.config, st, new, res, over)
            if why:
                raise FailedPrecondition(f"pod {pod.id[:12]} (vm): {why}")
        else:
            path = podcgroup.pod_cgroup(pod)
            done = await asyncio.to_thread(podcgroup.apply_limits, path, res, over)
            log.info("pod %s: pod cgroup %s: %s", pod.id[:12], path, done)

        def keep(r: PodRecord) -> PodRecord:
            return dataclasses.replace(r, resources=new)

        await ctx.pods.update(pod.id, keep)
