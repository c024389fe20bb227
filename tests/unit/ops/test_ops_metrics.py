"""criv/metrics.py: the families, the scrape-time sandbox collector, the endpoint, and the
recording points (CRI interceptor, agent client, pod start, image pulls, sweeps)."""

from __future__ import annotations

import contextlib
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from criv import metrics
from criv.agent.client import AgentClient
from criv.config import parse_config
from criv.cri.wire import ErrorInterceptor
from criv.errors import ConfigError, CrivError, NotFound
from criv_agent.api.runtime.v1 import api_pb2, api_pb2_grpc


def value(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def test_parse_address() -> None:
    assert metrics.parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert metrics.parse_address("[::1]:0") == ("::1", 0)
    assert metrics.parse_address("0.0.0.0:80") == ("0.0.0.0", 80)
    for bad in ("9464", ":9464", "host:", "host:99999", "host:x", "[::1:80"):
        with pytest.raises(ValueError):
            metrics.parse_address(bad)


def test_config_key_is_off_by_default_and_checked() -> None:
    assert parse_config("").metrics.address == ""
    assert parse_config("metrics: {address: '127.0.0.1:9464'}").metrics.address
    with pytest.raises(ConfigError) as e:
        parse_config("metrics: {address: '9464'}")
    assert "metrics.address" in str(e.value)


def _snapshot() -> metrics.Snapshot:
    vsock = {"rx_bytes": 100, "tx_bytes": 40, "conns_total": 3, "device_resets": 1}
    return metrics.Snapshot(
        ["host", "vm"],
        [
            metrics.PodSample("aaa", "a", "ns", "vm", True, vsock),
            metrics.PodSample("bbb", "b", "ns", "vm", False),
            metrics.PodSample("ccc", "c", "ns", "host", True),
            metrics.PodSample("ddd", "d", "ns", "vm", True, {"rx_bytes": -5, "broken": "bad"}),
        ],
    )


def _families(collector: metrics.SandboxCollector) -> dict[str, dict[tuple[str, ...], float]]:
    out: dict[str, dict[tuple[str, ...], float]] = {}
    for fam in collector.collect():
        out[fam.name] = {tuple(s.labels.values()): s.value for s in fam.samples}
    return out


def test_sandbox_collector_counts_ready_pods_and_backend_counters() -> None:
    fams = _families(metrics.SandboxCollector(_snapshot))
    assert fams["criv_sandboxes_running"] == {("host",): 1, ("vm",): 2}
    assert fams["criv_vsock_backend_bytes"] == {
        ("aaa", "a", "ns", "to_guest"): 100,
        ("aaa", "a", "ns", "from_guest"): 40,
    }  # a negative (made-up) count from a status file is dropped
    assert fams["criv_vsock_backend_device_resets"] == {("aaa", "a", "ns"): 1}
    assert fams["criv_vsock_backend_connections"] == {("aaa", "a", "ns"): 3}
    assert fams["criv_vsock_backend_broken"] == {("aaa", "a", "ns"): 0, ("ddd", "d", "ns"): 1}


def test_sandbox_collector_without_a_snapshot_yields_nothing() -> None:
    def fail() -> metrics.Snapshot:
        raise TimeoutError("loop busy")

    assert list(metrics.SandboxCollector(fail).collect()) == []


def test_endpoint_serves_every_family(tmp_path: Path) -> None:
    server = metrics.MetricsServer("127.0.0.1:0", _snapshot)
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
    finally:
        server.stop()
    for family in (
        "criv_cri_requests_total",
        "criv_cri_request_duration_seconds",
        "criv_pod_start_duration_seconds",
        "criv_template_hits_total",
        "criv_template_misses_total",
        "criv_agent_rpc_errors_total",
        "criv_image_pulls_total",
        "criv_image_pull_bytes_total",
        "criv_startup_sweeps_total",
        "criv_sandboxes_running",
        "criv_vsock_backend_bytes_total",
        "process_resident_memory_bytes",
    ):
        assert f"# TYPE {family.removesuffix('_total')}" in text, family
    assert 'criv_sandboxes_running{mode="vm"} 2.0' in text
    # stopped: the collector is gone from the registry, a second server may start
    assert all(not isinstance(c, metrics.SandboxCollector) for c in _registered())


def _registered() -> list[object]:
    return list(metrics.REGISTRY._collector_to_names)


def test_pod_start_observes_success_and_counts_failure() -> None:
    before = value("criv_pod_start_duration_seconds_count", mode="t1", start="cold")
    with metrics.pod_start("t1"):
        pass
    assert value("criv_pod_start_duration_seconds_count", mode="t1", start="cold") == before + 1
    with pytest.raises(RuntimeError), metrics.pod_start("t1"):
        raise RuntimeError("boot failed")
    assert value("criv_pod_start_failures_total", mode="t1") == 1
    assert value("criv_pod_start_duration_seconds_count", mode="t1", start="cold") == before + 1
    with metrics.pod_start("t1") as start:
        start.kind = "template"
    assert value("criv_pod_start_duration_seconds_count", mode="t1", start="template") == 1


async def test_timed_pull_counts_by_result() -> None:
    ok = value("criv_image_pulls_total", result="ok")
    err = value("criv_image_pulls_total", result="error")

    async def good() -> str:
        return "sha256:x"

    async def bad() -> str:
        raise CrivError("registry down")

    assert await metrics.timed_pull(good()) == "sha256:x"
    with pytest.raises(CrivError):
        await metrics.timed_pull(bad())
    assert value("criv_image_pulls_total", result="ok") == ok + 1
    assert value("criv_image_pulls_total", result="error") == err + 1


def test_sweep_counts_by_result() -> None:
    with metrics.sweep("t-net"):
        pass
    with pytest.raises(CrivError), metrics.sweep("t-net"):
        raise CrivError("libvirt gone")
    assert value("criv_startup_sweeps_total", sweeper="t-net", result="ok") == 1
    assert value("criv_startup_sweeps_total", sweeper="t-net", result="error") == 1


class _Images(api_pb2_grpc.ImageServiceServicer):  # type: ignore[misc]
    async def ImageStatus(self, request: object, context: object) -> object:
        raise NotFound("no such image")

    async def ListImages(self, request: object, context: object) -> object:
        return api_pb2.ListImagesResponse()

    async def ImageFsInfo(self, request: object, context: grpc.aio.ServicerContext) -> object:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "busy")


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    api_pb2_grpc.add_ImageServiceServicer_to_server(_Images(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    await server.stop(None)


async def test_interceptor_counts_each_call_by_rpc_and_code(channel: grpc.aio.Channel) -> None:
    stub = api_pb2_grpc.ImageServiceStub(channel)
    calls = [
        ("ListImages", "OK", api_pb2.ListImagesRequest()),
        ("ImageStatus", "NOT_FOUND", api_pb2.ImageStatusRequest()),
        ("ImageFsInfo", "UNAVAILABLE", api_pb2.ImageFsInfoRequest()),
    ]
    before = {rpc: value("criv_cri_requests_total", rpc=rpc, code=code) for rpc, code, _ in calls}
    for rpc, _code, req in calls:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await getattr(stub, rpc)(req)
    for rpc, code, _ in calls:
        assert value("criv_cri_requests_total", rpc=rpc, code=code) == before[rpc] + 1, rpc
        assert value("criv_cri_request_duration_seconds_count", rpc=rpc) >= 1


async def test_agent_client_counts_failed_calls_but_not_the_probe(tmp_path: Path) -> None:
    def failed(method: str) -> float:
        return sum(
            value("criv_agent_rpc_errors_total", method=method, code=code)
            for code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
        )

    client = AgentClient(f"unix:{tmp_path}/nothing.sock")  # no agent there
    try:
        with pytest.raises(CrivError):
            await client.stats(["c1"])
        with pytest.raises(CrivError):
            await client.health(timeout=0.5)  # what connect polls while an agent boots
    finally:
        await client.close()
    assert failed("Stats") == 1
    assert failed("Health") == 0
