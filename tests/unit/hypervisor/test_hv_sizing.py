from __future__ import annotations

import pytest

from criv.hypervisor.sizing import (
    DEFAULT_MAX_VCPUS,
    GUEST_NR_CPUS,
    GUEST_OVERHEAD_MIB,
    MAX_MEMORY_MIB,
    PodResources,
    VmSize,
    max_memory_for,
    max_vcpus_for,
    resize_refusal,
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
    # a clone: room past the ~60 MiB it settles at (QEMU 7.2 aborts a vCPU hot-plug when
    # no translation region is free)
    assert tb_cache_mib(256, clone=True) == 128


@pytest.mark.timeout(10)
def test_max_vcpus_default_bound_and_config() -> None:
    assert max_vcpus_for(1, 0, host_cpus=2) == 2  # the host's CPUs
    assert max_vcpus_for(1, 0, host_cpus=128) == DEFAULT_MAX_VCPUS  # bounded by default
    assert max_vcpus_for(1, 128, host_cpus=128) == GUEST_NR_CPUS  # the guest kernel's NR_CPUS
    assert max_vcpus_for(1, 4, host_cpus=128) == 4
    assert max_vcpus_for(6, 4, host_cpus=128) == 6  # never below what it boots with


@pytest.mark.timeout(10)
def test_resize_uses_the_boot_policy() -> None:
    cur = vm_size(PodResources(), 1, 256, host_cpus=8)
    # 1.5 CPUs of quota: 2 vCPUs, as RunPodSandbox would give; memory unchanged: taken
    new = vm_size(PodResources(cpu_period=100_000, cpu_quota=150_000), 1, 256, host_cpus=8)
    most = VmSize(4, 256)
    assert new == VmSize(2, 256) and resize_refusal(cur, most, new) == ""
    # back down: an unplug, which libvirt + QEMU 7.2 cannot track
    why = resize_refusal(new, most, cur)
    assert "cpu_quota" in why and "from 2 to 1 vCPUs" in why and "DEVICE_DELETED" in why
    # beyond the most it booted with
    big = vm_size(PodResources(cpu_period=100_000, cpu_quota=600_000), 1, 256, host_cpus=8)
    why = resize_refusal(cur, most, big)
    assert "cpu_quota" in why and "6 vCPUs" in why and "at most 4" in why
    # beyond the host: capped as at boot, so within the VM's slots it is taken
    huge = vm_size(PodResources(cpu_quota=9_900_000), 1, 256, host_cpus=2)
    assert huge.vcpus == 2 and resize_refusal(VmSize(1, 256), VmSize(2, 256), huge) == ""


@pytest.mark.timeout(10)
def test_max_memory_default_bound_and_config() -> None:
    assert max_memory_for(256, 0) == 256  # 0: the boot size (shrink and grow back)
    assert max_memory_for(256, 1000) == 1008  # aligned up
    assert max_memory_for(512, 300) == 512  # never below what it boots with
    assert max_memory_for(256, 1 << 20) == MAX_MEMORY_MIB


@pytest.mark.timeout(10)
def test_resize_memory_moves_within_the_balloon() -> None:
    cur = vm_size(PodResources(memory_limit_bytes=512 * MIB), 1, 256, 8)
    assert cur == VmSize(1, 512 + GUEST_OVERHEAD_MIB)
    most = VmSize(4, 1024 + GUEST_OVERHEAD_MIB)
    # down (the balloon inflates) and up to the most it booted with (it deflates): taken
    for mem in (256 * MIB, 1024 * MIB):
        new = vm_size(PodResources(memory_limit_bytes=mem), 1, 256, 8)
        assert resize_refusal(cur, most, new) == "", mem
    # a limit below what the guest itself needs still leaves the default
    tiny = vm_size(PodResources(memory_limit_bytes=16 * MIB), 1, 256, 8)
    assert tiny.memory_mib == 256 and resize_refusal(cur, most, tiny) == ""
    # above the most: refused, naming the config key, before anything changes
    new = vm_size(PodResources(memory_limit_bytes=2048 * MIB), 1, 256, 8)
    why = resize_refusal(cur, most, new)
    assert why.startswith("resources.memory_limit_in_bytes"), why
    assert f"{new.memory_mib} MiB but was booted with at most {most.memory_mib} MiB" in why
    assert "vm.max_memory_mib" in why
    # memory and vCPUs together: refused on memory, before any vCPU is plugged
    assert resize_refusal(cur, most, VmSize(2, 4096)).startswith("resources.memory_limit")
