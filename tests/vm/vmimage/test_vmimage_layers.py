"""Hostile containerDisk layers pulled through criv's ImageService (a daemon with the
`vm-image` handler) from the loopback test registry: a disk layer with a `..` path, an
absolute path, a symlink escape or a hardlink escape, and a disk layer over the store's
``image_limits``, are refused with a clear error; nothing is written outside the store and
the store keeps nothing of them."""

from __future__ import annotations

import os
import secrets
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri
from tests.support.fixtures import TestRegistry
from tests.support.images import LayerBuilder, build_image, build_layer
from tests.support.vmimage import HANDLERS

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

MiB = 1 << 20
QCOW2_HEAD = b"QFI\xfb" + bytes(508)  # enough of a qcow2 to be taken for one


@pytest.fixture
def outside() -> Iterator[Path]:
    """A directory outside the store that an escaping entry would write into."""
    d = Path("/tmp") / f"criv-slip-{secrets.token_hex(4)}"
    d.mkdir(mode=0o755)
    try:
        yield d
    finally:
        for p in sorted(d.rglob("*"), reverse=True):
            p.unlink() if not p.is_dir() or p.is_symlink() else p.rmdir()
        d.rmdir()


def disk_layer(*escape: tuple[str, str, str]) -> LayerBuilder:
    """A containerDisk layer (``/disk/root.qcow2``, 107:107 0440) preceded by escaping
    entries: (kind, name, target or data)."""
    lb = LayerBuilder()
    for kind, name, arg in escape:
        if kind == "file":
            lb.raw(tarfile.TarInfo(name), arg.encode())
        elif kind == "symlink":
            lb.symlink(name, arg)
        else:
            lb.hardlink(name, arg)
    if not any(name.rstrip("/") == "disk" for _, name, _ in escape):
        lb.dir("disk", 0o555, 107, 107)
    return lb.file("disk/root.qcow2", QCOW2_HEAD, 0o440, 107, 107)


def pull_error(cri: Cri, ref: str) -> grpc.RpcError:
    req = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref))
    with pytest.raises(grpc.RpcError) as ei:
        cri.proc.images.PullImage(req, timeout=120)
    return ei.value


def assert_store_empty(cri: Cri) -> None:
    root = cri.proc.state_dir / "images"
    for d in ("blobs/sha256", "layers", "tmp", "records"):
        assert os.listdir(root / d) == [], (d, os.listdir(root / d))
    assert list(cri.proc.images.ListImages(api_pb2.ListImagesRequest()).images) == []


def test_escaping_disk_layers_are_refused(
    vm_cri_factory: Callable[..., Cri], registry: TestRegistry, outside: Path
) -> None:
    cri = vm_cri_factory(pull=False, runtime={"handlers": HANDLERS})
    up = "../" * 12
    cases = {
        "dotdot": (disk_layer(("file", f"disk/{up}{outside.relative_to('/')}/dotdot", "x")),
                   "path escapes the layer root"),
        "absolute": (disk_layer(("file", f"{outside}/absolute", "x")), "absolute path"),
        "symlink": (disk_layer(("symlink", "disk", str(outside))), "symlink"),
        "hardlink": (disk_layer(("hardlink", "disk2", f"{up}etc/passwd")),
                     "path escapes the layer root"),
    }  # fmt: skip
    for name, (layer, why) in cases.items():
        registry.push_image(f"slip/{name}", "1", build_image([build_layer(layer, oci=True)]))
        err = pull_error(cri, registry.ref(f"slip/{name}", "1"))
        print(f"[vm-image] {name}: {err.code().name}: {err.details()}")
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, (name, err)
        assert why in str(err.details()), (name, err.details())
        assert list(outside.iterdir()) == [], (name, list(outside.iterdir()))
    assert_store_empty(cri)
    assert not (Path("/etc/passwd").stat().st_nlink > 1)


def test_oversized_disk_layer_is_refused(
    vm_cri_factory: Callable[..., Cri], registry: TestRegistry
) -> None:
    limits = {"max_layer_size_mib": 4, "max_image_size_mib": 4}
    cri = vm_cri_factory(pull=False, runtime={"handlers": HANDLERS}, image_limits=limits)
    big = LayerBuilder().dir("disk", 0o555, 107, 107)
    big.file("disk/root.qcow2", QCOW2_HEAD + bytes(6 * MiB), 0o440, 107, 107)
    registry.push_image("slip/big", "1", build_image([build_layer(big, oci=True)]))
    err = pull_error(cri, registry.ref("slip/big", "1"))
    print(f"[vm-image] oversized: {err.code().name}: {err.details()}")
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    assert "image_limits.max_layer_size_mib" in str(err.details()), err.details()
    assert_store_empty(cri)
