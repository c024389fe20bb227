"""ImageService through a real criv daemon and its socket, against real registries."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support.daemon import CrivProcess
from tests.support.fixtures import TestRegistry
from tests.support.images import (
    LayerBuilder,
    build_image,
    build_layer,
    busybox_image,
    busybox_rootfs,
    multiarch_index,
    random_layer,
    whiteout_image,
)
from tests.support.registry import FaultProxy

pytestmark = pytest.mark.integration

Factory = Callable[..., CrivProcess]


def spec(ref: str) -> api_pb2.ImageSpec:
    return api_pb2.ImageSpec(image=ref)


def pull(c: CrivProcess, ref: str, auth: api_pb2.AuthConfig | None = None) -> str:
    req = api_pb2.PullImageRequest(image=spec(ref))
    if auth is not None:
        req.auth.CopyFrom(auth)
    resp = c.images.PullImage(req, timeout=120)
    return str(resp.image_ref)


def status(c: CrivProcess, ref: str, verbose: bool = False) -> api_pb2.ImageStatusResponse:
    req = api_pb2.ImageStatusRequest(image=spec(ref), verbose=verbose)
    resp: api_pb2.ImageStatusResponse = c.images.ImageStatus(req)
    return resp


def images(c: CrivProcess, ref: str = "") -> list[api_pb2.Image]:
    req = api_pb2.ListImagesRequest()
    if ref:
        req.filter.image.image = ref
    return list(c.images.ListImages(req).images)


def remove(c: CrivProcess, ref: str) -> None:
    c.images.RemoveImage(api_pb2.RemoveImageRequest(image=spec(ref)))


def fs_info(c: CrivProcess) -> api_pb2.FilesystemUsage:
    resp = c.images.ImageFsInfo(api_pb2.ImageFsInfoRequest())
    assert len(resp.image_filesystems) == 1
    usage: api_pb2.FilesystemUsage = resp.image_filesystems[0]
    return usage


def rpc_error(fn: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    return ei.value


def store_files(c: CrivProcess) -> dict[str, list[str]]:
    root = c.state_dir / "images"
    return {d: sorted(os.listdir(root / d)) for d in ("blobs/sha256", "layers", "tmp", "records")}


def test_pull_list_status_remove(criv_factory: Factory, registry: TestRegistry) -> None:
    c = criv_factory(registry.mirror_config())
    built = registry.pushed["library/busybox:latest"]
    empty = fs_info(c)
    image_id = pull(c, "busybox")
    assert image_id == built.config_digest  # type: ignore[union-attr]
    [img] = images(c)
    assert img.id == image_id
    assert list(img.repo_tags) == ["docker.io/library/busybox:latest"]
    assert list(img.repo_digests) == [
        f"docker.io/library/busybox@{built.manifest_digest}"  # type: ignore[union-attr]
    ]
    assert img.size == built.size  # type: ignore[union-attr]
    assert not img.HasField("uid") and img.username == ""
    for ref in ("busybox", "docker.io/library/busybox:latest", image_id, image_id[7:19],
                img.repo_digests[0]):  # fmt: skip
        assert status(c, ref).image.id == image_id, ref
    assert [i.id for i in images(c, "busybox")] == [image_id]
    assert images(c, "other") == []
    resp = status(c, "busybox", verbose=True)
    info = json.loads(resp.info["info"])
    assert info["imageSpec"]["config"]["Cmd"] == ["sh"]
    assert info["imageSpec"]["rootfs"]["diff_ids"] == [
        x.diff_id
        for x in built.layers  # type: ignore[union-attr]
    ]
    assert not status(c, "nosuchimage").HasField("image")
    # the layer is unpacked, ready for overlay
    [layer_dir] = info["layerDirs"]
    assert os.readlink(Path(layer_dir) / "bin/sh") == "busybox"
    assert Path(layer_dir).is_relative_to(c.state_dir)
    full = fs_info(c)
    assert full.fs_id.mountpoint == str(c.state_dir / "images")
    assert full.used_bytes.value > empty.used_bytes.value + 1_000_000
    assert full.inodes_used.value > empty.inodes_used.value + 250
    assert full.timestamp > 0

    remove(c, "busybox")
    assert images(c) == []
    after = fs_info(c)
    assert after.used_bytes.value == empty.used_bytes.value
    assert after.inodes_used.value == empty.inodes_used.value
    files = store_files(c)
    assert files["blobs/sha256"] == [] and files["layers"] == [] and files["records"] == []

    assert pull(c, "busybox") == image_id
    remove(c, image_id)
    assert images(c) == []
    pull(c, "busybox")
    remove(c, f"busybox@{built.manifest_digest}")  # type: ignore[union-attr]
    assert images(c) == []
    remove(c, "busybox")  # missing: success
    remove(c, "sha256:" + "0" * 64)

    # records survive a restart
    pull(c, "busybox")
    c.restart()
    assert [i.id for i in images(c)] == [image_id]


def test_multi_tag_untag(criv_factory: Factory, registry: TestRegistry) -> None:
    img = busybox_image(config={"User": "1000"})
    for tag in ("one", "two"):
        registry.push_image("tags/bb", tag, img)
    c = criv_factory()
    one, two = registry.ref("tags/bb", "one"), registry.ref("tags/bb", "two")
    assert pull(c, one) == pull(c, two) == img.config_digest
    [stored] = images(c)
    assert sorted(stored.repo_tags) == sorted([one, two])
    assert stored.uid.value == 1000 and stored.username == ""
    assert len(stored.repo_digests) == 1  # same repo, same manifest
    remove(c, one)
    [stored] = images(c)
    assert list(stored.repo_tags) == [two]
    assert store_files(c)["layers"]  # untag keeps the content
    remove(c, two)
    assert images(c) == []
    assert store_files(c)["layers"] == []


def test_user_and_errors(criv_factory: Factory, registry: TestRegistry) -> None:
    registry.push_image("users/named", "latest", busybox_image(config={"User": "app:app"}))
    c = criv_factory()
    pull(c, registry.ref("users/named"))
    st = status(c, registry.ref("users/named")).image
    assert st.username == "app" and not st.HasField("uid")
    err = rpc_error(lambda: pull(c, "Bad Reference!"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = rpc_error(lambda: pull(c, registry.ref("users/named", "nosuchtag")))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "MANIFEST_UNKNOWN" in str(err.details())
    assert registry.host in str(err.details())


def test_basic_auth(
    criv_factory: Factory, registry_factory: Callable[..., TestRegistry], tmp_path: Path
) -> None:
    reg = registry_factory(auth="basic", users={"alice": "wonderland"})
    reg.push_busybox()
    auth_file = tmp_path / "auth.json"
    encoded = base64.b64encode(b"alice:wonderland").decode()
    auth_file.write_text(json.dumps({"auths": {f"http://{reg.host}/v2/": {"auth": encoded}}}))
    c = criv_factory()
    good = api_pb2.AuthConfig(username="alice", password="wonderland")
    assert pull(c, reg.busybox_ref, good)
    remove(c, reg.busybox_ref)
    assert pull(c, reg.busybox_ref, api_pb2.AuthConfig(auth=encoded))
    remove(c, reg.busybox_ref)
    for bad in (api_pb2.AuthConfig(username="alice", password="wrong"), None):
        err = rpc_error(lambda bad=bad: pull(c, reg.busybox_ref, bad))  # type: ignore[misc]
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
        assert reg.host in str(err.details()) and "401" in str(err.details()), err.details()
    assert images(c) == []
    # credentials from registries.auth_file
    c2 = criv_factory({"registries": {"auth_file": str(auth_file)}})
    assert pull(c2, reg.busybox_ref)


def test_bearer_token_auth(
    criv_factory: Factory, registry_factory: Callable[..., TestRegistry]
) -> None:
    reg = registry_factory(auth="token", users={"bob": "builder"})
    reg.push_busybox()
    assert reg.token_server is not None
    c = criv_factory()
    before = len(reg.token_server.requests)
    assert pull(c, reg.busybox_ref, api_pb2.AuthConfig(username="bob", password="builder"))
    users = [u for u, _ in reg.token_server.requests[before:]]
    assert users and set(users) == {"bob"}
    assert any("repository:library/busybox:pull" in s for _, s in reg.token_server.requests)
    remove(c, reg.busybox_ref)
    err = rpc_error(
        lambda: pull(c, reg.busybox_ref, api_pb2.AuthConfig(username="bob", password="x"))
    )
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reg.host in str(err.details()) and "401" in str(err.details())
    # a registry token is sent as is
    token = reg.token_server.token("bob", "repository:library/busybox:pull", push=False)
    assert pull(c, reg.busybox_ref, api_pb2.AuthConfig(registry_token=token))
    remove(c, reg.busybox_ref)
    # an identity token is an OAuth2 refresh token for the token service
    reg.token_server.refresh_tokens["refresh-me"] = "bob"
    assert pull(c, reg.busybox_ref, api_pb2.AuthConfig(identity_token="refresh-me"))
    err = rpc_error(lambda: pull(c, reg.busybox_ref, api_pb2.AuthConfig(identity_token="nope")))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reg.host in str(err.details()) and "401" in str(err.details())


def test_oci_index_platform(criv_factory: Factory, registry: TestRegistry) -> None:
    index = multiarch_index()
    registry.push_index("multi/app", "latest", index)
    amd64 = index.images[3]
    c = criv_factory()
    ref = registry.ref("multi/app")
    assert pull(c, ref) == amd64.config_digest
    st = status(c, ref, verbose=True)
    assert list(st.image.repo_digests) == [f"{registry.host}/multi/app@{index.digest}"]
    dirs = [Path(p) for p in json.loads(st.info["info"])["layerDirs"]]
    assert (dirs[-1] / "platform").read_text() == "linux/amd64\n"
    # pulling by the platform manifest's own digest works too
    assert pull(c, f"{registry.host}/multi/app@{amd64.manifest_digest}") == amd64.config_digest


def _overlay(lower: list[Path], target: Path) -> bool:
    opts = "lowerdir=" + ":".join(str(p) for p in reversed(lower))
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(target)],
                       capture_output=True)  # fmt: skip
    return r.returncode == 0


def test_whiteout_image(criv_factory: Factory, registry: TestRegistry, tmp_path: Path) -> None:
    img = whiteout_image()
    registry.push_image("layers/whiteout", "latest", img)
    c = criv_factory()
    pull(c, registry.ref("layers/whiteout"))
    st = status(c, registry.ref("layers/whiteout"), verbose=True)
    dirs = [Path(p) for p in json.loads(st.info["info"])["layerDirs"]]
    assert len(dirs) == 3
    wh = os.lstat(dirs[2] / "data/a")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert os.getxattr(dirs[2] / "opq", "trusted.overlay.opaque") == b"y"
    merged = tmp_path / "merged"
    merged.mkdir()
    if not _overlay(dirs, merged):
        pytest.skip("cannot mount overlayfs here; layer form checked above")
    try:
        assert sorted(os.listdir(merged / "data")) == ["b"]
        assert sorted(os.listdir(merged / "opq")) == ["new"]
        assert os.readlink(merged / "bin/sh") == "busybox"
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def test_zstd_and_plain_layers(criv_factory: Factory, registry: TestRegistry) -> None:
    layers = [
        build_layer(busybox_rootfs(), "zstd", oci=True),
        build_layer(LayerBuilder().file("etc/plain", "plain\n"), "none", oci=True),
        build_layer(LayerBuilder().file("etc/gz", "gz\n"), "gzip", oci=True),
    ]
    img = build_image(layers, oci=True)
    registry.push_image("layers/mixed", "latest", img)
    c = criv_factory()
    assert pull(c, registry.ref("layers/mixed")) == img.config_digest
    info = json.loads(status(c, registry.ref("layers/mixed"), verbose=True).info["info"])
    dirs = [Path(p) for p in info["layerDirs"]]
    assert (dirs[0] / "bin/busybox").stat().st_size > 100_000
    assert (dirs[1] / "etc/plain").read_text() == "plain\n"
    assert (dirs[2] / "etc/gz").read_text() == "gz\n"


def test_concurrent_pulls_share_one_download(criv_factory: Factory, registry: TestRegistry) -> None:
    big = build_layer(random_layer(8 << 20, seed=11, compressible=False, files=2), oci=True)
    img = build_image([build_layer(busybox_rootfs(), oci=True), big], oci=True)
    registry.push_image("conc/app", "a", img)
    registry.push_image("conc/app", "b", img)
    c = criv_factory()
    base_before = registry.blob_gets(img.layers[0].digest)
    results: list[str] = []
    errors: list[BaseException] = []

    def one(tag: str) -> None:
        try:
            results.append(pull(c, registry.ref("conc/app", tag)))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(t,)) for t in "aaaabb"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert set(results) == {img.config_digest} and len(results) == 6
    assert registry.blob_gets(big.digest) == 1
    assert registry.blob_gets(img.layers[0].digest) == base_before + 1
    [stored] = images(c)
    assert len(stored.repo_tags) == 2


@pytest.mark.parametrize("fault", ["truncate", "corrupt"])
def test_interrupted_pull_leaves_nothing_and_retry_resumes(
    criv_factory: Factory, registry: TestRegistry, fault: str
) -> None:
    layers = [
        build_layer(LayerBuilder().file("small", f"small {fault}\n"), oci=True),
        build_layer(random_layer(2 << 20, seed=hash(fault) % 1000, compressible=False), oci=True),
    ]
    img = build_image(layers, oci=True)
    registry.push_image(f"faults/{fault}", "latest", img)
    proxy = FaultProxy(registry.url).start()
    try:
        c = criv_factory({"registries": {"mirrors": {"docker.io": [proxy.url]}}})
        ref = f"faults/{fault}"  # docker.io/faults/...: only the mirror has it
        setattr(proxy, f"{fault}_blobs", True)
        proxy.only = {layers[1].digest}
        err = rpc_error(lambda: pull(c, ref))
        want = grpc.StatusCode.DATA_LOSS if fault == "corrupt" else grpc.StatusCode.UNAVAILABLE
        assert err.code() == want, err
        assert images(c) == []
        files = store_files(c)
        assert files["tmp"] == [] and files["records"] == []
        # only complete pieces are kept (the good layer, for the retry), nothing partial
        assert files["layers"] == [layers[0].diff_id[7:]]
        assert layers[1].digest[7:] not in files["blobs/sha256"]
        for layer in layers:  # no corrupt blob, no half blob
            p = c.state_dir / "images/blobs/sha256" / layer.digest[7:]
            assert not p.exists() or p.read_bytes() == layer.blob
        setattr(proxy, f"{fault}_blobs", False)
        n_before = len(proxy.blob_requests)
        assert pull(c, ref) == img.config_digest
        # resumed: the config and the small layer came through the first time
        assert proxy.blob_requests[n_before:] == [f"/v2/faults/{fault}/blobs/{layers[1].digest}"]
        assert len(store_files(c)["layers"]) == 2
    finally:
        proxy.stop()
