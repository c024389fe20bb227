"""ListMetricDescriptors / ListPodSandboxMetrics (cAdvisor names) and
UpdatePodSandboxResources of a `host` pod, through criv."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri

pytestmark = pytest.mark.integration

MIB = 1 << 20
CGROUP = Path("/sys/fs/cgroup")
V2 = (CGROUP / "cgroup.controllers").exists()


def _descriptors(cri: Cri) -> dict[str, list[str]]:
    resp = cri.rt.ListMetricDescriptors(api_pb2.ListMetricDescriptorsRequest(), timeout=10)
    return {d.name: list(d.label_keys) for d in resp.descriptors}


def _metrics(cri: Cri, pod: str) -> api_pb2.PodSandboxMetrics:
    resp = cri.rt.ListPodSandboxMetrics(api_pb2.ListPodSandboxMetricsRequest(), timeout=30)
    (mine,) = [m for m in resp.pod_metrics if m.pod_sandbox_id == pod]
    return mine


def _labeled(keys: dict[str, list[str]], m: api_pb2.Metric) -> dict[str, str]:
    assert len(m.label_values) == len(keys[m.name]), m
    return dict(zip(keys[m.name], m.label_values, strict=True))


def _value(metrics: Any, name: str, **labels: str) -> int:
    for m in metrics:
        if m.name == name and all(m.label_values[i] == v for i, v in labels.items()):
            return int(m.value.value)
    raise AssertionError(f"no {name} {labels} in {[m.name for m in metrics]}")


def _container(cri: Cri, pod: str, cid: str) -> list[api_pb2.Metric]:
    (cm,) = [c for c in _metrics(cri, pod).container_metrics if c.container_id == cid]
    return list(cm.metrics)


@pytest.mark.timeout(180)
def test_pod_metrics_names_labels_and_values(cri: Cri) -> None:
    keys = _descriptors(cri)
    base = ["container", "id", "image", "name", "namespace", "pod"]
    assert keys["container_cpu_usage_seconds_total"] == [*base, "cpu"]
    assert keys["container_memory_working_set_bytes"] == base
    assert keys["container_network_receive_bytes_total"] == [*base, "interface"]
    for name in ("container_memory_usage_bytes", "container_memory_rss", "container_processes"):
        assert keys[name] == base

    pod = cri.run_pod("metrics")
    cid = cri.run(pod, "work", ["sh", "-c", "sleep 100000"])
    pm = _metrics(cri, pod)
    types = {m.name: m.metric_type for c in pm.container_metrics for m in c.metrics}
    types.update({m.name: m.metric_type for m in pm.metrics})
    assert types["container_cpu_usage_seconds_total"] == api_pb2.COUNTER
    assert types["container_memory_working_set_bytes"] == api_pb2.GAUGE
    assert types["container_network_transmit_bytes_total"] == api_pb2.COUNTER
    assert set(types) <= set(keys)

    (cm,) = pm.container_metrics
    assert cm.container_id == cid
    labels = _labeled(keys, cm.metrics[0])
    assert labels["container"] == "work" and labels["id"] == cid
    assert labels["pod"] == "metrics" and labels["namespace"] == "default"
    assert labels["image"]
    # the pod's own rows: container="", its network by interface, its cgroup's cost
    for m in pm.metrics:
        lab = _labeled(keys, m)
        assert lab["container"] == "" and lab["id"] == pod, lab
    ifaces = {_labeled(keys, m)["interface"] for m in pm.metrics if "interface" in keys[m.name]}
    assert "eth0" in ifaces and "lo" not in ifaces

    # CPU: whole seconds (the CRI's values are integers), so burn a few
    cpu0 = _value(_container(cri, pod, cid), "container_cpu_usage_seconds_total")
    busy = cri.run(pod, "busy", ["sh", "-c", "while :; do :; done"])
    deadline = time.monotonic() + 60
    while True:
        cpu = _value(_container(cri, pod, busy), "container_cpu_usage_seconds_total")
        if cpu >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert cpu >= 2 > cpu0
    pod_cpu = _value(_metrics(cri, pod).metrics, "container_cpu_usage_seconds_total")
    assert pod_cpu >= 2  # the pod cgroup holds its containers

    # memory: 40 MiB written to the pod's /dev/shm are charged to the container
    ws0 = _value(_container(cri, pod, cid), "container_memory_working_set_bytes")
    r = cri.exec(cid, ["sh", "-c", "head -c 41943040 /dev/zero > /dev/shm/fill && echo ok"])
    assert r.stdout.strip() == b"ok", r.stderr
    sample = _container(cri, pod, cid)  # one sample: memory moves between two
    ws = _value(sample, "container_memory_working_set_bytes")
    usage = _value(sample, "container_memory_usage_bytes")
    assert ws - ws0 >= 30 * MIB and usage >= ws


def _cg(controller: str, pod: str, name: str) -> str:
    base = CGROUP if V2 else CGROUP / controller
    return (base / "criv" / pod / name).read_text().strip()


@pytest.mark.timeout(120)
def test_update_pod_sandbox_resources_sets_the_pod_cgroup(cri: Cri) -> None:
    pod = cri.run_pod("resize")
    cri.run(pod, "c", ["sh", "-c", "sleep 100000"])
    req = api_pb2.UpdatePodSandboxResourcesRequest(
        pod_sandbox_id=pod,
        resources=api_pb2.LinuxContainerResources(
            cpu_period=100000, cpu_quota=50000, cpu_shares=512, memory_limit_in_bytes=256 * MIB
        ),
        overhead=api_pb2.LinuxContainerResources(
            cpu_quota=10000, cpu_shares=2, memory_limit_in_bytes=16 * MIB
        ),
    )
    cri.rt.UpdatePodSandboxResources(req, timeout=10)
    if V2:
        assert _cg("", pod, "cpu.max") == "60000 100000"
        assert _cg("", pod, "memory.max") == str(272 * MIB)
    else:
        assert _cg("cpu", pod, "cpu.cfs_quota_us") == "60000"
        assert _cg("cpu", pod, "cpu.cfs_period_us") == "100000"
        assert _cg("cpu", pod, "cpu.shares") == "514"
        assert _cg("memory", pod, "memory.limit_in_bytes") == str(272 * MIB)

    # a second resize replaces the first; no memory limit lifts it
    req.resources.memory_limit_in_bytes = 0
    req.resources.cpu_quota = 200000
    cri.rt.UpdatePodSandboxResources(req, timeout=10)
    if V2:
        assert _cg("", pod, "memory.max") == "max"
        assert _cg("", pod, "cpu.max") == "210000 100000"
    else:
        assert int(_cg("memory", pod, "memory.limit_in_bytes")) >= 1 << 60
        assert _cg("cpu", pod, "cpu.cfs_quota_us") == "210000"

    bad = api_pb2.UpdatePodSandboxResourcesRequest(
        pod_sandbox_id=pod, resources=api_pb2.LinuxContainerResources(cpu_period=5)
    )
    with pytest.raises(grpc.RpcError) as e:
        cri.rt.UpdatePodSandboxResources(bad, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "resources.cpu_period" in (e.value.details() or "")
    with pytest.raises(grpc.RpcError) as e:
        cri.rt.UpdatePodSandboxResources(
            api_pb2.UpdatePodSandboxResourcesRequest(pod_sandbox_id="nope"), timeout=10
        )
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
