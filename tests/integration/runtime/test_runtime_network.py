"""Pod networking end to end: CNI IPs, reachability, shared localhost, several pods,
hostNetwork, port mappings, list filters."""

from __future__ import annotations

import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import BRIDGE, SUBNET_PREFIX, Cri
from tests.support.registry import free_port

pytestmark = pytest.mark.integration


def _ping(ip: str) -> bool:
    # up to 3 tries: the first echo can be lost while the bridge learns the new port
    r = subprocess.run(["busybox", "ping", "-c", "3", "-W", "2", ip], capture_output=True)
    return r.returncode == 0


@pytest.mark.timeout(120)
def test_containers_of_a_pod_share_localhost(cri: Cri) -> None:
    pod = cri.run_pod("share")
    server = cri.run(pod, "server", ["sh", "-c", "echo pong | nc -l -p 7777"])
    time.sleep(0.3)
    deadline = time.monotonic() + 10
    while True:
        r = cri.exec(server, ["true"])  # the server container is up
        client = cri.run(pod, f"client{int(time.monotonic() * 1000)}",
                         ["sh", "-c", "nc 127.0.0.1 7777 </dev/null"])  # fmt: skip
        st = cri.wait_exited(client)
        if "pong" in cri.log(pod, st.metadata.name) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.exit_code == 0
    assert "stdout F pong" in cri.log(pod, st.metadata.name)
    assert cri.wait_exited(server).exit_code == 0


@pytest.mark.timeout(180)
def test_several_pods_get_ips_reachable_from_host(cri: Cri) -> None:
    names = [f"many{i}" for i in range(4)]
    with ThreadPoolExecutor(4) as ex:
        pods = list(ex.map(lambda n: cri.run_pod(n), names))
    ips = [cri.pod_status(p).network.ip for p in pods]
    assert len(set(ips)) == 4 and all(ip.startswith(SUBNET_PREFIX) for ip in ips)
    for p in pods:
        cri.run(p, "srv", ["sh", "-c", "while :; do echo hi | nc -l -p 8080; done"])
    for ip in ips:
        assert _ping(ip), ip
    deadline = time.monotonic() + 10
    for ip in ips:
        while True:
            try:
                with socket.create_connection((ip, 8080), timeout=2) as s:
                    assert s.recv(16) == b"hi\n"
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    # list filters: label selector, state, id prefix
    by_label = api_pb2.PodSandboxFilter(label_selector={"app": "many2"})
    lst = cri.rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(filter=by_label), timeout=10).items
    assert [p.id for p in lst] == [pods[2]]
    lst = cri.rt.ListPodSandbox(
        api_pb2.ListPodSandboxRequest(filter=api_pb2.PodSandboxFilter(id=pods[1][:10])), timeout=10
    ).items
    assert [p.id for p in lst] == [pods[1]]
    cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pods[0]), timeout=30)
    ready = api_pb2.PodSandboxFilter(
        state=api_pb2.PodSandboxStateValue(state=api_pb2.SANDBOX_READY)
    )
    lst = cri.rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(filter=ready), timeout=10).items
    assert sorted(p.id for p in lst) == sorted(pods[1:])
    assert cri.pod_status(pods[0]).network.ip == ""
    cs = cri.rt.ListContainers(
        api_pb2.ListContainersRequest(
            filter=api_pb2.ContainerFilter(
                pod_sandbox_id=pods[3],
                state=api_pb2.ContainerStateValue(state=api_pb2.CONTAINER_RUNNING),
            )
        ),
        timeout=10,
    ).containers
    assert len(cs) == 1 and cs[0].pod_sandbox_id == pods[3]


@pytest.mark.timeout(120)
def test_host_network_and_port_mapping(cri: Cri) -> None:
    host_pod = cri.run_pod(
        "hostnet",
        linux=api_pb2.LinuxPodSandboxConfig(
            security_context=api_pb2.LinuxSandboxSecurityContext(
                namespace_options=api_pb2.NamespaceOption(network=api_pb2.NODE)
            )
        ),
    )
    assert cri.pod_status(host_pod).network.ip == ""
    cid = cri.run(host_pod, "links", ["sleep", "1000"])
    links = cri.exec(cid, ["ip", "-o", "link"]).stdout.decode()
    assert BRIDGE in links  # the host's interfaces
    port = free_port()
    mapped = cri.run_pod(
        "mapped",
        port_mappings=[
            api_pb2.PortMapping(protocol=api_pb2.TCP, container_port=80, host_port=port)
        ],
    )
    cri.run(mapped, "web", ["sh", "-c", "while :; do echo mapped | nc -l -p 80; done"])
    host_ip = (
        subprocess.run(["ip", "-4", "-o", "addr", "show", BRIDGE], capture_output=True, text=True)
        .stdout.split()[3]
        .split("/")[0]
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection((host_ip, port), timeout=2) as s:
                assert s.recv(16) == b"mapped\n"
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
