"""Helpers of the vm-image tests and bench: a containerDisk pushed to the loopback test
registry, a container created in a vm-image pod, the pod's tap and netns."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from criv.network.tap import tap_name
from criv.vmimage.containerdisk import write_layout
from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri
from tests.support.registry import RegistryServer

HANDLERS = {"": "vm", "vm": "vm", "host": "host", "vm-image": "vm-image"}


def push_containerdisk(
    registry: RegistryServer, disk: Path, tmp: Path, repo: str = "vm/testdisk", tag: str = "1"
) -> str:
    """``disk`` as a containerDisk OCI image in the registry; returns its reference."""
    layout = write_layout(disk, tmp / f"layout-{repo.replace('/', '-')}-{tag}", tag=tag)
    blobs = layout.path / "blobs" / "sha256"
    manifest = (blobs / layout.manifest_digest[7:]).read_bytes()
    doc = json.loads(manifest)
    for desc in [doc["config"], *doc["layers"]]:
        registry.push_blob(repo, (blobs / desc["digest"][7:]).read_bytes())
    registry.push_manifest(repo, tag, manifest, doc["mediaType"])
    return registry.ref(repo, tag)


def create(
    cri: Cri, pod: str, name: str, image: str, annotations: dict[str, str] | None = None
) -> str:
    cfg = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name),
        image=api_pb2.ImageSpec(image=image),
        log_path=f"{name}.log",
        annotations=annotations or {},
    )
    resp = cri.rt.CreateContainer(
        api_pb2.CreateContainerRequest(
            pod_sandbox_id=pod, config=cfg, sandbox_config=cri._pods[pod]
        ),
        timeout=120,
    )
    return str(resp.container_id)


def start_disk_pod(
    cri: Cri,
    registry: RegistryServer,
    disk: Path,
    tmp: Path,
    name: str,
    repo: str = "vm/testdisk",
) -> tuple[str, str]:
    """``disk`` pushed as a containerDisk, pulled, and started as the one container
    ("vm") of a new vm-image pod ``name``: (pod id, container id)."""
    ref = push_containerdisk(registry, disk, tmp, repo)
    pull(cri, ref)
    pod = cri.run_pod(name, handler="vm-image")
    cid = create(cri, pod, "vm", ref)
    cri.start(cid)
    return pod, cid


def pull(cri: Cri, ref: str) -> None:
    cri.proc.images.PullImage(
        api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref)), timeout=300
    )


def pod_netns(cri: Cri, pod: str) -> str:
    resp = cri.rt.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod, verbose=True), timeout=30
    )
    return str(json.loads(resp.info["info"])["netNamespace"])


def set_tap(cri: Cri, pod: str, up: bool) -> None:
    """Cut (or restore) the VM's network: its tap in the pod netns down (or up)."""
    subprocess.run(
        ["nsenter", f"--net={pod_netns(cri, pod)}", "ip", "link", "set", "dev",
         tap_name(pod), "up" if up else "down"],
        check=True, capture_output=True,
    )  # fmt: skip
