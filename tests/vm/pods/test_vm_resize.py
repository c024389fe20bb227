"""UpdatePodSandboxResources on a vm pod: a vCPU hot-plugged live (the guest sees it);
memory moved by the balloon, down and up to the most the VM booted with (the guest's
MemTotal follows); beyond that, fewer vCPUs (libvirt cannot track an unplug with QEMU 7.2)
and a shrink the guest cannot give back refused, and a refused request changes nothing.
One pod: TCG boots are slow."""

from __future__ import annotations

import os
import time
from typing import Any

import grpc
import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri

pytestmark = pytest.mark.vm

MIB = 1 << 20
LIMIT_MIB = 256  # the pod's memory limit: its VM boots with it + the guest's own share
HOST_CPUS = os.cpu_count() or 1


def _resize(cri: Cri, pod: str, cpus: float = 0, memory_mib: int = LIMIT_MIB) -> None:
    res = api_pb2.LinuxContainerResources(
        cpu_period=100_000 if cpus else 0,
        cpu_quota=int(cpus * 100_000),
        memory_limit_in_bytes=memory_mib * MIB,
    )
    cri.rt.UpdatePodSandboxResources(
        api_pb2.UpdatePodSandboxResourcesRequest(pod_sandbox_id=pod, resources=res), timeout=60
    )


def _guest_cpus(cri: Cri, cid: str, want: str, timeout: float = 60) -> str:
    """/sys/devices/system/cpu/online and nproc in the container, once online is ``want``."""
    deadline = time.monotonic() + timeout
    while True:
        r = cri.exec(cid, ["sh", "-c", "cat /sys/devices/system/cpu/online; nproc"])
        out = r.stdout.decode().split()
        if (out and out[0] == want) or time.monotonic() > deadline:
            return " ".join(out)
        time.sleep(0.2)


def _mem_total_kib(cri: Cri, cid: str) -> int:
    r = cri.exec(cid, ["sh", "-c", "grep MemTotal /proc/meminfo"])
    return int(r.stdout.split()[1])


def _mem_available_kib(cri: Cri, cid: str) -> int:
    r = cri.exec(cid, ["sh", "-c", "grep MemAvailable /proc/meminfo"])
    return int(r.stdout.split()[1])


def _guest_mem(cri: Cri, cid: str, want_kib: int, timeout: float = 30) -> int:
    """The guest's MemTotal (KiB) once it is within 4 MiB of ``want_kib``, or at timeout."""
    deadline = time.monotonic() + timeout
    while True:
        got = _mem_total_kib(cri, cid)
        if abs(got - want_kib) <= 4096 or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


@pytest.mark.skipif(HOST_CPUS < 2, reason="a vCPU to hot-plug needs 2 host CPUs")
@pytest.mark.timeout(600)
def test_vm_pod_resize_vcpus_and_memory_live(vm_cri_factory: Any) -> None:
    # boots with LIMIT + the guest's share; up to 256 MiB more behind the balloon. On a
    # host with more CPUs, a lower vm.max_vcpus makes "beyond the max" reachable
    vm: dict[str, int] = {"max_memory_mib": LIMIT_MIB + 160 + 256}
    cri: Cri = vm_cri_factory(vm={**vm, "max_vcpus": 2} if HOST_CPUS > 2 else vm)
    limits = api_pb2.LinuxContainerResources(memory_limit_in_bytes=LIMIT_MIB * MIB)
    pod = cri.run_pod("vmresize", linux=api_pb2.LinuxPodSandboxConfig(resources=limits))
    cid = cri.run(pod, "main", ["sh", "-c", "sleep 100000"])
    iso = cri.isolation_state(pod)
    assert (iso["vcpus"], iso["max_vcpus"]) == (1, 2), iso
    boot_mem = iso["memory_mib"]
    assert boot_mem == LIMIT_MIB + 160 and iso["max_memory_mib"] == boot_mem + 256, iso
    assert _guest_cpus(cri, cid, "0") == "0 1"
    mem_kib = _mem_total_kib(cri, cid)

    # up: 1.5 CPUs of quota -> 2 vCPUs (ceil, as at boot); the guest onlines the new one
    _resize(cri, pod, cpus=1.5)
    assert _guest_cpus(cri, cid, "0-1") == "0-1 2"
    assert cri.isolation_state(pod)["vcpus"] == 2

    # memory up by 256 MiB (to the most): the balloon deflates, the guest has it at once
    _resize(cri, pod, cpus=1.5, memory_mib=2 * LIMIT_MIB)
    assert cri.isolation_state(pod)["memory_mib"] == boot_mem + 256
    assert _guest_mem(cri, cid, mem_kib + 256 * 1024) - mem_kib == pytest.approx(
        256 * 1024, abs=4096
    )
    # down by 128 MiB below the boot size: the balloon inflates
    _resize(cri, pod, cpus=1.5, memory_mib=LIMIT_MIB // 2)
    assert cri.isolation_state(pod)["memory_mib"] == boot_mem - 128
    assert mem_kib - _guest_mem(cri, cid, mem_kib - 128 * 1024) == pytest.approx(
        128 * 1024, abs=4096
    )

    # beyond the most memory, and fewer vCPUs with it: refused naming the field and the
    # config key; nothing changes (memory is checked first)
    with pytest.raises(grpc.RpcError) as e:
        _resize(cri, pod, cpus=0.5, memory_mib=4 * LIMIT_MIB)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value
    why = e.value.details() or ""
    assert "memory_limit_in_bytes" in why and "vm.max_memory_mib" in why, why
    iso = cri.isolation_state(pod)
    assert iso["vcpus"] == 2 and iso["memory_mib"] == boot_mem - 128
    assert _guest_cpus(cri, cid, "0-1") == "0-1 2"

    # a shrink below what the guest uses (dd holds 280 MB: with its headroom, more than
    # the 288 MiB asked for, whatever the guest's own use): refused before the balloon
    # moves (FAILED_PRECONDITION, as a cgroup limit below use), nothing is OOM-killed
    _resize(cri, pod, cpus=1.5, memory_mib=2 * LIMIT_MIB)
    # (dd fills its one 280 MB buffer, then blocks writing to a reader that never reads:
    # wait until the memory is gone from the guest, or the balloon would take it first)
    avail = _mem_available_kib(cri, cid)
    hog = "dd if=/dev/zero bs=280M count=1 | sleep 99999"
    cri.exec(cid, ["sh", "-c", f"({hog}) </dev/null >/dev/null 2>&1 &"])
    deadline = time.monotonic() + 120
    while _mem_available_kib(cri, cid) > avail - 260 * 1024:
        assert time.monotonic() < deadline, "the memory hog did not take its memory"
        time.sleep(0.5)
    with pytest.raises(grpc.RpcError) as e:
        _resize(cri, pod, cpus=1.5, memory_mib=LIMIT_MIB // 2)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value
    why = e.value.details() or ""
    assert "the guest uses" in why and "nothing changed" in why, why
    assert cri.isolation_state(pod)["memory_mib"] == boot_mem + 256
    assert _guest_mem(cri, cid, mem_kib + 256 * 1024) - mem_kib == pytest.approx(
        256 * 1024, abs=4096
    )
    assert cri.exec(cid, ["sh", "-c", "ps | grep -q '[d]d if='"]).exit_code == 0  # alive
    cri.exec(cid, ["sh", "-c", "kill $(ps | awk '/[d]d if=|[s]leep 99999/ {print $1}')"])

    # beyond the most vCPUs: refused where the host has more CPUs than the VM's slots;
    # where it has no more, the boot policy caps the request at the host's CPUs (taken)
    if HOST_CPUS > 2:
        with pytest.raises(grpc.RpcError) as e:
            _resize(cri, pod, cpus=3, memory_mib=2 * LIMIT_MIB)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value
        assert "at most 2" in (e.value.details() or "")
    else:
        _resize(cri, pod, cpus=8, memory_mib=2 * LIMIT_MIB)
    assert cri.isolation_state(pod)["vcpus"] == 2

    # down: no quota -> vm.vcpus (1) would unplug a vCPU, which libvirt cannot track with
    # QEMU 7.2 (no DEVICE_DELETED for it): refused, the VM keeps its 2
    with pytest.raises(grpc.RpcError) as e:
        _resize(cri, pod, memory_mib=2 * LIMIT_MIB)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value
    assert "cpu_quota" in (e.value.details() or "") and "from 2 to 1" in (e.value.details() or "")
    assert cri.isolation_state(pod)["vcpus"] == 2
    assert _guest_cpus(cri, cid, "0-1") == "0-1 2"
