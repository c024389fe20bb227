"""ImageManager directly (what the sandbox code uses), against the session registry."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from criv.config import Config
from criv.errors import ImageNotFound
from criv.image.manager import ImageManager
from criv.image.pull import SingleFlight
from tests.support.fixtures import TestRegistry
from tests.support.images import LayerBuilder, build_image, build_layer, busybox_rootfs

pytestmark = pytest.mark.integration


def manager(tmp_path: Path) -> ImageManager:
    return ImageManager(Config(state_dir=str(tmp_path / "state")))


async def test_get_for_sandboxes(tmp_path: Path, registry: TestRegistry) -> None:
    top = LayerBuilder().dir("app", uid=1000, gid=1000).file("app/run", "#!/bin/sh\n", 0o755)
    img = build_image(
        [build_layer(busybox_rootfs()), build_layer(top)],
        config={"User": "app", "WorkingDir": "/app", "Entrypoint": ["/app/run"]},
    )
    registry.push_image("mgr/app", "v1", img)
    m = manager(tmp_path)
    await m.start()
    try:
        with pytest.raises(ImageNotFound):
            m.get(registry.ref("mgr/app", "v1"))
        image_id = await m.pull(registry.ref("mgr/app", "v1"))
        got = m.get(registry.ref("mgr/app", "v1"))
        assert got.id == image_id == img.config_digest
        assert got.user == "app"
        assert got.config["config"]["WorkingDir"] == "/app"
        assert got.config_json == img.config
        assert [d.parent.name for d in got.layer_dirs] == [x.diff_id[7:] for x in img.layers]
        assert (got.layer_dirs[0] / "bin/busybox").is_file()  # lowest first
        assert (got.layer_dirs[1] / "app/run").read_text() == "#!/bin/sh\n"
        assert m.get(image_id[:19]).id == image_id
    finally:
        await m.close()


async def test_gc_keeps_what_a_pull_uses(tmp_path: Path) -> None:
    m = manager(tmp_path)
    await m.start()
    try:
        digest = await asyncio.to_thread(m.content.put, b"in flight")
        async with m._pull_scope():
            await m._keep_for_pull([digest])
            await m.gc()
            assert m.content.has(digest)
        await m.gc()
        assert not m.content.has(digest)
    finally:
        await m.close()


async def test_start_sweeps_leftovers(tmp_path: Path, registry: TestRegistry) -> None:
    m = manager(tmp_path)
    await m.start()
    await m.pull(registry.busybox_ref)
    await m.close()
    images = tmp_path / "state/images"
    (images / "tmp/blob-partial").write_bytes(b"half")
    (images / "layers/.tmp-half").mkdir()
    (images / "blobs/sha256" / ("f" * 64)).write_bytes(b"orphan")
    m = manager(tmp_path)
    await m.start()
    try:
        assert os.listdir(images / "tmp") == []
        assert not (images / "layers/.tmp-half").exists()
        assert not (images / "blobs/sha256" / ("f" * 64)).exists()
        assert [i.repo_tags for i in m.list()] == [[registry.busybox_ref]]
        assert m.fs_info().used_bytes > 1_000_000
    finally:
        await m.close()


async def test_single_flight_survives_a_caller_giving_up() -> None:
    sf: SingleFlight[int] = SingleFlight()
    started = asyncio.Event()
    runs = 0

    async def work() -> int:
        nonlocal runs
        runs += 1
        started.set()
        await asyncio.sleep(0.2)
        return 42

    first = asyncio.create_task(sf.do("k", work))
    await started.wait()
    second = asyncio.create_task(sf.do("k", work))
    first.cancel()
    assert await second == 42
    assert runs == 1
    with pytest.raises(asyncio.CancelledError):
        await first
