"""RemoveImage of an image a container uses (``crictl rmi``): the image goes, the layer
dirs under the container's overlay stay until the container is removed."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri

pytestmark = pytest.mark.integration


def _layers(cri: Cri) -> dict[str, int]:
    """Layer dir name -> inode: a re-unpacked layer would be a new directory."""
    d = cri.proc.state_dir / "images/layers"
    return {p.name: p.stat().st_ino for p in d.iterdir() if not p.name.startswith(".")}


def _used(cri: Cri) -> int:
    resp = cri.proc.images.ImageFsInfo(api_pb2.ImageFsInfoRequest(), timeout=10)
    return int(resp.image_filesystems[0].used_bytes.value)


def _remove_image(cri: Cri) -> None:
    cri.proc.images.RemoveImage(
        api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=cri.image)), timeout=30
    )


def _listed(cri: Cri) -> list[str]:
    resp = cri.proc.images.ListImages(api_pb2.ListImagesRequest(), timeout=10)
    return [t for i in resp.images for t in i.repo_tags]


def _works(cri: Cri, cid: str) -> None:
    r = cri.exec(cid, ["sh", "-c", "cat /bin/busybox > /dev/null"])
    assert r.exit_code == 0, r.stderr
    r = cri.exec(cid, ["ls", "/"])
    assert r.exit_code == 0 and b"bin" in r.stdout.split(), r


@pytest.mark.timeout(120)
def test_remove_image_in_use_defers_layer_gc(cri: Cri) -> None:
    pod = cri.run_pod("rmi")
    cid = cri.run(pod, "busy", ["sleep", "1000"])
    layers = _layers(cri)
    assert layers
    used = _used(cri)
    _remove_image(cri)
    assert _listed(cri) == []
    st = cri.proc.images.ImageStatus(
        api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=cri.image)), timeout=10
    )
    assert not st.HasField("image")
    assert _layers(cri) == layers
    _works(cri, cid)
    assert _used(cri) < used  # the blobs went; the leased layers did not
    # Pulling it again while leased reuses the layer dirs: nothing unpacked twice.
    cri.pull()
    assert _listed(cri) == [cri.image]
    assert _layers(cri) == layers
    _remove_image(cri)
    _works(cri, cid)
    held = _used(cri)
    cri.rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=30)
    assert _layers(cri) == {}
    assert _used(cri) < held
    assert list((cri.proc.state_dir / "images/leases").iterdir()) == []


@pytest.mark.timeout(180)
def test_leases_survive_a_restart_and_stale_ones_are_released(cri: Cri) -> None:
    pod = cri.run_pod("rmi-restart")
    cid = cri.run(pod, "busy", ["sleep", "1000"])
    layers = _layers(cri)
    _remove_image(cri)
    leases = cri.proc.state_dir / "images/leases"
    cri.proc.stop()
    # A lease whose container is gone (criv died between the two): released at start.
    doc = json.loads((leases / f"{cid}.json").read_bytes())
    stale = "0" * 64
    doc["holder"] = stale
    Path(leases / f"{stale}.json").write_text(json.dumps(doc))
    cri.proc.start()
    assert sorted(p.name for p in leases.iterdir()) == [f"{cid}.json"]
    assert _layers(cri) == layers  # the running container's lease survived the restart
    assert _listed(cri) == []
    _works(cri, cid)
    cri.rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=30)
    assert _layers(cri) == {}


@pytest.mark.timeout(120)
def test_failed_creates_leave_no_lease(cri: Cri) -> None:
    pod = cri.run_pod("rmi-fail")
    leases = cri.proc.state_dir / "images/leases"
    cfg = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="escape"),
        image=api_pb2.ImageSpec(image=cri.image),
        command=["true"],
        log_path="../../escape.log",  # refused after the lease was taken
    )
    with pytest.raises(grpc.RpcError) as e:
        cri.rt.CreateContainer(
            api_pb2.CreateContainerRequest(
                pod_sandbox_id=pod, config=cfg, sandbox_config=cri._pods[pod]
            ),
            timeout=60,
        )
    assert "escapes the log directory" in e.value.details()
    assert list(leases.iterdir()) == []
    _remove_image(cri)
    with pytest.raises(grpc.RpcError):  # the image is gone: nothing to lease
        cri.create(pod, "noimage", ["true"])
    assert list(leases.iterdir()) == []
    assert _layers(cri) == {}


@pytest.mark.timeout(120)
def test_restart_leases_containers_made_before_leases(cri: Cri) -> None:
    pod = cri.run_pod("rmi-legacy")
    cid = cri.run(pod, "busy", ["sleep", "1000"])
    lease = cri.proc.state_dir / "images/leases" / f"{cid}.json"
    cri.proc.stop()
    lease.unlink()  # as a criv without leases left it
    cri.proc.start()
    assert json.loads(lease.read_bytes())["holder"] == cid
    _remove_image(cri)
    _works(cri, cid)
