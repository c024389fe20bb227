"""CRI metrics: every metric's labels line up with its descriptor's keys and type;
/proc/net/dev parsing."""

from __future__ import annotations

from criv.agent.types import AgentStats
from criv.cri import metrics_convert as mconv
from criv.sandbox.podmetrics import HostCost, InterfaceUsage, PodUsage, parse_net_dev
from criv.sandbox.records import ContainerRecord, PodRecord
from criv.sandbox.states import ContainerState, PodState
from criv_agent.api.runtime.v1 import api_pb2

NET_DEV = """Inter-|   Receive |  Transmit
 face |bytes packets errs drop fifo frame compressed multicast|bytes packets errs drop ...
    lo: 100 2 0 0 0 0 0 0 100 2 0 0 0 0 0 0
  eth0: 5000 40 1 2 0 0 0 0 3000 30 3 4 0 0 0 0
crivt0123456789:  9  1 0 0 0 0 0 0  9 1 0 0 0 0 0 0
"""


def test_parse_net_dev_skips_lo_and_the_tap() -> None:
    got = parse_net_dev(NET_DEV, frozenset({"lo", "crivt0123456789"}))
    assert got == (InterfaceUsage("eth0", 5000, 40, 1, 2, 3000, 30, 3, 4),)


def _pod() -> PodRecord:
    return PodRecord(
        id="p" * 64, name="web", namespace="ns", uid="u", attempt=0, state=PodState.READY,
        created_at_ns=1, handler="", isolation="host", config=b"",
    )  # fmt: skip


def test_metrics_match_their_descriptors() -> None:
    keys = {d.name: list(d.label_keys) for d in mconv.descriptors()}
    types = {d.name: d.type for d in mconv.DESCRIPTORS}
    pod = _pod()
    c = ContainerRecord(
        id="c" * 64, sandbox_id=pod.id, name="app", attempt=0, state=ContainerState.RUNNING,
        created_at_ns=1, config=b"", image="busybox", image_id="sha256:x", image_ref="reg/bb@x",
        rootfs="/r",
    )  # fmt: skip
    s = AgentStats(c.id, 10, cpu_usage_core_nanoseconds=3_500_000_000, memory_usage_bytes=7)
    cm = mconv.container_metrics(pod, c, s)
    usage = PodUsage(
        (InterfaceUsage("eth0", 1, 2, 3, 4, 5, 6, 7, 8),), HostCost(2 * 10**9, 9, 8, 7)
    )
    pm = mconv.pod_metrics(pod, usage, [cm], 11)
    seen = set()
    for m in [*pm.metrics, *cm.metrics]:
        assert len(m.label_values) == len(keys[m.name]), m.name
        assert m.metric_type == types[m.name], m.name
        seen.add(m.name)
    assert seen == set(keys)  # every descriptor is filled
    cpu = {m.name: m for m in cm.metrics}["container_cpu_usage_seconds_total"]
    assert cpu.value.value == 3 and list(cpu.label_values) == [
        "app",
        c.id,
        "reg/bb@x",
        c.id,
        "ns",
        "web",
        "total",
    ]
    rx = [m for m in pm.metrics if m.name == "container_network_receive_bytes_total"]
    assert [list(m.label_values) for m in rx] == [["", pod.id, "", pod.id, "ns", "web", "eth0"]]
    assert api_pb2.PodSandboxMetrics.FromString(pm.SerializeToString()) == pm
