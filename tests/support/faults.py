"""Fault injection through a real criv, for the host (tests/integration/faults) and vm
(tests/vm/faults) suites: arm a failpoint (criv/failpoints.py), drive the CRI call that
reaches it, restart criv without it, then do what kubelet does next and check the result.

The outcome must be one of the two kubelet can live with: the pod whole and working
(a container in it runs commands), or gone once kubelet's retries have run
(StopPodSandbox and RemovePodSandbox succeed, RunPodSandbox with the same metadata works
again). Leaks (processes, netns, mounts, links, cgroups, domains) are the suites'
teardown checks; :func:`check_gone` adds criv's own dirs and the IPAM store.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from criv.failpoints import ENV, POINTS
from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri

POD = "victim"
APP = "app"
SLEEP = ["sleep", "100000"]
IP_FILE = re.compile(r"^\d+\.\d+\.\d+\.\d+$")

HOST_POINTS = [p for p in POINTS if not p.startswith("vm_boot.")]
# After this one only steps that cannot fail remain (forget the pod, release its name):
# a crash there is tested, an injected error would test nothing real.
ERROR_POINTS = [p for p in HOST_POINTS if p != "remove_pod.after_record"]
# a kill inside these leaves the pod's agent (VM) untouched: the pod must stay READY
KEEPS_POD = ("create_container.", "start_container.")


@contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def restart(cri: Cri, failpoints: str = "") -> None:
    """Start criv again (with ``failpoints`` armed, if any); a running one stops first."""
    rc = cri.proc.stop()
    assert rc in (0, -9), f"criv exited {rc}:\n{cri.proc.logs()}"
    if cri._exec_channel is not None:
        cri._exec_channel.close()
        cri._exec_channel = None
    with _env(ENV, failpoints):
        cri.proc.start()


def _stop_remove(cri: Cri, pod_id: str) -> None:
    cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
    cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)


def _fails(call: Callable[[], object]) -> grpc.RpcError:
    try:
        call()
    except grpc.RpcError as e:
        return e
    raise AssertionError("the call passed its failpoint")


def drive(cri: Cri, point: str) -> tuple[grpc.RpcError, str, str]:
    """Make the calls up to the one that reaches ``point``; (its error, pod id, container
    id), ids "" where not made."""
    family = point.split(".")[0]
    if family in ("run_pod", "vm_boot"):
        return _fails(lambda: cri.run_pod(POD)), "", ""
    pod = cri.run_pod(POD)
    if family == "create_container":
        return _fails(lambda: cri.create(pod, APP, SLEEP)), pod, ""
    cid = cri.create(pod, APP, SLEEP)
    if family == "start_container":
        return _fails(lambda: cri.start(cid)), pod, cid
    cri.start(cid)
    rt = cri.rt
    if family == "stop_pod":
        stop = api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod)
        return _fails(lambda: rt.StopPodSandbox(stop, timeout=120)), pod, cid
    assert family == "remove_pod", point
    rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=120)
    remove = api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod)
    return _fails(lambda: rt.RemovePodSandbox(remove, timeout=120)), pod, cid


def crash_at(cri: Cri, point: str) -> tuple[str, str]:
    """criv killed at ``point`` and started again clean; (pod id, container id) made."""
    restart(cri, f"{point}=kill")
    err, pod, cid = drive(cri, point)
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert cri.proc.proc is not None and cri.proc.proc.wait(30) == -9, cri.proc.logs()
    assert f"failpoint {point}: killing criv" in cri.proc.logs()
    restart(cri)
    return pod, cid


def fail_once_at(cri: Cri, point: str) -> tuple[str, str]:
    """The step at ``point`` fails once; criv stays up."""
    restart(cri, f"{point}=error-once")
    err, pod, cid = drive(cri, point)
    assert err.code() == grpc.StatusCode.INTERNAL and f"failpoint {point}" in str(err.details())
    return pod, cid


def pods(cri: Cri) -> list[api_pb2.PodSandbox]:
    return list(cri.rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30).items)


def containers(cri: Cri, pod_id: str) -> list[api_pb2.Container]:
    f = api_pb2.ContainerFilter(pod_sandbox_id=pod_id)
    req = api_pb2.ListContainersRequest(filter=f)
    return list(cri.rt.ListContainers(req, timeout=30).containers)


def check_after_crash(cri: Cri, point: str, pod: str, cid: str) -> None:
    """What the restarted criv must report at once, before kubelet does anything."""
    listed = {p.id: p.state for p in pods(cri)}
    if point.startswith(KEEPS_POD):
        assert listed == {pod: api_pb2.SANDBOX_READY}, listed
    if point.startswith("start_container."):
        # the agent started it before criv died: the new criv learns so from the agent
        assert cri.status(cid).state == api_pb2.CONTAINER_RUNNING
        assert cri.exec(cid, ["echo", "ok"]).stdout == b"ok\n"
    if point.startswith(("run_pod.", "vm_boot.")) and point != "run_pod.after_ready":
        assert not listed, f"a pod criv was creating survived the crash: {listed}"


def converge(cri: Cri, point: str, run_again: bool = True) -> None:
    """kubelet's next steps: a pod it wanted gone (stop_pod, remove_pod) or that is not
    READY is stopped and removed; then (``run_again``) the pod runs with the same
    metadata, failed containers are removed, and a running container takes commands."""
    want_gone = point.startswith(("stop_pod.", "remove_pod."))
    keep = ""
    for p in pods(cri):
        assert p.metadata.name == POD, p
        if p.state == api_pb2.SANDBOX_READY and not want_gone:
            keep = p.id
            cri._pods.setdefault(p.id, cri.pod_config(POD))  # kubelet finds it by its uid
        else:
            _stop_remove(cri, p.id)
    if not keep:
        assert not pods(cri)
        if not run_again:
            return
        keep = cri.run_pod(POD)
    running = ""
    for c in containers(cri, keep):
        if c.state == api_pb2.CONTAINER_RUNNING:
            running = c.id
            continue
        cri.rt.StopContainer(api_pb2.StopContainerRequest(container_id=c.id), timeout=60)
        cri.rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=c.id), timeout=60)
    if not running:
        running = cri.run(keep, APP, SLEEP)
    assert cri.exec(running, ["echo", "ok"]).stdout == b"ok\n"


def ipam_addresses(cri: Cri) -> set[str]:
    """Addresses held in the suite's host-local IPAM store (tests/support/cri.py)."""
    root = Path(cri.proc.config["cni"]["conf_dir"]).parent / "ipam"
    return {p.name for p in root.rglob("*") if IP_FILE.match(p.name)} if root.is_dir() else set()


def check_gone(cri: Cri, ipam_before: set[str]) -> None:
    """Everything removed the way kubelet removes it; nothing of it left in criv's dirs."""
    for p in pods(cri):
        _stop_remove(cri, p.id)
    assert not pods(cri)
    assert not cri.rt.ListContainers(api_pb2.ListContainersRequest(), timeout=30).containers
    assert ipam_addresses(cri) == ipam_before, "IPAM addresses leaked"
    state = Path(cri.proc.config["state_dir"]) / "sandboxes"
    run = Path(cri.proc.config["run_dir"]) / "p"
    for d in (state, run):
        left = sorted(x.name for x in d.iterdir()) if d.is_dir() else []
        assert not left, f"left in {d}: {left}"
