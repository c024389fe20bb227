from __future__ import annotations

import pytest

from criv.hypervisor.sizing import (
    GUEST_OVERHEAD_MIB,
    MAX_MEMORY_MIB,
    PodResources,
    VmSize,
    tb_cache_mib,
    vm_size,
)

MIB = 1 << 20


@pytest.mark.timeout(10)
def test_defaults_when_unset() -> None:
    assert vm_size(PodResources(), 1, 256, host_cpus=8) == VmSize(1, 256)


@pytest.mark.timeout(10)
def test_cpu_from_quota_rounds_up_and_caps_at_host() -> None:
    res = PodResources(cpu_period=100_000, cpu_quota=150_000)
    assert vm_size(res, 1, 256, host_cpus=8).vcpus == 2
    assert vm_size(PodResources(cpu_quota=900_000), 1, 256, host_cpus=2).vcpus == 2
    # overhead adds to the quota
    res = PodResources(cpu_period=100_000, cpu_quota=100_000, overhead_cpu_quota=50_000)
    assert vm_size(res, 1, 256, host_cpus=8).vcpus == 2
    # unlimited quota keeps the default
    assert vm_size(PodResources(cpu_quota=-1), 3, 256, host_cpus=8).vcpus == 3


@pytest.mark.timeout(10)
def test_memory_limit_plus_overhead_aligned() -> None:
    res = PodResources(memory_limit_bytes=512 * MIB)
    assert vm_size(res, 1, 256, 2).memory_mib == 512 + GUEST_OVERHEAD_MIB
    res = PodResources(memory_limit_bytes=500 * MIB + 1, overhead_memory_bytes=10 * MIB)
    mem = vm_size(res, 1, 256, 2).memory_mib
    assert mem % 16 == 0 and mem >= 511 + GUEST_OVERHEAD_MIB
    # a small limit still gets the default
    assert vm_size(PodResources(memory_limit_bytes=16 * MIB), 1, 256, 2).memory_mib == 256
    assert vm_size(PodResources(memory_limit_bytes=1 << 50), 1, 256, 2).memory_mib == MAX_MEMORY_MIB


@pytest.mark.timeout(10)
def test_tb_cache() -> None:
    assert tb_cache_mib(256) == 64
    assert tb_cache_mib(8192) == 128
