"""vm pods: a seccomp Localhost profile (a host path the guest cannot read), read-only
and recursive read-only volumes with a sub-mount, an image volume with a sub-path,
host-to-container propagation, and bidirectional propagation refused. One pod for all
of it (TCG boots are slow)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri
from tests.support.fixtures import TestRegistry
from tests.support.images import LayerBuilder, build_image, build_layer

pytestmark = pytest.mark.vm

SP = api_pb2.SecurityProfile


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@contextlib.contextmanager
def _mounted(*points: Path) -> Iterator[None]:
    try:
        yield
    finally:
        for p in reversed(points):
            subprocess.run(["umount", "-R", "--lazy", str(p)], capture_output=True)


def _rc(cri: Cri, cid: str, cmd: str) -> tuple[int, str]:
    r = cri.exec(cid, ["sh", "-c", cmd], timeout=60)
    return r.exit_code, (r.stdout + r.stderr).decode()


@pytest.mark.timeout(600)
def test_vm_pod_seccomp_profile_read_only_volumes_and_propagation(
    vm_cri: Cri, tmp_path: Path, registry: TestRegistry
) -> None:
    vol, shared = tmp_path / "vol", tmp_path / "shared"
    (vol / "sub").mkdir(parents=True)
    (shared / "late").mkdir(parents=True)
    profile = tmp_path / "no-sethostname.json"
    rules = [{"names": ["sethostname"], "action": "SCMP_ACT_ERRNO"}]
    profile.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": rules}))
    cap = api_pb2.Capability(add_capabilities=["SYS_ADMIN"])
    confined = api_pb2.LinuxContainerSecurityContext(
        capabilities=cap, seccomp=SP(profile_type=SP.Localhost, localhost_ref=str(profile))
    )
    free = api_pb2.LinuxContainerSecurityContext(capabilities=cap)
    sleep = ["sleep", "3600"]
    # an image volume: two layers (an overlay on the host), only data/sub mounted
    l1 = LayerBuilder().dir("data").file("data/top.txt", "top\n").dir("data/sub")
    l2 = LayerBuilder().dir("data").dir("data/sub").file("data/sub/b.txt", "from the image\n")
    registry.push_image(
        "criv-test/vm-imagevol", "1", build_image([build_layer(l1), build_layer(l2)])
    )
    data_ref = registry.ref("criv-test/vm-imagevol", "1")
    vm_cri.proc.images.PullImage(
        api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=data_ref)), timeout=120
    )
    with _mounted(vol / "sub", shared):
        _sh("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(vol / "sub"))
        _sh("mount", "--bind", str(shared), str(shared))
        _sh("mount", "--make-private", str(shared))
        _sh("mount", "--make-shared", str(shared))
        pod = vm_cri.run_pod("mounts")
        mounts = [
            api_pb2.Mount(container_path="/ro", host_path=str(vol), readonly=True),
            api_pb2.Mount(
                container_path="/rro", host_path=str(vol), readonly=True, recursive_read_only=True
            ),
            api_pb2.Mount(
                container_path="/h2c",
                host_path=str(shared),
                propagation=api_pb2.PROPAGATION_HOST_TO_CONTAINER,
            ),
            api_pb2.Mount(
                container_path="/img",
                image=api_pb2.ImageSpec(image=data_ref),
                image_sub_path="data/sub",
            ),
        ]
        cid = vm_cri.run(pod, "confined", sleep, security=confined, mounts=mounts)
        other = vm_cri.run(pod, "free", sleep, security=free)

        # the profile criv read on the host holds in the guest, capability or not
        rc, out = _rc(vm_cri, cid, "hostname foo")
        assert rc != 0 and "Operation not permitted" in out, out
        assert _rc(vm_cri, other, "hostname foo")[0] == 0

        # the image volume: the sub-path only, read-only in the guest container
        assert _rc(vm_cri, cid, "cat /img/b.txt; ls /img") == (0, "from the image\nb.txt\n")
        rc, out = _rc(vm_cri, cid, "touch /img/new")
        assert rc != 0 and "Read-only file system" in out, out
        image = {m.container_path: m for m in vm_cri.status(cid).mounts}["/img"].image
        assert image.image == data_ref and "@sha256:" in image.image_ref, image

        # read-only top; the sub-mount reached the guest; recursive: read-only all down
        rc, out = _rc(vm_cri, cid, "touch /ro/top")
        assert rc != 0 and "Read-only file system" in out, out
        assert _rc(vm_cri, cid, "grep -q ' /rro/sub ' /proc/self/mountinfo || ls /rro/sub")[0] == 0
        rc, out = _rc(vm_cri, cid, "touch /rro/sub/f")
        assert rc != 0 and "Read-only file system" in out, out
        assert not (vol / "top").exists() and not (vol / "sub" / "f").exists()
        # unlike containerd (docs/vm.md): the guest mounts the sub-mount on first use,
        # under the container's read-only bind, whose flags it takes
        rc, out = _rc(vm_cri, cid, "touch /ro/sub/g")
        assert rc != 0 and "Read-only file system" in out, out

        # a mount the host makes under the volume after the container started
        _sh("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(shared / "late"))
        (shared / "late" / "marker").write_text("from the host\n")
        deadline = time.monotonic() + 30
        while (r := _rc(vm_cri, cid, "cat /h2c/late/marker"))[0] != 0:
            assert time.monotonic() < deadline, r
            time.sleep(0.5)
        assert r[1] == "from the host\n"

        bidi = api_pb2.Mount(
            container_path="/b",
            host_path=str(shared),
            propagation=api_pb2.PROPAGATION_BIDIRECTIONAL,
        )
        with pytest.raises(grpc.RpcError) as e:
            vm_cri.create(pod, "bidi", sleep, mounts=[bidi])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "vm isolation" in str(e.value.details())
        vm_cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=120)
        vm_cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=120)
