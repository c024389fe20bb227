"""`criv vm-image commit` through the real daemon and CLI: the builder's loop (a pod from the
test disk, a file written over SSH, a clean power-off, the container committed to a new
image and pushed, the image pulled back and booted in a new pod that sees the file), the
commit's refusals (a running container, an unknown one, a non-vm-image one, a bad
reference), and two pods of one image sharing one base file on disk."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from criv.vmimage.qcow2 import read_header
from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri
from tests.support.fixtures import TestRegistry
from tests.support.vmimage import HANDLERS, create, pull, push_containerdisk
from tests.support.vmimagecli import vm_image_cli

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]

MARK = b"provisioned-by-criv-42\n"


def commit(cri: Cri, *args: str) -> subprocess.CompletedProcess[str]:
    return vm_image_cli(cri.proc.config_path, "commit", *args, timeout=600)


def refused(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode == 1 and r.stderr.startswith("criv: "), r
    for w in words:
        assert w in r.stderr, r.stderr


def stop(cri: Cri, cid: str) -> api_pb2.ContainerStatus:
    cri.rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=120), timeout=200)
    return cri.status(cid)


def test_builder_loop(
    vm_cri_factory: Callable[..., Cri], registry: TestRegistry, test_disk: Path, tmp_path: Path
) -> None:
    if not os.path.exists("/usr/bin/skopeo"):
        pytest.skip("skopeo not installed (make install)")
    cri = vm_cri_factory(runtime={"handlers": HANDLERS})
    ref = push_containerdisk(registry, test_disk, tmp_path)
    pull(cri, ref)
    built = registry.ref("vm/built", "1")

    # refusals that need no VM: an unknown container, a container of a host pod
    refused(commit(cri, "f" * 64, built), "NOT_FOUND")
    host_pod = cri.run_pod("plain", handler="host")
    hcid = cri.create(host_pod, "c", ["sleep", "60"])
    refused(commit(cri, hcid, built), "FAILED_PRECONDITION", "not a vm-image container")

    # run the base, provision it over SSH
    pod = cri.run_pod("builder", handler="vm-image")
    cid = create(cri, pod, "vm", ref)
    cri.start(cid)
    r = cri.exec(cid, ["sh", "-c", f"printf '{MARK.decode()}' >/root/marker && sync"], timeout=180)
    assert r.exit_code == 0, (r, cri.proc.logs()[-3000:])
    refused(commit(cri, cid, built), "FAILED_PRECONDITION", "running")
    st = stop(cri, cid)
    assert (st.exit_code, st.reason) == (0, "Completed"), st
    refused(commit(cri, cid, "Not A Ref"))
    refused(commit(cri, cid, built.replace(":1", "@sha256:" + "a" * 64)), "not a digest")

    # commit and push
    t0 = time.monotonic()
    r = commit(cri, cid[:16], built, "--push", "--insecure")
    took = time.monotonic() - t0
    print(f"[vm-image] commit of the test disk (flatten, store, push): {took:.1f} s")
    assert r.returncode == 0, r.stderr + cri.proc.logs()[-3000:]
    line, pushed = r.stdout.splitlines()
    # the base's name under /disk/ (push_containerdisk: the file's stem)
    assert line.split()[0] == built and line.endswith("/disk/disk.qcow2"), r.stdout
    assert pushed == f"pushed {built}"
    image_id = line.split()[1]
    listed = cri.proc.images.ListImages(api_pb2.ListImagesRequest(), timeout=30).images
    assert [list(i.repo_tags) for i in listed if i.id == image_id] == [[built]]
    assert not list(cri.proc.state_dir.glob(".vm-image-*"))
    cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=120)
    cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=60)

    # from the registry: drop the stored image, pull what was pushed, boot it
    cri.proc.images.RemoveImage(
        api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=built)), timeout=60
    )
    pull(cri, built)
    pod2 = cri.run_pod("runner", handler="vm-image")
    cid2 = create(cri, pod2, "vm", built)
    cri.start(cid2)
    r = cri.exec(cid2, ["cat", "/root/marker"], timeout=180)
    assert (r.exit_code, r.stdout) == (0, MARK), (r, cri.proc.logs()[-3000:])
    r = cri.exec(cid2, ["hostname"])
    assert r.stdout == b"runner\n", r  # the new pod's seed, not the builder's
    # the committed disk is one qcow2 with no backing file
    bases = list((cri.proc.state_dir / "vmimage" / "bases").iterdir())
    headers = [read_header(b, b.name) for b in bases if b.suffix == ".qcow2"]
    assert headers and not any(h.has_backing for h in headers)
    assert (stop(cri, cid2).exit_code) == 0


def test_two_pods_share_one_base(
    vm_cri_factory: Callable[..., Cri], registry: TestRegistry, test_disk: Path, tmp_path: Path
) -> None:
    cri = vm_cri_factory(runtime={"handlers": HANDLERS})
    ref = push_containerdisk(registry, test_disk, tmp_path, "vm/shared")
    pull(cri, ref)
    pods = [cri.run_pod(f"share{i}", handler="vm-image") for i in range(2)]
    cids = [create(cri, p, "vm", ref) for p in pods]  # overlays made, no VM booted
    state = cri.proc.state_dir / "vmimage"
    bases = list((state / "bases").iterdir())
    assert len(bases) == 1, bases
    base = bases[0]
    st = base.stat()
    # one copy: the store's unpacked disk, this link and each overlay's pin are one inode
    assert st.st_nlink == 2 + len(pods), st
    size = test_disk.stat().st_size
    assert st.st_size == size
    for pod, cid in zip(pods, cids, strict=True):
        overlay = state / "pods" / pod[:32] / f"overlay-{cid[:12]}.qcow2"
        info = subprocess.run(
            ["qemu-img", "info", "--output=json", "-U", str(overlay)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        doc = json.loads(info.stdout)
        assert doc["backing-filename"] == str(base), doc
        assert overlay.stat().st_size < size // 10  # an overlay, not a copy
        assert overlay.with_suffix(".base").stat().st_ino == st.st_ino  # its pin
