"""The whole pod + container lifecycle through criv's socket (host isolation)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support import scenarios
from tests.support.cri import Cri

pytestmark = pytest.mark.integration


@pytest.mark.timeout(120)
def test_pod_and_container_lifecycle(cri: Cri) -> None:
    scenarios.pod_and_container_lifecycle(cri)


def _code(e: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return e.value.code()


@pytest.mark.timeout(120)
def test_names_reserved_and_missing_ids_succeed(cri: Cri) -> None:
    pod = cri.run_pod("named")
    with pytest.raises(grpc.RpcError) as e:
        cri.rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=cri._pods[pod]), timeout=30)
    assert _code(e) == grpc.StatusCode.ALREADY_EXISTS
    assert pod in e.value.details()
    cid = cri.create(pod, "c", ["sleep", "100"])
    with pytest.raises(grpc.RpcError) as e:
        cri.create(pod, "c", ["sleep", "100"])
    assert _code(e) == grpc.StatusCode.ALREADY_EXISTS
    cri.rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=30)
    cid2 = cri.create(pod, "c", ["sleep", "100"])  # the name is free again
    assert cid2 != cid
    # Stop/Remove of ids that do not exist are successes.
    for rpc, req in [
        (cri.rt.StopContainer, api_pb2.StopContainerRequest(container_id="f" * 64)),
        (cri.rt.RemoveContainer, api_pb2.RemoveContainerRequest(container_id="f" * 64)),
        (cri.rt.StopPodSandbox, api_pb2.StopPodSandboxRequest(pod_sandbox_id="f" * 64)),
        (cri.rt.RemovePodSandbox, api_pb2.RemovePodSandboxRequest(pod_sandbox_id="f" * 64)),
    ]:
        rpc(req, timeout=10)
    with pytest.raises(grpc.RpcError) as e:
        cri.status("f" * 64)
    assert _code(e) == grpc.StatusCode.NOT_FOUND
    # Removing the pod removes its containers and frees its name.
    cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=30)
    cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=30)
    cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=30)
    assert not cri.rt.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers
    again = cri.rt.RunPodSandbox(
        api_pb2.RunPodSandboxRequest(config=cri._pods[pod]), timeout=60
    ).pod_sandbox_id
    assert again != pod


@pytest.mark.timeout(60)
def test_unknown_handler_and_host_pod_policy(cri_factory: Any) -> None:
    cri = cri_factory(pull=False)
    with pytest.raises(grpc.RpcError) as e:
        cri.run_pod("h", handler="kata")
    assert _code(e) == grpc.StatusCode.NOT_FOUND
    assert "'kata'" in e.value.details() and "'host'" in e.value.details()
    strict = cri_factory(pull=False, runtime={"host_pods": "reject"})
    with pytest.raises(grpc.RpcError) as e:
        strict.run_pod("h2", handler="host")
    assert _code(e) == grpc.StatusCode.PERMISSION_DENIED
    assert "host_pods" in e.value.details()
    assert not strict.rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items


@pytest.mark.timeout(60)
def test_run_pod_retry_after_caller_gave_up_gets_the_same_pod(cri: Cri) -> None:
    cfg = cri.pod_config("impatient")
    req = api_pb2.RunPodSandboxRequest(config=cfg)
    with pytest.raises(grpc.RpcError) as e:
        cri.rt.RunPodSandbox(req, timeout=0.05)
    assert _code(e) == grpc.StatusCode.DEADLINE_EXCEEDED
    pod = cri.rt.RunPodSandbox(req, timeout=60).pod_sandbox_id
    cri._pods[pod] = cfg
    items = cri.rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items
    assert [p.id for p in items] == [pod]
    assert cri.pod_status(pod).state == api_pb2.SANDBOX_READY
    # delivered now: a third call with the same name is a conflict again
    with pytest.raises(grpc.RpcError) as e:
        cri.rt.RunPodSandbox(req, timeout=30)
    assert _code(e) == grpc.StatusCode.ALREADY_EXISTS
