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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# What the guest uses besides the containers: kernel + initramfs (unpacked in RAM) + agent.
GUEST_OVERHEAD_MIB = 160
MEMORY_ALIGN_MIB = 16
MAX_MEMORY_MIB = 64 * 1024
MIB = 1 << 20


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


def tb_cache_mib(memory_mib: int) -> int:
    """TCG translation cache: 64 MiB measured enough for the agent (QEMU's default is larger)."""
    return 64 if memory_mib <= 4096 else 128
