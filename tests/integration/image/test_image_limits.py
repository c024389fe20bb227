"""image_limits through a real criv and a real registry on loopback: a manifest with
500 layers, a blob longer than its descriptor and a tar header bomb are refused with a
clear error, and the image store keeps nothing of them."""

from __future__ import annotations

import dataclasses
import json
import os
import tarfile
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support.daemon import CrivProcess
from tests.support.fixtures import TestRegistry
from tests.support.images import (
    BuiltImage,
    BuiltLayer,
    LayerBuilder,
    build_image,
    build_layer,
    gzip_chunks,
    raw_tar_header,
    sha256,
    zeros,
)

pytestmark = pytest.mark.integration

Factory = Callable[..., CrivProcess]
MiB = 1 << 20


def pull_error(c: CrivProcess, ref: str) -> grpc.RpcError:
    req = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref))
    with pytest.raises(grpc.RpcError) as ei:
        c.images.PullImage(req, timeout=120)
    return ei.value


def store_files(c: CrivProcess) -> dict[str, list[str]]:
    root = c.state_dir / "images"
    dirs = ("blobs/sha256", "layers", "tmp", "trash", "records", "leases")
    return {d: sorted(os.listdir(root / d)) for d in dirs}


def assert_nothing_stored(c: CrivProcess) -> None:
    assert store_files(c) == {
        "blobs/sha256": [],
        "layers": [],
        "tmp": [],
        "trash": [],
        "records": [],
        "leases": [],
    }
    assert list(c.images.ListImages(api_pb2.ListImagesRequest()).images) == []


def with_manifest(img: BuiltImage, edit: Callable[[dict[str, Any]], None]) -> BuiltImage:
    doc = json.loads(img.manifest)
    edit(doc)
    return dataclasses.replace(img, manifest=json.dumps(doc).encode())


def vm_hwm(pid: int) -> int:
    """Peak resident memory of ``pid`` in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_manifest_with_500_layers_refused(criv_factory: Factory, registry: TestRegistry) -> None:
    layer = build_layer(LayerBuilder().file("x", "x\n"), oci=True)
    img = build_image([layer] * 500, oci=True)
    registry.push_image("limits/layers", "latest", img)
    c = criv_factory()
    before = registry.blob_gets(layer.digest), registry.blob_gets(img.config_digest)
    err = pull_error(c, registry.ref("limits/layers"))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    assert "500 layers" in str(err.details()), err.details()
    assert "image_limits.max_layers" in str(err.details()), err.details()
    # refused from the manifest alone: neither the config nor any layer was fetched
    after = registry.blob_gets(layer.digest), registry.blob_gets(img.config_digest)
    assert after == before
    assert_nothing_stored(c)


def test_blob_longer_than_its_descriptor_refused(
    criv_factory: Factory, registry: TestRegistry
) -> None:
    layer = build_layer(LayerBuilder().file("data", os.urandom(256 << 10)), oci=True)
    declared = len(layer.blob) - 100

    def shrink(doc: dict[str, Any]) -> None:
        doc["layers"][0]["size"] = declared

    img = with_manifest(build_image([layer], oci=True), shrink)
    registry.push_image("limits/long-blob", "latest", img)
    c = criv_factory()
    err = pull_error(c, registry.ref("limits/long-blob"))
    assert err.code() == grpc.StatusCode.DATA_LOSS, err
    assert f"the descriptor says {declared}" in str(err.details()), err.details()
    files = store_files(c)
    # no temp file, no layer, no record; only the verified config stays for a retry
    assert files["tmp"] == [] and files["layers"] == [] and files["records"] == []
    assert files["blobs/sha256"] == sorted([img.config_digest[7:], sha256(img.manifest)[7:]])
    c.restart()  # GC at start takes what no image uses
    assert_nothing_stored(c)


def test_header_bomb_refused_and_nothing_kept(
    criv_factory: Factory, registry: TestRegistry
) -> None:
    """A 256 KiB gzip layer: a GNU long name declaring 8 GiB, then 256 MiB of zeros
    (tarfile alone would allocate them all before failing)."""
    head = raw_tar_header(b"././@LongLink", tarfile.GNUTYPE_LONGNAME, 8 << 30)
    blob = gzip_chunks([head, *zeros(256 * MiB)])
    bomb = BuiltLayer(blob, "application/vnd.oci.image.layer.v1.tar+gzip", sha256(blob),
                      "sha256:" + "0" * 64)  # fmt: skip
    good = build_layer(LayerBuilder().file("good", "good\n"), oci=True)
    registry.push_image("limits/bomb", "latest", build_image([good, bomb], oci=True))
    c = criv_factory()
    assert c.proc is not None
    hwm = vm_hwm(c.proc.pid)
    err = pull_error(c, registry.ref("limits/bomb"))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    assert "image_limits.max_header_kib" in str(err.details()), err.details()
    assert "8589934592-byte" in str(err.details()), err.details()
    grown = vm_hwm(c.proc.pid) - hwm
    assert grown < 64 * MiB, f"criv's peak RSS grew by {grown} bytes"
    assert_nothing_stored(c)  # the good layer and the blobs went with the refused image


def test_configured_limits_apply(criv_factory: Factory, registry: TestRegistry) -> None:
    layers = [build_layer(LayerBuilder().file(f"f{i}", bytes(MiB)), oci=True) for i in range(3)]
    registry.push_image("limits/configured", "latest", build_image(layers, oci=True))
    ref = registry.ref("limits/configured")
    c = criv_factory({"image_limits": {"max_layers": 2}})
    err = pull_error(c, ref)
    assert "image_limits.max_layers" in str(err.details()), err.details()
    c2 = criv_factory({"image_limits": {"max_layer_size_mib": 2, "max_image_size_mib": 2}})
    err = pull_error(c2, ref)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    assert "image_limits.max_image_size_mib" in str(err.details()), err.details()
    assert_nothing_stored(c2)
