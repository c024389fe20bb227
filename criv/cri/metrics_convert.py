"""CRI metrics (ListMetricDescriptors / ListPodSandboxMetrics) with cAdvisor's names.

kubelet's /metrics/cadvisor, fed from the CRI (PodAndContainerStatsFromCRI), turns each
descriptor into a Prometheus family with the descriptor's label keys and each metric
into a sample with its label values, as they are. So criv names the metrics and labels
as cAdvisor does: ``container``, ``id``, ``image``, ``name``, ``namespace``, ``pod``
(plus ``cpu``, ``interface``, ``device``, ``failure_type``/``scope`` where cAdvisor has
them), with ``container=""`` for the pod's own row:

- per container (``container`` = its name, ``id``/``name`` = its id): CPU, memory,
  page faults, processes, writable layer, from the agent's cgroup stats (in the guest
  for ``vm`` pods);
- per pod (``container=""``, ``id``/``name`` = the pod id): its network interfaces, and
  its CPU and memory on the host: the pod cgroup (``host``), or the VM's processes
  (``vm``: QEMU, vsock backend, virtiofsd), which is what the pod costs the node,
  guest and overhead included. The VM's overhead is that row minus its containers.

Values are unsigned integers (the CRI's ``UInt64Value``), so CPU seconds are whole
seconds, as CRI-O sends them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from criv.agent.types import AgentStats
from criv.sandbox.podmetrics import HostCost, InterfaceUsage, PodUsage
from criv.sandbox.records import ContainerRecord, PodRecord
from criv_agent.api.runtime.v1 import api_pb2

BASE_LABELS = ("container", "id", "image", "name", "namespace", "pod")
COUNTER, GAUGE = api_pb2.COUNTER, api_pb2.GAUGE
_NS = 1_000_000_000


@dataclass(frozen=True)
class Desc:
    name: str
    help: str
    type: int
    extra: tuple[str, ...] = ()

    @property
    def label_keys(self) -> tuple[str, ...]:
        return BASE_LABELS + self.extra


CPU = Desc(
    "container_cpu_usage_seconds_total",
    "Cumulative cpu time consumed in seconds.",
    COUNTER,
    ("cpu",),
)
MEM_USAGE = Desc(
    "container_memory_usage_bytes",
    "Current memory usage in bytes, including all memory regardless of when it was accessed",
    GAUGE,
)
MEM_WS = Desc("container_memory_working_set_bytes", "Current working set in bytes.", GAUGE)
MEM_RSS = Desc("container_memory_rss", "Size of RSS in bytes.", GAUGE)
MEM_FAILURES = Desc(
    "container_memory_failures_total",
    "Cumulative count of memory allocation failures.",
    COUNTER,
    ("failure_type", "scope"),
)
PROCESSES = Desc("container_processes", "Number of processes running inside the container.", GAUGE)
FS_USAGE = Desc(
    "container_fs_usage_bytes",
    "Number of bytes that are consumed by the container on this filesystem.",
    GAUGE,
    ("device",),
)


def _net(name: str, help: str) -> Desc:
    return Desc(f"container_network_{name}", help, COUNTER, ("interface",))


NET_RX = _net("receive_bytes_total", "Cumulative count of bytes received")
NET_RX_PKT = _net("receive_packets_total", "Cumulative count of packets received")
NET_RX_ERR = _net("receive_errors_total", "Cumulative count of errors encountered while receiving")
NET_RX_DROP = _net(
    "receive_packets_dropped_total", "Cumulative count of packets dropped while receiving"
)
NET_TX = _net("transmit_bytes_total", "Cumulative count of bytes transmitted")
NET_TX_PKT = _net("transmit_packets_total", "Cumulative count of packets transmitted")
NET_TX_ERR = _net(
    "transmit_errors_total", "Cumulative count of errors encountered while transmitting"
)
NET_TX_DROP = _net(
    "transmit_packets_dropped_total", "Cumulative count of packets dropped while transmitting"
)

DESCRIPTORS: tuple[Desc, ...] = (
    CPU, MEM_USAGE, MEM_WS, MEM_RSS, MEM_FAILURES, PROCESSES, FS_USAGE,
    NET_RX, NET_RX_PKT, NET_RX_ERR, NET_RX_DROP, NET_TX, NET_TX_PKT, NET_TX_ERR, NET_TX_DROP,
)  # fmt: skip

_NET_FIELDS: tuple[tuple[Desc, Callable[[InterfaceUsage], int]], ...] = (
    (NET_RX, lambda i: i.rx_bytes),
    (NET_RX_PKT, lambda i: i.rx_packets),
    (NET_RX_ERR, lambda i: i.rx_errors),
    (NET_RX_DROP, lambda i: i.rx_dropped),
    (NET_TX, lambda i: i.tx_bytes),
    (NET_TX_PKT, lambda i: i.tx_packets),
    (NET_TX_ERR, lambda i: i.tx_errors),
    (NET_TX_DROP, lambda i: i.tx_dropped),
)


def descriptors() -> list[api_pb2.MetricDescriptor]:
    return [api_pb2.MetricDescriptor(name=d.name, help=d.help, label_keys=d.label_keys)
            for d in DESCRIPTORS]  # fmt: skip


def _metric(d: Desc, ts: int, base: list[str], value: int, *extra: str) -> api_pb2.Metric:
    assert len(extra) == len(d.extra), d.name  # values line up with the descriptor's keys
    return api_pb2.Metric(
        name=d.name,
        timestamp=ts,
        metric_type=d.type,  # type: ignore[arg-type]
        label_values=[*base, *extra],
        value=api_pb2.UInt64Value(value=max(value, 0)),
    )


def container_metrics(
    pod: PodRecord, c: ContainerRecord, s: AgentStats
) -> api_pb2.ContainerMetrics:
    base = [c.name, c.id, c.image_ref or c.image, c.id, pod.namespace, pod.name]
    ts = s.timestamp_ns
    out = [
        _metric(CPU, ts, base, s.cpu_usage_core_nanoseconds // _NS, "total"),
        _metric(MEM_USAGE, ts, base, s.memory_usage_bytes),
        _metric(MEM_WS, ts, base, s.memory_working_set_bytes),
        _metric(MEM_RSS, ts, base, s.memory_rss_bytes),
        _metric(MEM_FAILURES, ts, base, s.memory_page_faults, "pgfault", "container"),
        _metric(MEM_FAILURES, ts, base, s.memory_major_page_faults, "pgmajfault", "container"),
        _metric(PROCESSES, ts, base, s.process_count),
        _metric(FS_USAGE, ts, base, s.writable_layer_bytes, c.rootfs),
    ]
    return api_pb2.ContainerMetrics(container_id=c.id, metrics=out)


def _host_metrics(base: list[str], ts: int, h: HostCost) -> list[api_pb2.Metric]:
    return [
        _metric(CPU, ts, base, h.cpu_ns // _NS, "total"),
        _metric(MEM_USAGE, ts, base, h.memory_usage),
        _metric(MEM_WS, ts, base, h.working_set),
        _metric(MEM_RSS, ts, base, h.rss),
    ]


def pod_metrics(
    pod: PodRecord, usage: PodUsage, containers: list[api_pb2.ContainerMetrics], ts: int
) -> api_pb2.PodSandboxMetrics:
    base = ["", pod.id, "", pod.id, pod.namespace, pod.name]
    out = [_metric(d, ts, base, get(i), i.name) for i in usage.interfaces for d, get in _NET_FIELDS]
    if usage.host is not None:
        out += _host_metrics(base, ts, usage.host)
    return api_pb2.PodSandboxMetrics(
        pod_sandbox_id=pod.id, metrics=out, container_metrics=containers
    )
