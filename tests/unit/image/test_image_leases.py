"""Image leases: layers a container uses outlive RemoveImage until the last lease goes.

No registry: images are put into the store as a pull would (blobs, unpacked layers,
then the pull's own commit), so only the lease and GC accounting is under test.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from criv.config import Config
from criv.errors import ImageNotFound, InvalidArgument
from criv.image.manager import ImageManager
from criv.image.pull import PullResult
from criv.image.records import LayerRef
from criv.image.reference import parse_reference
from tests.support.images import BuiltLayer, LayerBuilder, build_image, build_layer

BASE = build_layer(LayerBuilder().file("etc/base", "base\n").file("bin/tool", b"x" * 65536))
ONLY_A = build_layer(LayerBuilder().file("a", "a\n"))
ONLY_B = build_layer(LayerBuilder().file("b", "b\n"))
REF_A = "example.test/lease/a:v1"
REF_B = "example.test/lease/b:v1"


def manager(tmp_path: Path) -> ImageManager:
    return ImageManager(Config(state_dir=str(tmp_path / "state")))


@pytest.fixture
async def m(tmp_path: Path) -> AsyncIterator[ImageManager]:
    mgr = manager(tmp_path)
    await mgr.start()
    yield mgr
    await mgr.close()


async def store(m: ImageManager, ref: str, layers: list[BuiltLayer]) -> str:
    """Put an image in the store the way a pull does, ending with the pull's commit."""
    img = build_image(layers, config={"Cmd": [ref]})

    def put() -> None:
        for blob in [img.config, img.manifest, *(x.blob for x in layers)]:
            m.content.put(blob)
        for x in layers:
            m.layers.unpack(x.diff_id, m.content.path(x.digest), f"layer of {ref}")

    await asyncio.to_thread(put)
    refs = [LayerRef(x.digest, x.media_type, len(x.blob), x.diff_id) for x in layers]
    result = PullResult(
        parse_reference(ref),
        img.manifest_digest,
        img.manifest_digest,
        img.config_digest,
        len(img.config),
        len(img.manifest),
        refs,
        [],
    )
    return await m._commit(result)


def has_layer(m: ImageManager, layer: BuiltLayer) -> bool:
    return m.layers.get(layer.diff_id) is not None


async def test_removed_image_keeps_leased_layers_until_release(m: ImageManager) -> None:
    image_id = await store(m, REF_A, [BASE, ONLY_A])
    empty = m.fs_info().used_bytes
    img = await m.acquire(REF_A, "c1")
    assert img.id == image_id
    assert [d.parent.name for d in img.layer_dirs] == [BASE.diff_id[7:], ONLY_A.diff_id[7:]]
    await m.remove(REF_A)
    # The image is gone for CRI ...
    assert m.list() == [] and m.status(REF_A) is None and m.status(image_id) is None
    with pytest.raises(ImageNotFound):
        await m.acquire(image_id, "c2")
    # ... but the layer dirs under the container's overlay are not; blobs are collected.
    assert has_layer(m, BASE) and has_layer(m, ONLY_A)
    assert (img.layer_dirs[0] / "etc/base").read_text() == "base\n"
    assert m.content.list() == set()
    held = m.fs_info().used_bytes
    assert held < empty
    await m.release("c1")
    assert not has_layer(m, BASE) and not has_layer(m, ONLY_A)
    assert m.lease_holders() == set()
    assert m.fs_info().used_bytes < held - 65536
    assert list((m.root / "layers").iterdir()) == []
    await m.release("c1")  # releasing again, or an unknown holder, is a no-op
    await m.release("never-held")


async def test_shared_layers_stay_while_any_lease_holds_them(m: ImageManager) -> None:
    await store(m, REF_A, [BASE, ONLY_A])
    await store(m, REF_B, [BASE, ONLY_B])
    await m.acquire(REF_A, "c1")
    await m.acquire(REF_A, "c2")
    await m.acquire(REF_B, "c3")
    await m.remove(REF_A)
    await m.remove(REF_B)
    assert all(has_layer(m, x) for x in (BASE, ONLY_A, ONLY_B))
    await m.release("c1")
    assert all(has_layer(m, x) for x in (BASE, ONLY_A, ONLY_B))  # c2 still has A
    await m.release("c2")
    assert has_layer(m, BASE) and not has_layer(m, ONLY_A) and has_layer(m, ONLY_B)
    await m.release_many(["c3", "c3", "unknown"])
    assert not any(has_layer(m, x) for x in (BASE, ONLY_A, ONLY_B))


async def test_release_with_the_image_still_there_collects_nothing(m: ImageManager) -> None:
    await store(m, REF_A, [BASE, ONLY_A])
    await m.acquire(REF_A, "c1")
    await m.release("c1")
    assert has_layer(m, BASE) and has_layer(m, ONLY_A)
    assert [i.repo_tags for i in m.list()] == [[REF_A]]
    await m.remove(REF_A)  # no lease left: collected at once, as before leases
    assert not has_layer(m, BASE) and not has_layer(m, ONLY_A)


async def test_acquiring_again_replaces_the_holders_lease(m: ImageManager) -> None:
    await store(m, REF_A, [BASE, ONLY_A])
    await store(m, REF_B, [BASE, ONLY_B])
    await m.acquire(REF_A, "c1")
    await m.remove(REF_A)
    await m.acquire(REF_B, "c1")  # A's own layer is no longer held by anyone
    assert not has_layer(m, ONLY_A) and has_layer(m, BASE) and has_layer(m, ONLY_B)
    lease = m.lease_of("c1")
    assert lease is not None and lease.layers == (BASE.diff_id, ONLY_B.diff_id)


async def test_re_pull_while_leased_reuses_the_layer_dirs(m: ImageManager) -> None:
    image_id = await store(m, REF_A, [BASE, ONLY_A])
    await m.acquire(REF_A, "c1")
    inode = (m.layers.fs(BASE.diff_id) / "etc/base").stat().st_ino
    await m.remove(REF_A)
    assert await store(m, REF_A, [BASE, ONLY_A]) == image_id
    assert (m.layers.fs(BASE.diff_id) / "etc/base").stat().st_ino == inode  # not unpacked again
    assert len(list((m.root / "layers").iterdir())) == 2
    await m.release("c1")
    assert has_layer(m, BASE) and has_layer(m, ONLY_A)  # the image has them again


async def test_bad_holder_and_missing_image_write_no_lease(m: ImageManager) -> None:
    await store(m, REF_A, [BASE])
    for holder in ("", "../x", ".hidden", "a/b", "x" * 200):
        with pytest.raises(InvalidArgument):
            await m.acquire(REF_A, holder)
    with pytest.raises(ImageNotFound):
        await m.acquire("example.test/lease/missing:v1", "c1")
    assert m.lease_holders() == set()
    assert list((m.root / "leases").iterdir()) == []


async def test_leases_survive_a_restart(tmp_path: Path) -> None:
    m = manager(tmp_path)
    await m.start()
    try:
        image_id = await store(m, REF_A, [BASE, ONLY_A])
        await m.acquire(REF_A, "c1")
        await m.remove(REF_A)
    finally:
        await m.close()
    doc = json.loads((tmp_path / "state/images/leases/c1.json").read_bytes())
    assert doc["version"] == 1 and doc["holder"] == "c1" and doc["image_id"] == image_id
    assert doc["layers"] == [BASE.diff_id, ONLY_A.diff_id]
    m = manager(tmp_path)
    await m.start()  # its GC at start keeps what the lease holds
    try:
        assert m.list() == []
        assert m.lease_holders() == {"c1"}
        assert has_layer(m, BASE) and has_layer(m, ONLY_A)
        await m.release("c1")
        assert not has_layer(m, BASE) and not has_layer(m, ONLY_A)
    finally:
        await m.close()
    m = manager(tmp_path)
    await m.start()
    try:
        assert m.lease_holders() == set()
    finally:
        await m.close()


async def test_unreadable_lease_keeps_every_layer_until_released(tmp_path: Path) -> None:
    m = manager(tmp_path)
    await m.start()
    try:
        await store(m, REF_A, [BASE])
        await store(m, REF_B, [ONLY_B])
        await m.acquire(REF_A, "c1")
    finally:
        await m.close()
    # a lease from a newer criv: which layers it holds is unknown
    leases = tmp_path / "state/images/leases"
    (leases / "c2.json").write_text(json.dumps({"version": 99, "holder": "c2"}))
    (leases / ".c3.json.abc.tmp").write_text("{")  # an interrupted write: swept
    m = manager(tmp_path)
    await m.start()
    try:
        assert m.lease_holders() == {"c1", "c2"}
        assert not (leases / ".c3.json.abc.tmp").exists()
        await m.remove(REF_A)
        await m.remove(REF_B)
        assert has_layer(m, BASE) and has_layer(m, ONLY_B)
        await m.release("c2")
        assert not (leases / "c2.json").exists()
        assert has_layer(m, BASE) and not has_layer(m, ONLY_B)
        await m.release("c1")
        assert not has_layer(m, BASE)
    finally:
        await m.close()
