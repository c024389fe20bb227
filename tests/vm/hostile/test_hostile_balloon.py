"""Guest root against the memory balloon (docs/security.md): a guest that unbinds its
balloon driver neither answers criv's question about its memory use nor gives memory
back. A shrink must then end, refused and undone, in bounded time, the VM keeping the
memory it booted with (the host's bound) and criv answering."""

from __future__ import annotations

import time

import grpc
import libvirt
import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri

pytestmark = pytest.mark.vm

MIB = 1 << 20
LIMIT_MIB = 256
UNBIND = (
    "cd /sys/bus/virtio/drivers/virtio_balloon && for d in virtio*; do echo $d > unbind; done;"
    " ls /sys/bus/virtio/drivers/virtio_balloon"
)


@pytest.mark.timeout(600)
def test_a_guest_without_its_balloon_driver_gets_a_bounded_refusal(vm_cri: Cri) -> None:
    limits = api_pb2.LinuxContainerResources(memory_limit_in_bytes=LIMIT_MIB * MIB)
    sb_sec = api_pb2.LinuxSandboxSecurityContext(privileged=True)
    pod = vm_cri.run_pod(
        "noballoon", linux=api_pb2.LinuxPodSandboxConfig(resources=limits, security_context=sb_sec)
    )
    sec = api_pb2.LinuxContainerSecurityContext(
        privileged=True, namespace_options=api_pb2.NamespaceOption(pid=api_pb2.NODE)
    )
    cid = vm_cri.run(pod, "attacker", ["sleep", "3600"], security=sec)
    boot = vm_cri.isolation_state(pod)["memory_mib"]
    # guest root takes the balloon device away from its driver
    r = vm_cri.exec(cid, ["nsenter", "-t", "1", "-m", "--", "sh", "-c", UNBIND])
    assert r.exit_code == 0 and b"virtio" not in r.stdout, (r.stdout, r.stderr)

    t0 = time.monotonic()
    res = api_pb2.LinuxContainerResources(memory_limit_in_bytes=LIMIT_MIB // 2 * MIB)
    with pytest.raises(grpc.RpcError) as e:
        vm_cri.rt.UpdatePodSandboxResources(
            api_pb2.UpdatePodSandboxResourcesRequest(pod_sandbox_id=pod, resources=res),
            timeout=120,
        )
    took = time.monotonic() - t0
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value
    why = e.value.details() or ""
    assert f"got only to {boot} MiB" in why and f"back at {boot} MiB" in why, why
    assert took < 60, took  # the statistics wait and the balloon wait are both bounded
    assert vm_cri.isolation_state(pod)["memory_mib"] == boot

    # the host's bound is what the VM booted with, and its balloon target is back there
    conn = libvirt.open("qemu:///system")
    try:
        dom = conn.lookupByName(vm_cri.isolation_state(pod)["domain"])
        assert dom.maxMemory() == boot * 1024
        assert dom.info()[2] == boot * 1024  # the current (target) memory, KiB
    finally:
        conn.close()
    assert vm_cri.exec(cid, ["echo", "alive"]).stdout == b"alive\n"
    vm_cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=120)
    vm_cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=120)
