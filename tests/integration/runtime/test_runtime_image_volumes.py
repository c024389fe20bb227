"""Image volumes (CRI ``Mount.image`` + ``image_sub_path``, KEP 4639) in host isolation,
through a real criv, crun and registry: the image's files read-only in the container,
only the sub-path's with one, bad sub-paths and unpulled images refused, the volume's
image leased against RemoveImage, and no mount left behind."""

from __future__ import annotations

import grpc
import pytest

from criv.mounts import mounts_under
from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri
from tests.support.fixtures import TestRegistry
from tests.support.images import BuiltImage, LayerBuilder, build_image, build_layer

pytestmark = pytest.mark.integration

SLEEP = ["sleep", "3600"]


def data_image() -> BuiltImage:
    """Two layers (so the volume is an overlay): /data/{a.txt,sub/b.txt}, links in and
    out of the image; then /data/c.txt."""
    l1 = LayerBuilder().dir("data").file("data/a.txt", "from the image\n")
    l1.dir("data/sub").file("data/sub/b.txt", "in sub\n")
    l1.symlink("data/link", "/data/sub").symlink("data/out", "../../..")
    l2 = LayerBuilder().dir("data").file("data/c.txt", "layer two\n")
    return build_image([build_layer(l1), build_layer(l2)])


@pytest.fixture
def data_ref(cri: Cri, registry: TestRegistry) -> str:
    registry.push_image("criv-test/imagevol", "1", data_image())
    ref = registry.ref("criv-test/imagevol", "1")
    cri.proc.images.PullImage(
        api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref)), timeout=120
    )
    return ref


def vol(ref: str, path: str, sub: str = "") -> api_pb2.Mount:
    return api_pb2.Mount(
        container_path=path, image=api_pb2.ImageSpec(image=ref), image_sub_path=sub
    )


def _sh(cri: Cri, cid: str, cmd: str) -> tuple[int, str]:
    r = cri.exec(cid, ["sh", "-c", cmd], timeout=30)
    return r.exit_code, (r.stdout + r.stderr).decode()


def _refused(cri: Cri, pod: str, mounts: list[api_pb2.Mount]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        cri.create(pod, "bad", SLEEP, mounts=mounts)
    return e.value


def _volume_mounts(cri: Cri) -> list[str]:
    return [str(m) for m in mounts_under(cri.proc.state_dir) if "imagevols" in m.parts]


@pytest.mark.timeout(180)
def test_image_volume_read_only_with_sub_path(cri: Cri, data_ref: str) -> None:
    pod = cri.run_pod("imagevol")
    cid = cri.run(
        pod, "reader", SLEEP, mounts=[vol(data_ref, "/vol"), vol(data_ref, "/sub", "data/link")]
    )
    assert _sh(cri, cid, "cat /vol/data/a.txt /vol/data/c.txt /sub/b.txt") == (
        0,
        "from the image\nlayer two\nin sub\n",
    )
    rc, out = _sh(cri, cid, "touch /vol/data/new")
    assert rc != 0 and "Read-only file system" in out, out
    rc, out = _sh(cri, cid, "touch /sub/new")
    assert rc != 0 and "Read-only file system" in out, out
    assert _sh(cri, cid, "ls /sub") == (0, "b.txt\n")  # only the sub-path

    st = cri.status(cid)
    got = {m.container_path: m for m in st.mounts}
    for path in ("/vol", "/sub"):
        assert got[path].image.image == data_ref and got[path].host_path == ""
        assert "@sha256:" in got[path].image.image_ref, got[path]
    assert got["/sub"].image_sub_path == "data/link" and got["/sub"].readonly
    assert len(_volume_mounts(cri)) == 2

    # the volume's image is leased like a rootfs's: removed, its layers stay in use
    cri.proc.images.RemoveImage(
        api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=data_ref)), timeout=30
    )
    assert _sh(cri, cid, "cat /vol/data/c.txt")[1] == "layer two\n"
    cri.rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=60)
    assert _volume_mounts(cri) == []
    assert list((cri.proc.state_dir / "images/leases").iterdir()) == []


@pytest.mark.timeout(180)
def test_bad_image_volumes_are_refused_and_leave_nothing(cri: Cri, data_ref: str) -> None:
    pod = cri.run_pod("imagevol-bad")
    leases = cri.proc.state_dir / "images/leases"

    e = _refused(cri, pod, [vol(data_ref, "/v", "data/missing")])
    assert e.code() == grpc.StatusCode.NOT_FOUND and "data/missing" in e.details(), e
    e = _refused(cri, pod, [vol(data_ref, "/v", "data/out")])  # a link out of the image
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "data/out" in e.details(), e
    e = _refused(cri, pod, [vol(data_ref, "/v", "../etc")])
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "image_sub_path" in e.details(), e
    e = _refused(cri, pod, [vol(data_ref, "/v", "data/a.txt/x")])
    assert e.code() == grpc.StatusCode.NOT_FOUND, e
    missing = data_ref.replace(":1", ":not-pulled")
    e = _refused(cri, pod, [vol(missing, "/v")])
    assert e.code() == grpc.StatusCode.NOT_FOUND and missing in e.details(), e
    assert _volume_mounts(cri) == []
    assert list(leases.iterdir()) == []

    # a file as the sub-path; the pod's removal takes the volume with it
    cid = cri.run(pod, "file", SLEEP, mounts=[vol(data_ref, "/a.txt", "data/a.txt")])
    assert _sh(cri, cid, "cat /a.txt") == (0, "from the image\n")
    assert len(_volume_mounts(cri)) == 1
    cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=60)
    cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=60)
    assert _volume_mounts(cri) == []
    assert list(leases.iterdir()) == []


@pytest.mark.timeout(180)
def test_image_volume_survives_a_restart_and_its_lease_with_it(cri: Cri, data_ref: str) -> None:
    pod = cri.run_pod("imagevol-restart")
    cid = cri.run(pod, "reader", SLEEP, mounts=[vol(data_ref, "/vol", "data")])
    leases = cri.proc.state_dir / "images/leases"
    assert sorted(p.name for p in leases.iterdir()) == [f"{cid}.json", f"{cid}.v0.json"]
    cri.proc.images.RemoveImage(
        api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=data_ref)), timeout=30
    )
    cri.proc.stop()
    cri.proc.start()
    # recovery keeps a live container's volume lease (and its mount): the layers stay
    assert sorted(p.name for p in leases.iterdir()) == [f"{cid}.json", f"{cid}.v0.json"]
    assert _sh(cri, cid, "cat /vol/c.txt") == (0, "layer two\n")
    cri.rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=60)
    assert _volume_mounts(cri) == []
    assert list(leases.iterdir()) == []
