"""VM sizing policy: vCPUs and memory for a pod's VM. Pure functions (docs/vm.md).

Inputs are the pod-level numbers kubelet puts in LinuxPodSandboxConfig (``resources``: the
sum of the containers' limits, and ``overhead``); the CRI layer passes plain integers so this
module stays free of protobuf.

Rules:

- vCPUs: the config default, raised to ceil(cpu_quota / cpu_period) of resources+overhead,
  capped at the host's CPU count (more vCPUs than host CPUs only slows TCG down).
- memory: the config default, raised to the memory limit + ``GUEST_OVERHEAD_MIB`` (guest
  kernel, init, agent, page cache for the shared directory), rounded up to ``MEMORY_ALIGN_MIB``,
  capped at ``MAX_MEMORY_MIB``. A limit below what the guest itself needs still gets the default.
- most vCPUs (what a live resize may hot-plug up to): ``vm.max_vcpus``, 0 meaning the host's
  CPU count bounded by ``DEFAULT_MAX_VCPUS``; never above the guest kernel's ``NR_CPUS``
  (``GUEST_NR_CPUS``) nor below the boot vCPUs.
- most memory (what the balloon may give back up to): ``vm.max_memory_mib``, 0 meaning the
  boot size; never below it. A VM above its boot size boots with the most and the balloon
  holds the difference back from the start (``<currentMemory>``).
- resize (:func:`resize_refusal`): the same rules give the new size; vCPUs may grow up to
  the VM's most vCPUs but not shrink (``VCPU_UNPLUG``); memory may shrink or grow up to the
  VM's most memory (the balloon: the guest gives pages back or takes them again); whether
  the guest can spare what a shrink takes is asked of it at the time (podresources).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# What the guest uses besides the containers: kernel + initramfs (unpacked in RAM) + agent.
GUEST_OVERHEAD_MIB = 160
MEMORY_ALIGN_MIB = 16
MAX_MEMORY_MIB = 64 * 1024
MIB = 1 << 20
# images/kernel/criv.config: CONFIG_NR_CPUS=64 (a vCPU above it would stay unusable)
GUEST_NR_CPUS = 64
# default most vCPUs on a big host: each possible CPU costs the guest per-CPU memory at boot
DEFAULT_MAX_VCPUS = 16
# Why a VM's vCPUs cannot shrink live ("" once they can). Measured (QEMU 7.2, TCG, libvirt
# 9.0): the guest ejects the vCPU within ~0.1 s, but QEMU sends DEVICE_DELETED only for the
# vCPU's lapic child, never for the vCPU, so libvirt's unplug times out after 5 s and keeps
# counting the vCPU (later setVcpus calls then fail or do nothing): libvirt loses track.
VCPU_UNPLUG = (
    "QEMU 7.2 does not report an unplugged vCPU as deleted (no DEVICE_DELETED), so libvirt "
    "times out and loses count of the VM's vCPUs: vCPUs can be added live, not removed"
)


@dataclass(frozen=True)
class PodResources:
    """Pod-level resources as CRI gives them (0 = unset)."""

    cpu_period: int = 0  # microseconds
    cpu_quota: int = 0  # microseconds per period; <= 0 means unlimited
    memory_limit_bytes: int = 0
    overhead_cpu_quota: int = 0
    overhead_memory_bytes: int = 0


@dataclass(frozen=True)
class VmSize:
    vcpus: int
    memory_mib: int


def _align_up(n: int, align: int) -> int:
    return -(-n // align) * align


def vcpus_for(res: PodResources, default: int, host_cpus: int) -> int:
    want = default
    period = res.cpu_period or 100_000
    quota = max(res.cpu_quota, 0) + max(res.overhead_cpu_quota, 0)
    if res.cpu_quota > 0:
        want = max(want, math.ceil(quota / period))
    return max(1, min(want, max(host_cpus, 1)))


def memory_for(res: PodResources, default_mib: int) -> int:
    want = default_mib
    if res.memory_limit_bytes > 0:
        limit_mib = math.ceil((res.memory_limit_bytes + max(res.overhead_memory_bytes, 0)) / MIB)
        want = max(want, limit_mib + GUEST_OVERHEAD_MIB)
    return min(_align_up(want, MEMORY_ALIGN_MIB), MAX_MEMORY_MIB)


def vm_size(
    res: PodResources, default_vcpus: int, default_memory_mib: int, host_cpus: int
) -> VmSize:
    return VmSize(vcpus_for(res, default_vcpus, host_cpus), memory_for(res, default_memory_mib))


def max_vcpus_for(boot_vcpus: int, configured: int, host_cpus: int) -> int:
    """The most vCPUs a VM booted with ``boot_vcpus`` may be given live."""
    most = configured or min(max(host_cpus, 1), DEFAULT_MAX_VCPUS)
    return max(boot_vcpus, min(most, GUEST_NR_CPUS))


def max_memory_for(boot_mib: int, configured: int) -> int:
    """The most memory (MiB) a VM booted with ``boot_mib`` may be given live."""
    most = min(_align_up(configured, MEMORY_ALIGN_MIB), MAX_MEMORY_MIB) if configured else 0
    return max(boot_mib, most)


def resize_refusal(current: VmSize, most: VmSize, new: VmSize) -> str:
    """Why a running VM of ``current`` size, booted to grow up to ``most``, cannot take
    ``new`` ("" when it can). Everything is checked before anything changes."""
    if new.memory_mib > max(most.memory_mib, current.memory_mib):
        return (
            f"resources.memory_limit_in_bytes (+ overhead): the VM would need "
            f"{new.memory_mib} MiB but was booted with at most {most.memory_mib} MiB "
            "(vm.max_memory_mib); recreate the pod to resize it"
        )
    most_vcpus = max(most.vcpus, current.vcpus)
    if new.vcpus < current.vcpus and VCPU_UNPLUG:
        return (
            f"resources.cpu_quota (+ overhead): the VM would go from {current.vcpus} to "
            f"{new.vcpus} vCPUs: {VCPU_UNPLUG}; recreate the pod to shrink it"
        )
    if new.vcpus > most_vcpus:
        return (
            f"resources.cpu_quota (+ overhead): the VM would need {new.vcpus} vCPUs but "
            f"was booted with at most {most_vcpus} (vm.max_vcpus); recreate the pod to resize it"
        )
    return ""


def tb_cache_mib(memory_mib: int, clone: bool = False) -> int:
    """TCG translation cache: 64 MiB measured enough for the agent (QEMU's default is larger).

    A clone of a template gets twice that. QEMU 7.2 aborts when a vCPU is hot-plugged while
    every translation region is taken (``tcg_region_initial_alloc__locked``: regions are
    handed out in turn and given back only when the cache overflows), and with the agent's
    helpers at fixed addresses a clone's translations settle at ~60 MiB, in the last of
    64 MiB's regions. Only what is translated costs memory, so the larger cache costs an
    idle clone nothing (docs/vm.md, Helpers at fixed addresses). A cold-booted VM
    overflows any size while it boots, so it keeps the smaller one."""
    base = 64 if memory_mib <= 4096 else 128
    return base * 2 if clone else base
