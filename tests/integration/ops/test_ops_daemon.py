"""Metrics and the operator commands against a real criv with a host-mode pod: after a pod,
a container and an exec ran, the endpoint shows every family with the counts that run
made, and `criv pods` / `containers` / `inspect` / `debug` / `console` show that pod."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.integration.ops.opstools import criv_cli, free_port, sample, scrape, table_row
from tests.support.cri import Cri

pytestmark = pytest.mark.integration


def _verbose(cri: Cri, pod: str) -> dict[str, Any]:
    resp = cri.rt.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod, verbose=True), timeout=30
    )
    info: dict[str, Any] = json.loads(resp.info["info"])
    return info


@pytest.mark.timeout(180)
def test_metrics_after_a_pod_ran(cri_factory: Any) -> None:
    port = free_port()
    cri: Cri = cri_factory(metrics={"address": f"127.0.0.1:{port}"})  # pulls busybox
    pod = cri.run_pod("metered")
    cid = cri.run(pod, "app", ["sleep", "300"])
    assert cri.exec(cid, ["echo", "hi"]).stdout == b"hi\n"
    with pytest.raises(grpc.RpcError):
        cri.status("f" * 64)  # a NOT_FOUND to count

    families, s = scrape(port)
    for family in (
        "criv_cri_requests", "criv_cri_request_duration_seconds",
        "criv_pod_start_duration_seconds", "criv_pod_start_failures", "criv_sandboxes_running",
        "criv_template_hits", "criv_template_misses", "criv_vsock_backend_bytes",
        "criv_vsock_backend_device_resets", "criv_agent_rpc_errors", "criv_image_pulls",
        "criv_image_pull_bytes", "criv_image_pull_duration_seconds", "criv_startup_sweeps",
        "criv_swept_resources",
    ):  # fmt: skip
        assert family in families, family
    for rpc in ("RunPodSandbox", "CreateContainer", "StartContainer", "ExecSync", "PullImage"):
        assert sample(s, "criv_cri_requests_total", rpc=rpc, code="OK") >= 1, rpc
        assert sample(s, "criv_cri_request_duration_seconds_count", rpc=rpc) >= 1, rpc
    assert sample(s, "criv_cri_requests_total", rpc="ContainerStatus", code="NOT_FOUND") == 1
    assert sample(s, "criv_pod_start_duration_seconds_count", mode="host", start="cold") == 1
    assert sample(s, "criv_pod_start_duration_seconds_sum", mode="host", start="cold") > 0
    assert sample(s, "criv_sandboxes_running", mode="host") == 1
    assert sample(s, "criv_sandboxes_running", mode="vm") == 0
    assert sample(s, "criv_image_pulls_total", result="ok") == 1
    assert sample(s, "criv_image_pull_bytes_total") > 0
    assert sample(s, "criv_startup_sweeps_total", sweeper="network", result="ok") == 1
    assert sample(s, "criv_startup_sweeps_total", sweeper="host", result="ok") == 1
    assert sample(s, "criv_template_hits_total") == 0  # no templating: never made up
    assert sample(s, "process_resident_memory_bytes") > 0

    cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=60)
    _, s = scrape(port)
    assert sample(s, "criv_sandboxes_running", mode="host") == 0


@pytest.mark.timeout(180)
def test_operator_commands_show_a_host_pod(cri: Cri) -> None:
    pod = cri.run_pod("ops")
    cid = cri.run(pod, "app", ["sleep", "300"])
    info = _verbose(cri, pod)
    agent = info["pid"]
    ip = cri.pod_status(pod).network.ip
    assert agent > 0 and ip

    out = criv_cli(cri, "pods").stdout
    assert out.splitlines()[0].split() == [
        "POD", "ID", "NAME", "NAMESPACE", "MODE", "STATE", "IP", "PID", "MEMORY", "UPTIME",
    ]  # fmt: skip
    row = table_row(out, pod[:13])
    assert row[1:7] == ["ops", "default", "host", "ready", ip, str(agent)]
    assert row[7].endswith(("Ki", "Mi")) and row[8].endswith("s"), row
    listed = json.loads(criv_cli(cri, "pods", "--json").stdout)
    (mine,) = [p for p in listed if p["id"] == pod]
    assert mine["process"]["role"] == "agent" and mine["process"]["pid"] == agent
    assert mine["process"]["rssKiB"] > 0 and mine["containers"] == [cid]

    cpid = json.loads(
        cri.rt.ContainerStatus(
            api_pb2.ContainerStatusRequest(container_id=cid, verbose=True), timeout=30
        ).info["info"]
    )["pid"]
    row = table_row(criv_cli(cri, "containers").stdout, cid[:13])
    assert row[1:8] == ["app", "ops", "default", "host", "running", ip, str(cpid)]
    assert row[8] != "-", row  # working set from CRI stats

    doc = json.loads(criv_cli(cri, "inspect", pod[:10]).stdout)
    assert doc["kind"] == "pod" and doc["id"] == pod
    assert doc["record"]["kind"] == "sandbox" and doc["record"]["data"]["id"] == pod
    assert Path(doc["paths"]["record"]).is_file() and Path(doc["paths"]["agentLog"]).is_file()
    assert Path(doc["paths"]["agentControlSocket"]).is_socket()
    assert [p["role"] for p in doc["processes"]] == ["agent"]
    assert doc["processes"][0]["pid"] == agent and doc["processes"][0]["pssKiB"] > 0
    assert "domainXml" not in doc
    doc = json.loads(criv_cli(cri, "inspect", cid).stdout)
    assert doc["kind"] == "container" and doc["podId"] == pod
    assert doc["record"]["data"]["id"] == cid and doc["pod"]["mode"] == "host"
    missing = criv_cli(cri, "inspect", "0" * 64, check=False)
    assert missing.returncode == 1 and "no pod sandbox or container" in missing.stderr

    # debug: the pod's hostname (UTS of its holder) and address (its netns), audited
    r = criv_cli(cri, "debug", pod, "-c", "hostname; ip -o -4 addr show")
    assert r.stdout.splitlines()[0] == "ops"
    assert f"inet {ip}/" in r.stdout
    audit = [
        json.loads(line)
        for line in (cri.proc.state_dir / "audit.log").read_text().split("\n")
        if line
    ]
    assert [a["event"] for a in audit] == ["debug-start", "debug-end"]
    assert audit[0]["pod"] == pod and audit[0]["command"][-1].startswith("hostname")
    assert audit[1]["exitStatus"] == 0
    r = criv_cli(cri, "debug", pod, "-c", "exit 3", check=False)
    assert r.returncode == 3

    r = criv_cli(cri, "console", pod, check=False)
    assert r.returncode == 1 and "no VM console" in r.stderr
