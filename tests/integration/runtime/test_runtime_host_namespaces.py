"""Host-namespace pods by policy (runtime.host_namespace_pods), through a real criv whose
default handler "" maps to vm, as shipped: kubelet's system pods (hostNetwork, hostPID,
hostIPC, no RuntimeClass) run in host isolation, or are refused with the policy named.
No VM boots here: the pods that would need one are the refused ones."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri
from tests.support.spdy_client import SpdyClient, forward_one
from tests.support.streaming import connect_once, port_forward_url

pytestmark = pytest.mark.integration

SHIPPED_HANDLERS = {"runtime": {"handlers": {"": "vm", "vm": "vm", "host": "host"}}}
NODE = api_pb2.NODE


def _ns(network: int = 0, pid: int = 0, ipc: int = 0) -> dict[str, Any]:
    """A pod config's namespace options, as kubelet sends them for host* pods."""
    opts = api_pb2.NamespaceOption(network=network, pid=pid, ipc=ipc)
    return {
        "linux": api_pb2.LinuxPodSandboxConfig(
            security_context=api_pb2.LinuxSandboxSecurityContext(namespace_options=opts)
        )
    }


def _sc(pod_ns: dict[str, Any]) -> api_pb2.LinuxContainerSecurityContext:
    """A container's security context with its pod's namespace options, as kubelet."""
    opts = pod_ns["linux"].security_context.namespace_options
    return api_pb2.LinuxContainerSecurityContext(namespace_options=opts)


def _verbose(cri: Cri, pod: str) -> dict[str, Any]:
    resp = cri.rt.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod, verbose=True), timeout=30
    )
    info: dict[str, Any] = json.loads(resp.info["info"])
    return info


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _forward(cri: Cri, pod: str, port: int, payload: bytes) -> bytes:
    _resp, c = await SpdyClient.connect(port_forward_url(cri, pod), ["portforward.k8s.io"])
    assert c is not None
    rid = 100
    async with asyncio.timeout(30):  # until the container's listener is up
        while await connect_once(c, port, rid):
            rid += 1
            await asyncio.sleep(0.1)
    got = await forward_one(c, port, 1, payload)
    await c.close()
    return got


@pytest.mark.timeout(180)
def test_host_network_pod_under_default_handler_runs_in_host_isolation(
    cri_factory: Callable[..., Cri],
) -> None:
    cri = cri_factory(**SHIPPED_HANDLERS)
    ns = _ns(network=NODE)
    pod = cri.run_pod("netd", handler="", **ns)
    assert cri.pod_status(pod).state == api_pb2.SANDBOX_READY
    info = _verbose(cri, pod)
    assert info["isolation"] == "host" and info["runtimeHandler"] == ""
    assert "hostNetwork" in info["isolationReason"]
    assert "runtime.host_namespace_pods" in info["isolationReason"]
    assert "runtime.host_namespace_pods: host" in cri.proc.logs()
    # the containers are in the host's network namespace
    cid = cri.run(pod, "main", ["sleep", "3600"], security=_sc(ns))
    r = cri.exec(cid, ["readlink", "/proc/self/ns/net"])
    assert r.stdout.decode().strip() == os.readlink("/proc/self/ns/net")
    # port-forward reaches a listener of the pod, which the host's loopback reaches too
    port = _free_port()
    cri.run(pod, "echo", ["nc", "-ll", "-p", str(port), "-e", "cat"], security=_sc(ns))
    assert asyncio.run(_forward(cri, pod, port, b"through port-forward")) == (
        b"through port-forward"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"from the host")
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100) == b"from the host"


@pytest.mark.timeout(180)
def test_host_pid_and_ipc_pods_under_default_handler_share_the_hosts(
    cri_factory: Callable[..., Cri],
) -> None:
    cri = cri_factory(**SHIPPED_HANDLERS)
    for name, ns, kind, key in (
        ("ipcd", _ns(ipc=NODE), "ipc", "hostIPC"),
        ("pidd", _ns(pid=NODE), "pid", "hostPID"),
    ):
        pod = cri.run_pod(name, handler="", **ns)
        info = _verbose(cri, pod)
        assert info["isolation"] == "host" and key in info["isolationReason"], info
        cid = cri.run(pod, "main", ["sleep", "3600"], security=_sc(ns))
        r = cri.exec(cid, ["readlink", f"/proc/self/ns/{kind}"])
        assert r.stdout.decode().strip() == os.readlink(f"/proc/self/ns/{kind}"), name
        # its own network namespace all the same (no hostNetwork asked)
        r = cri.exec(cid, ["readlink", "/proc/self/ns/net"])
        assert r.stdout.decode().strip() != os.readlink("/proc/self/ns/net")


@pytest.mark.timeout(120)
def test_reject_policy_names_the_key_and_the_fix(cri_factory: Callable[..., Cri]) -> None:
    cri = cri_factory(pull=False, runtime={**SHIPPED_HANDLERS["runtime"],
                                           "host_namespace_pods": "reject"})  # fmt: skip
    with pytest.raises(grpc.RpcError) as e:
        cri.run_pod("netd", handler="", **_ns(network=NODE))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    msg = e.value.details() or ""
    assert "runtime.host_namespace_pods: reject" in msg and "hostNetwork" in msg
    assert "runtime.host_namespace_pods: host" in msg and "RuntimeClass" in msg
    # a handler that names vm is never rerouted: a VM cannot share the host network
    with pytest.raises(grpc.RpcError) as e:
        cri.run_pod("netd2", handler="vm", **_ns(network=NODE))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not cri.rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items


@pytest.mark.timeout(120)
def test_host_pods_reject_refuses_host_namespace_pods_too(
    cri_factory: Callable[..., Cri],
) -> None:
    cri = cri_factory(pull=False, runtime={**SHIPPED_HANDLERS["runtime"], "host_pods": "reject"})
    with pytest.raises(grpc.RpcError) as e:
        cri.run_pod("pidd", handler="", **_ns(pid=NODE))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "runtime.host_namespace_pods: reject" in (e.value.details() or "")
