"""CRI metrics of a vm pod: its containers from the guest, the VM's own cost on the host
as the pod's row (container=""), and UpdatePodSandboxResources refusing a live resize.
One pod: TCG boots are slow."""

from __future__ import annotations

import grpc
import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri

pytestmark = pytest.mark.vm

MIB = 1 << 20


def _pod_metrics(cri: Cri, pod: str) -> api_pb2.PodSandboxMetrics:
    resp = cri.rt.ListPodSandboxMetrics(api_pb2.ListPodSandboxMetricsRequest(), timeout=60)
    (mine,) = [m for m in resp.pod_metrics if m.pod_sandbox_id == pod]
    return mine


def _by_name(metrics: list[api_pb2.Metric]) -> dict[str, api_pb2.Metric]:
    return {m.name: m for m in metrics}


@pytest.mark.timeout(600)
def test_vm_pod_metrics_and_overhead(vm_cri: Cri) -> None:
    keys = {
        d.name: list(d.label_keys)
        for d in vm_cri.rt.ListMetricDescriptors(
            api_pb2.ListMetricDescriptorsRequest(), timeout=10
        ).descriptors
    }
    pod = vm_cri.run_pod("vmmetrics")
    cid = vm_cri.run(pod, "main", ["sh", "-c", "sleep 100000"])
    r = vm_cri.exec(cid, ["sh", "-c", "head -c 20971520 /dev/zero > /dev/shm/fill && echo ok"])
    assert r.stdout.strip() == b"ok", r.stderr
    pm = _pod_metrics(vm_cri, pod)

    (cm,) = pm.container_metrics
    assert cm.container_id == cid
    mine = _by_name(list(cm.metrics))
    ws = mine["container_memory_working_set_bytes"]
    assert ws.metric_type == api_pb2.GAUGE and ws.value.value >= 20 * MIB  # in the guest
    labels = dict(zip(keys[ws.name], ws.label_values, strict=True))
    assert labels["container"] == "main" and labels["pod"] == "vmmetrics"

    # the pod's row: the VM's processes on the host (QEMU, backend, virtiofsd)
    row = _by_name([m for m in pm.metrics if "interface" not in keys[m.name]])
    for m in row.values():
        lab = dict(zip(keys[m.name], m.label_values, strict=True))
        assert lab["container"] == "" and lab["id"] == pod
    vm_mem = row["container_memory_usage_bytes"].value.value
    assert vm_mem > ws.value.value  # QEMU holds the guest's RAM, the container's in it
    assert row["container_cpu_usage_seconds_total"].metric_type == api_pb2.COUNTER
    assert row["container_cpu_usage_seconds_total"].value.value >= 1  # a TCG boot costs
    nets = [m for m in pm.metrics if m.name == "container_network_receive_bytes_total"]
    ifaces = {dict(zip(keys[m.name], m.label_values, strict=True))["interface"] for m in nets}
    assert "eth0" in ifaces and not any(i.startswith("criv") for i in ifaces), ifaces

    # the VM's memory is fixed at boot: a resize that needs more is refused, by field
    req = api_pb2.UpdatePodSandboxResourcesRequest(
        pod_sandbox_id=pod,
        resources=api_pb2.LinuxContainerResources(memory_limit_in_bytes=4096 * MIB),
    )
    with pytest.raises(grpc.RpcError) as e:
        vm_cri.rt.UpdatePodSandboxResources(req, timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "memory_limit_in_bytes" in (e.value.details() or "")
    # one that keeps its size is taken
    vm_cri.rt.UpdatePodSandboxResources(
        api_pb2.UpdatePodSandboxResourcesRequest(pod_sandbox_id=pod), timeout=10
    )
