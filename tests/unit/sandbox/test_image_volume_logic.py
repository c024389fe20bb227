"""Image volumes, pure logic: ``image_sub_path`` resolved inside the image (links
followed inside it, escapes refused), lease holders, the CRI checks and conversions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from criv.cri import validate
from criv.cri.imagevolume import for_agent, image_fields, status_image
from criv.errors import InvalidArgument, NotFound
from criv.sandbox import imagevol
from criv.sandbox.records import MountRecord
from criv.sandbox.subpath import Entry, resolve, resolve_on_disk, sub_path_problem
from criv_agent.api.runtime.v1 import api_pb2

# a fake image tree: path -> entry
TREE = {
    "data": Entry("dir"),
    "data/a.txt": Entry("file"),
    "data/sub": Entry("dir"),
    "data/sub/b.txt": Entry("file"),
    "data/rel": Entry("link", "sub"),
    "data/abs": Entry("link", "/data/sub"),
    "data/up": Entry("link", "../data/sub"),
    "data/out": Entry("link", "../../etc"),
    "data/rootout": Entry("link", "/../etc"),
    "data/loop": Entry("link", "loop"),
    "data/dev": Entry("other"),
    "data/filelink": Entry("link", "a.txt"),
}


def probe(parts: tuple[str, ...]) -> Entry | None:
    return TREE.get("/".join(parts))


@pytest.mark.parametrize(
    ("sub", "want", "kind"),
    [
        ("data", ("data",), "dir"),
        ("data/sub/", ("data", "sub"), "dir"),
        ("./data//sub/.", ("data", "sub"), "dir"),
        ("data/a.txt", ("data", "a.txt"), "file"),
        ("data/rel", ("data", "sub"), "dir"),
        ("data/abs/b.txt", ("data", "sub", "b.txt"), "file"),
        ("data/up", ("data", "sub"), "dir"),
        ("data/sub/..", ("data",), "dir"),
        ("data/rel/..", ("data",), "dir"),  # the link's parent, as the kernel resolves
        ("data/filelink", ("data", "a.txt"), "file"),
    ],
)
def test_sub_path_resolves_inside_the_image(sub: str, want: tuple[str, ...], kind: str) -> None:
    assert resolve(sub, probe) == (want, kind)


@pytest.mark.parametrize(
    ("sub", "error", "words"),
    [
        ("../etc", InvalidArgument, "leads out of the image"),
        ("data/../../etc", InvalidArgument, "leads out of the image"),
        ("/data", InvalidArgument, "not a relative path"),
        ("data/out", InvalidArgument, "leads out of the image root"),
        ("data/rootout", InvalidArgument, "leads out of the image root"),
        ("data/loop", InvalidArgument, "too many levels of links"),
        ("data/dev", InvalidArgument, "neither a directory nor a file"),
        ("data/missing", NotFound, "'data/missing' does not exist"),
        ("data/a.txt/x", NotFound, "is not a directory"),
        ("data/filelink/..", NotFound, "is not a directory"),
    ],
)
def test_bad_sub_paths_are_refused(sub: str, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        resolve(sub, probe)


def test_sub_path_problem_is_lexical() -> None:
    assert sub_path_problem("") == ""
    assert sub_path_problem("a/../b") == ""
    assert "NUL" in sub_path_problem("a\0b")
    assert "longer" in sub_path_problem("a" * 5000)
    assert "leads out" in sub_path_problem("a/../../b")


def test_resolve_on_disk_never_leaves_the_root(tmp_path: Path) -> None:
    root = tmp_path / "image"
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "sub" / "f").write_text("x")
    os.symlink("/d/sub", root / "d" / "abs")  # from the image root, not the host's
    os.symlink(str(tmp_path), root / "d" / "host")  # an absolute host path...
    (tmp_path / "secret").mkdir()
    assert resolve_on_disk(root, "d/abs/f") == root / "d/sub/f"
    # ...is looked up inside the image, where it does not exist
    with pytest.raises(NotFound):
        resolve_on_disk(root, "d/host/secret")
    os.symlink("../../..", root / "d" / "esc")
    with pytest.raises(InvalidArgument):
        resolve_on_disk(root, "d/esc")


def test_lease_holders_of_a_container() -> None:
    cid = "c" * 64
    assert imagevol.holder(cid, 3) == f"{cid}.v3"
    assert imagevol.owner(f"{cid}.v3") == cid and imagevol.owner(cid) == cid
    held = {cid, f"{cid}.v0", f"{cid}.v2", "d" * 64, f"{'d' * 64}.v0"}
    assert sorted(imagevol.holders_of(held, cid)) == sorted([cid, f"{cid}.v0", f"{cid}.v2"])


def test_overlay_options_stack_lower_dirs_only() -> None:
    opts = imagevol.lower_options((Path("/l/1"), Path("/l/2")))
    assert opts == "ro,nosuid,nodev,lowerdir=/l/2:/l/1"


def _request(*mounts: api_pb2.Mount) -> api_pb2.CreateContainerRequest:
    cfg = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="app"),
        image=api_pb2.ImageSpec(image="busybox"),
        mounts=list(mounts),
    )
    return api_pb2.CreateContainerRequest(pod_sandbox_id="p", config=cfg)


def _image_mount(sub: str = "", host: str = "") -> api_pb2.Mount:
    return api_pb2.Mount(
        container_path="/vol",
        host_path=host,
        image=api_pb2.ImageSpec(image="reg/data:1"),
        image_sub_path=sub,
    )


def test_validation_takes_image_mounts() -> None:
    validate.check(_request(_image_mount(), _image_mount("data/sub")))
    for bad, field in [
        (_image_mount(host="/x"), "config.mounts[0].host_path:"),
        (_image_mount("../x"), "config.mounts[0].image_sub_path:"),
        (_image_mount("/abs"), "config.mounts[0].image_sub_path:"),
    ]:
        with pytest.raises(InvalidArgument, match=field.replace("[", r"\[").replace("]", r"\]")):
            validate.check(_request(bad))


def test_conversions() -> None:
    m = _image_mount("data")
    assert image_fields(m) == {"image": "reg/data:1", "image_sub_path": "data"}
    assert image_fields(api_pb2.Mount(container_path="/x", host_path="/y")) == {}
    cfg = api_pb2.ContainerConfig.FromString(for_agent(_request(m).config))
    assert cfg.mounts[0].readonly and cfg.mounts[0].propagation == api_pb2.PROPAGATION_PRIVATE
    rec = MountRecord("/vol", "", image="reg/data:1", image_id="sha256:1", image_ref="reg@sha256:2")
    assert status_image(rec) == api_pb2.ImageSpec(image="reg/data:1", image_ref="reg@sha256:2")
    assert status_image(MountRecord("/x", "/y")) is None
