"""GetContainerEvents, stats RPCs and UpdateContainerResources through criv."""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri

pytestmark = pytest.mark.integration


@pytest.mark.timeout(120)
def test_events_stats_and_resources(cri: Cri) -> None:
    events: list[Any] = []
    call = cri.rt.GetContainerEvents(api_pb2.GetEventsRequest())

    def collect() -> None:
        try:
            for ev in call:
                events.append(ev)
        except grpc.RpcError:
            pass

    t = threading.Thread(target=collect, daemon=True)
    t.start()
    time.sleep(0.3)
    pod = cri.run_pod("ev")
    cid = cri.run(pod, "busy", ["sh", "-c", "while :; do :; done"])
    time.sleep(0.5)
    first = cri.rt.ContainerStats(api_pb2.ContainerStatsRequest(container_id=cid), timeout=10)
    time.sleep(0.5)
    stats = cri.rt.ListContainerStats(api_pb2.ListContainerStatsRequest(), timeout=10).stats
    assert [s.attributes.id for s in stats] == [cid]
    s = stats[0]
    assert s.cpu.usage_core_nano_seconds.value > first.stats.cpu.usage_core_nano_seconds.value
    assert s.cpu.usage_nano_cores.value > 100_000_000  # a busy loop: well over 0.1 core
    assert s.memory.working_set_bytes.value > 0
    ps = cri.rt.PodSandboxStats(api_pb2.PodSandboxStatsRequest(pod_sandbox_id=pod), timeout=10)
    assert ps.stats.attributes.id == pod
    assert [c.attributes.id for c in ps.stats.linux.containers] == [cid]
    assert ps.stats.linux.process.process_count.value >= 1
    listed = cri.rt.ListPodSandboxStats(api_pb2.ListPodSandboxStatsRequest(), timeout=10).stats
    assert [p.attributes.id for p in listed] == [pod]

    new = api_pb2.LinuxContainerResources(memory_limit_in_bytes=64 * 1024 * 1024)
    cri.rt.UpdateContainerResources(
        api_pb2.UpdateContainerResourcesRequest(container_id=cid, linux=new), timeout=10
    )
    assert cri.status(cid).resources.linux.memory_limit_in_bytes == 64 * 1024 * 1024
    limit = cri.exec(cid, ["cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]).stdout
    assert int(limit or b"0") in (0, 64 * 1024 * 1024)  # 0: cgroupns hides the file

    cri.rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=0), timeout=30)
    cri.rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=30)
    deadline = time.monotonic() + 5
    while len(events) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    call.cancel()
    mine = [(e.container_event_type, e.container_id) for e in events]
    assert mine == [
        (api_pb2.CONTAINER_CREATED_EVENT, cid),
        (api_pb2.CONTAINER_STARTED_EVENT, cid),
        (api_pb2.CONTAINER_STOPPED_EVENT, cid),
        (api_pb2.CONTAINER_DELETED_EVENT, cid),
    ]
    assert events[1].pod_sandbox_status.id == pod
    assert events[1].containers_statuses[0].state == api_pb2.CONTAINER_RUNNING


@pytest.mark.timeout(90)
def test_open_event_stream_does_not_hold_up_shutdown(cri: Cri) -> None:
    call = cri.rt.GetContainerEvents(api_pb2.GetEventsRequest())
    ended = threading.Event()

    def drain() -> None:
        try:
            for _ in call:
                pass
        except grpc.RpcError:
            pass
        ended.set()

    threading.Thread(target=drain, daemon=True).start()
    time.sleep(0.3)
    t0 = time.monotonic()
    cri.proc.restart()
    assert time.monotonic() - t0 < 15  # the server's grace is 30 s
    assert ended.wait(5)
