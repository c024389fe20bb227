"""UpdatePodSandboxResources on a vm pod: a vCPU hot-plugged live (the guest sees it);
memory (no balloon or memory hotplug in the guest kernel) and fewer vCPUs (libvirt cannot
track an unplug with QEMU 7.2) refused, and a refused request changes nothing. One pod: TCG
boots are slow."""

from __future__ import annotations

import json
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


def _iso(cri: Cri, pod: str) -> dict[str, Any]:
    resp = cri.rt.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod, verbose=True), timeout=30
    )
    iso: dict[str, Any] = json.loads(resp.info["info"])["isolationState"]
    return iso


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


@pytest.mark.skipif(HOST_CPUS < 2, reason="a vCPU to hot-plug needs 2 host CPUs")
@pytest.mark.timeout(600)
def test_vm_pod_resize_vcpus_live_memory_refused(vm_cri_factory: Any) -> None:
    # on a host with more CPUs, a lower vm.max_vcpus makes "beyond the max" reachable
    cri: Cri = vm_cri_factory(vm={"max_vcpus": 2}) if HOST_CPUS > 2 else vm_cri_factory()
    limits = api_pb2.LinuxContainerResources(memory_limit_in_bytes=LIMIT_MIB * MIB)
    pod = cri.run_pod("vmresize", linux=api_pb2.LinuxPodSandboxConfig(resources=limits))
    cid = cri.run(pod, "main", ["sh", "-c", "sleep 100000"])
    iso = _iso(cri, pod)
    assert (iso["vcpus"], iso["max_vcpus"]) == (1, 2), iso
    boot_mem = iso["memory_mib"]
    assert boot_mem > LIMIT_MIB, iso
    assert _guest_cpus(cri, cid, "0") == "0 1"
    mem_kib = _mem_total_kib(cri, cid)

    # up: 1.5 CPUs of quota -> 2 vCPUs (ceil, as at boot); the guest onlines the new one
    _resize(cri, pod, cpus=1.5)
    assert _guest_cpus(cri, cid, "0-1") == "0-1 2"
    assert _iso(cri, pod)["vcpus"] == 2

    # memory, up (beyond the boot size) and down: refused, naming the field and why; a
    # request that also changes vCPUs changes nothing (memory is checked first)
    for mem in (2 * LIMIT_MIB, LIMIT_MIB // 2):
        with pytest.raises(grpc.RpcError) as e:
            _resize(cri, pod, cpus=0.5, memory_mib=mem)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value
        why = e.value.details() or ""
        assert "memory_limit_in_bytes" in why and "CONFIG_VIRTIO_BALLOON" in why, why
    assert _iso(cri, pod)["vcpus"] == 2 and _iso(cri, pod)["memory_mib"] == boot_mem
    assert _guest_cpus(cri, cid, "0-1") == "0-1 2"
    assert _mem_total_kib(cri, cid) == mem_kib

    # beyond the most vCPUs: refused where the host has more CPUs than the VM's slots;
    # where it has no more, the boot policy caps the request at the host's CPUs (taken)
    if HOST_CPUS > 2:
        with pytest.raises(grpc.RpcError) as e:
            _resize(cri, pod, cpus=3)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value
        assert "at most 2" in (e.value.details() or "")
    else:
        _resize(cri, pod, cpus=8)
    assert _iso(cri, pod)["vcpus"] == 2

    # down: no quota -> vm.vcpus (1) would unplug a vCPU, which libvirt cannot track with
    # QEMU 7.2 (no DEVICE_DELETED for it): refused, the VM keeps its 2
    with pytest.raises(grpc.RpcError) as e:
        _resize(cri, pod)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value
    assert "cpu_quota" in (e.value.details() or "") and "from 2 to 1" in (e.value.details() or "")
    assert _iso(cri, pod)["vcpus"] == 2
    assert _guest_cpus(cri, cid, "0-1") == "0-1 2"
