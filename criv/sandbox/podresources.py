"""UpdatePodSandboxResources: a running pod's pod-level resources (sum of its containers'
plus the overhead), after kubelet resized the pod.

- ``host``: the pod's cgroup on the host (:mod:`.podcgroup`) gets the new limits.
- ``vm``: the VM is resized live where it can be. The new size comes from the same policy
  as at boot (:func:`criv.hypervisor.sizing.vm_size`); vCPUs are hot-plugged through
  libvirt up to the most the domain was booted with (``max_vcpus``, the slots of
  ``<vcpu current=…>``); memory moves with the virtio balloon, down or back up to the most
  the domain was booted with (``max_memory_mib``, its ``<memory>``), and the call waits
  until the guest has reached the new size (:data:`BALLOON_WAIT_SECONDS`). A shrink below
  what the guest uses (plus headroom; the guest's balloon driver says) is refused before
  anything moves, as a cgroup limit below usage is; a guest that still does not get there in
  time gets its old target back and the call is FAILED_PRECONDITION. Cpusets and hugepages cannot
  change. What cannot be done is FAILED_PRECONDITION naming the field, checked before
  anything changes. The guest has no pod-level cgroup criv could update (the agent has no
  call for one): the containers' own limits in the guest follow UpdateContainerResources.

The balloon is the guest's to honour: a hostile guest may keep its pages, so what bounds a
VM's cost on the host stays the memory it booted with (docs/security.md).

Either way the pod record keeps the new numbers (``PodRecord.resources``), and a vm pod's
``isolation_state.vcpus`` the vCPUs its VM has now.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from criv.config import Config
from criv.errors import CrivError, FailedPrecondition, Unavailable
from criv.hypervisor.sizing import PodResources, VmSize, resize_refusal, vm_size
from criv.sandbox import podcgroup
from criv.sandbox.context import SandboxContext
from criv.sandbox.isostate import VmState
from criv.sandbox.records import PodRecord
from criv.sandbox.states import PodState
from criv_agent.api.runtime.v1 import api_pb2

log = logging.getLogger("criv.sandbox.podresources")


# how long a memory resize waits for the guest's balloon driver to reach the new size
BALLOON_WAIT_SECONDS = 10.0
# what a shrink must leave the guest free beyond what it uses (MiB, and a share of the new
# size): a balloon that leaves less makes the guest's next allocation OOM-kill a process
SHRINK_HEADROOM_MIB = 32
SHRINK_HEADROOM_SHARE = 0.05
_BALLOON_POLL_SECONDS = 0.2


@runtime_checkable
class VcpuHotplug(Protocol):
    """What an isolation mode offers to change a running VM's vCPUs (vm: VmIsolation)."""

    async def vcpus(self, pod: PodRecord) -> tuple[int, int]: ...

    async def set_vcpus(self, pod: PodRecord, count: int) -> int: ...


@runtime_checkable
class MemoryBalloon(Protocol):
    """What an isolation mode offers to change a running VM's memory (vm: VmIsolation)."""

    async def memory(self, pod: PodRecord) -> int: ...

    async def memory_use(self, pod: PodRecord) -> tuple[int, int]: ...

    async def set_memory(self, pod: PodRecord, mib: int) -> None: ...


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


def vm_target(
    config: Config,
    st: VmState,
    new: dict[str, int],
    res: api_pb2.LinuxContainerResources,
    over: api_pb2.LinuxContainerResources,
) -> VmSize:
    """The VM's size after this resize, or FailedPrecondition naming what cannot be done
    to a running VM (nothing is changed before this has passed)."""
    for name, r in (("resources", res), ("overhead", over)):
        for f in ("cpuset_cpus", "cpuset_mems"):
            if getattr(r, f):
                raise FailedPrecondition(f"{name}.{f}: a VM's vCPUs are not pinned by criv")
        if r.hugepage_limits:
            raise FailedPrecondition(
                f"{name}.hugepage_limits: a VM's memory is not backed by hugepages"
            )
    size = vm_size(PodResources(**new), config.vm.vcpus, config.vm.memory_mib, os.cpu_count() or 1)
    current = VmSize(st.vcpus or size.vcpus, st.memory_mib or size.memory_mib)
    most = VmSize(st.max_vcpus or current.vcpus, st.max_memory_mib or current.memory_mib)
    why = resize_refusal(current, most, size)
    if why:
        raise FailedPrecondition(why)
    return size


async def _set_vcpus(ctx: SandboxContext, pod: PodRecord, st: VmState, want: int) -> VmState:
    """Plug or unplug the VM's vCPUs; on failure, record what the VM has now and say so."""
    iso = ctx.isolation(pod)
    if not isinstance(iso, VcpuHotplug):
        raise FailedPrecondition(f"resources.cpu_quota: {pod.isolation} cannot change vCPUs")
    try:
        got = await iso.set_vcpus(pod, want)
        if got != want:
            raise FailedPrecondition(f"libvirt left the VM with {got} vCPUs")
        return dataclasses.replace(st, vcpus=got)
    except CrivError as e:
        now = ""
        try:
            live, _most = await iso.vcpus(pod)
        except CrivError:
            live = 0
        if live and live != st.vcpus:  # partly done: the record says what the VM has
            await ctx.pods.update(
                pod.id,
                lambda r: dataclasses.replace(
                    r, isolation_state=dataclasses.replace(st, vcpus=live)
                ),
            )
        if live:
            now = f"; the VM has {live} vCPUs now"
        msg = f"resources.cpu_quota: changing the VM from {st.vcpus} to {want} vCPUs: {e}{now}"
        raise (Unavailable if isinstance(e, Unavailable) else FailedPrecondition)(msg) from e


async def _set_memory(
    ctx: SandboxContext, pod: PodRecord, st: VmState, want: int, wait: float
) -> VmState:
    """Move the balloon to ``want`` MiB and wait until the guest is there. A shrink below
    what the guest uses is refused first; a guest that does not get there in ``wait`` s
    gets the old target back. Either refusal leaves the VM as it was."""
    iso = ctx.isolation(pod)
    if not isinstance(iso, MemoryBalloon):
        raise FailedPrecondition(f"resources.memory_limit_in_bytes: {pod.isolation} cannot resize")
    field = "resources.memory_limit_in_bytes (+ overhead)"

    async def balloon() -> tuple[int, int] | None:
        """(what the guest reached, its use before a shrink) or None if not there in time."""
        have, used = await iso.memory_use(pod) if want < st.memory_mib else (0, 0)
        need = used + max(SHRINK_HEADROOM_MIB, int(want * SHRINK_HEADROOM_SHARE))
        if have and want < need:
            return have, used
        await iso.set_memory(pod, want)
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            now = await iso.memory(pod)
            if now == want:
                return None
            if asyncio.get_running_loop().time() >= deadline:
                await iso.set_memory(pod, st.memory_mib)
                return now, 0
            await asyncio.sleep(_BALLOON_POLL_SECONDS)

    try:
        short = await balloon()
    except CrivError as e:
        with contextlib.suppress(CrivError):  # best effort: the old target back
            await iso.set_memory(pod, st.memory_mib)
        msg = f"{field}: changing the VM from {st.memory_mib} to {want} MiB: {e}"
        raise (Unavailable if isinstance(e, Unavailable) else FailedPrecondition)(msg) from e
    if short is None:
        return dataclasses.replace(st, memory_mib=want)
    got, used = short
    if used:
        raise FailedPrecondition(
            f"{field}: the guest uses {used} MiB of its {got} MiB, so {want} MiB would leave "
            "it too little free (its next allocation would kill a process); nothing changed"
        )
    raise FailedPrecondition(
        f"{field}: the guest got only to {got} MiB of {want} MiB in {wait:.0f} s (memory in "
        f"use?); it is back at {st.memory_mib} MiB"
    )


def _with_memory(mib: int) -> Callable[[PodRecord], PodRecord]:
    """The memory moved but a later step failed: the record says what the VM has (the
    vCPU step records its own)."""

    def change(r: PodRecord) -> PodRecord:
        st = r.isolation_state
        if not isinstance(st, VmState):
            return r
        return dataclasses.replace(r, isolation_state=dataclasses.replace(st, memory_mib=mib))

    return change


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
            boot = st
            try:
                size = vm_target(ctx.config, st, new, res, over)
                # memory first: a failed balloon move is undone, a hot-plugged vCPU is not
                if size.memory_mib != st.memory_mib:
                    before = st.memory_mib
                    st = await _set_memory(ctx, pod, st, size.memory_mib, BALLOON_WAIT_SECONDS)
                    log.info("pod %s: memory %d -> %d MiB", pod.id[:12], before, st.memory_mib)
                if size.vcpus != st.vcpus:
                    before = st.vcpus
                    st = await _set_vcpus(ctx, pod, st, size.vcpus)
                    log.info("pod %s: vCPUs %d -> %d", pod.id[:12], before, st.vcpus)
            except CrivError as e:
                if st.memory_mib != boot.memory_mib:
                    await ctx.pods.update(pod.id, _with_memory(st.memory_mib))
                raise type(e)(f"pod {pod.id[:12]} (vm): {e}") from e
        else:
            path = podcgroup.pod_cgroup(pod)
            done = await asyncio.to_thread(podcgroup.apply_limits, path, res, over)
            log.info("pod %s: pod cgroup %s: %s", pod.id[:12], path, done)
        state = st

        def keep(r: PodRecord) -> PodRecord:
            return dataclasses.replace(r, resources=new, isolation_state=state)

        await ctx.pods.update(pod.id, keep)
