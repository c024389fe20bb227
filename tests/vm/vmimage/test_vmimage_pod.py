"""A `vm-image` pod through the real daemon and CRI: the VM test disk pushed to the test
registry as a containerDisk, pulled, booted as the pod's one container (one VM boot for
the whole module: TCG boots cost), exec'd into over SSH, logged from its console,
stopped by the ACPI button with a clean power-off (exit 0, Completed). Refusals: an
image without a disk, and a second container in the pod."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri
from tests.support.fixtures import TestRegistry
from tests.support.spdy_client import SpdyClient, forward_one, spdy_exec
from tests.support.streaming import exec_url, port_forward_url
from tests.support.vmimage import HANDLERS, create, push_containerdisk

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]


def test_vmimage_pod_lifecycle(
    vm_cri_factory: Callable[..., Cri],
    registry: TestRegistry,
    test_disk: Path,
    tmp_path: Path,
) -> None:
    cri = vm_cri_factory(runtime={"handlers": HANDLERS})
    ref = push_containerdisk(registry, test_disk, tmp_path)
    cri.proc.images.PullImage(
        api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref)), timeout=300
    )
    t0 = time.monotonic()
    pod = cri.run_pod("vmi", handler="vm-image")
    assert cri.pod_status(pod).state == api_pb2.SANDBOX_READY

    # an image without a disk is refused, naming why
    with pytest.raises(grpc.RpcError) as e:
        create(cri, pod, "plain", cri.image)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "containerDisk" in str(e.value.details()), e.value.details()

    cid = create(cri, pod, "vm", ref)
    # one container per pod
    with pytest.raises(grpc.RpcError) as e:
        create(cri, pod, "second", ref)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "one container" in str(e.value.details()), e.value.details()

    cri.start(cid)
    assert cri.status(cid).state == api_pb2.CONTAINER_RUNNING
    # the first exec waits (bounded) for the host key on the console and SSH
    r = cri.exec(cid, ["hostname"], timeout=180)
    boot_to_exec = time.monotonic() - t0
    print(f"[vm-image] RunPodSandbox to first ExecSync answer: {boot_to_exec:.1f} s")
    assert (r.exit_code, r.stdout) == (0, b"vmi\n"), (r, cri.proc.logs())
    # an MBR disk with boot code: SeaBIOS, so the guest sees no EFI (test_vmimage_uefi.py)
    assert cri.exec(cid, ["test", "-d", "/sys/firmware/efi"]).exit_code == 1
    r = cri.exec(cid, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.exit_code, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
    ip = cri.pod_status(pod).network.ip
    r = cri.exec(cid, ["ip", "-o", "-4", "addr", "show", "eth0"])
    assert r.exit_code == 0 and f" {ip}/".encode() in r.stdout, r

    # stats from libvirt: the VM's CPU time and QEMU's resident memory
    stats = cri.rt.ContainerStats(api_pb2.ContainerStatsRequest(container_id=cid), timeout=30)
    assert stats.stats.cpu.usage_core_nano_seconds.value > 0, stats
    assert stats.stats.memory.working_set_bytes.value > 16 << 20, stats
    # the writable layer is the overlay on the host: it grows by what the guest writes
    before = stats.stats.writable_layer.used_bytes.value
    assert before > 0, stats
    r = cri.exec(cid, ["sh", "-c", "dd if=/dev/urandom of=/root/blob bs=1M count=8 && sync"])
    assert r.exit_code == 0, r
    stats = cri.rt.ContainerStats(api_pb2.ContainerStatsRequest(container_id=cid), timeout=30)
    assert stats.stats.writable_layer.used_bytes.value >= before + (8 << 20), (before, stats)

    # interactive exec with stdin, over the streaming server
    res = asyncio.run(spdy_exec(exec_url(cri, cid, ["cat"], stdin=True), stdin=b"via ssh\n"))
    assert res.stdout == b"via ssh\n" and res.status["status"] == "Success", res.status
    res = asyncio.run(spdy_exec(exec_url(cri, cid, ["sh", "-c", "exit 7"])))
    assert res.status["details"] == {"causes": [{"reason": "ExitCode", "message": "7"}]}

    # port-forward reaches the VM's port (its SSH server) at the pod IP
    banner = asyncio.run(forward(cri, pod, 22, b"SSH-2.0-criv-test\r\n"))
    assert banner.startswith(b"SSH-2.0-"), banner

    # the console is the container's log, followed live and reopened on request
    log = cri.log(pod, "vm")
    assert "criv-test-disk: ready" in log and " stdout F " in log, log[-2000:]
    path = cri.logs / "vmi" / "vm.log"
    path.rename(path.with_name("vm.log.1"))
    cri.rt.ReopenContainerLog(api_pb2.ReopenContainerLogRequest(container_id=cid), timeout=30)
    r = cri.exec(cid, ["sh", "-c", "echo console-marker-42 >/dev/console"])
    assert r.exit_code == 0, r
    deadline = time.monotonic() + 30
    while "console-marker-42" not in (path.read_text() if path.exists() else ""):
        assert time.monotonic() < deadline, "the console line never reached the reopened log"
        time.sleep(0.2)

    # StopContainer: the ACPI power button, a clean power-off
    cri.rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=120), timeout=200)
    st = cri.status(cid)
    assert (st.state, st.exit_code, st.reason) == (api_pb2.CONTAINER_EXITED, 0, "Completed")
    with pytest.raises(grpc.RpcError) as e:
        cri.exec(cid, ["true"])
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    cri.rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=60)

    # the pod's next container (kubelet's restart) boots a fresh overlay; a stop with no
    # time to power off destroys it: Killed, 137
    cid2 = create(cri, pod, "vm2", ref)
    cri.start(cid2)
    cri.rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid2, timeout=0), timeout=60)
    st = cri.status(cid2)
    assert (st.state, st.exit_code, st.reason) == (api_pb2.CONTAINER_EXITED, 137, "Killed"), st


async def forward(cri: Cri, pod: str, port: int, payload: bytes) -> bytes:
    _resp, c = await SpdyClient.connect(port_forward_url(cri, pod), ["portforward.k8s.io"])
    assert c is not None
    try:
        async with asyncio.timeout(60):
            return await forward_one(c, port, 1, payload)
    finally:
        await c.close()
