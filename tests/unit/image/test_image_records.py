"""Image records are immutable and published only once saved; the store is private.

No registry: a pull's commit is driven directly with blobs put into the store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from criv.config import Config
from criv.image.manager import ImageManager
from criv.image.pull import PullResult
from criv.image.records import LayerRef, RecordStore
from criv.image.reference import parse_reference
from tests.support.images import LayerBuilder, build_image, build_layer

LAYER = build_layer(LayerBuilder().file("etc/a", "a\n"))
REF_1 = "example.test/rec/one:v1"
REF_2 = "example.test/rec/one:v2"


def manager(tmp_path: Path) -> ImageManager:
    return ImageManager(Config(state_dir=str(tmp_path / "state")))


@pytest.fixture
async def m(tmp_path: Path) -> AsyncIterator[ImageManager]:
    mgr = manager(tmp_path)
    await mgr.start()
    yield mgr
    await mgr.close()


async def commit(m: ImageManager, ref: str, cmd: str) -> str:
    """Put an image (one unpacked layer) in the store and commit it as a pull does."""
    img = build_image([LAYER], config={"Cmd": [cmd]})

    def put() -> None:
        for blob in (img.config, img.manifest, LAYER.blob):
            m.content.put(blob)
        m.layers.unpack(LAYER.diff_id, m.content.path(LAYER.digest), "layer")

    await asyncio.to_thread(put)
    layer = LayerRef(LAYER.digest, LAYER.media_type, len(LAYER.blob), LAYER.diff_id)
    result = PullResult(
        parse_reference(ref),
        img.manifest_digest,
        img.manifest_digest,
        img.config_digest,
        len(img.config),
        len(img.manifest),
        [layer],
        [],
    )
    return await m._commit(result)


def fail_saves(monkeypatch: pytest.MonkeyPatch, module: str = "criv.image.records") -> None:
    """Make ``module``'s atomic writes fail as a full disk would."""

    def refuse(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(f"{module}.write_atomic", refuse)


def tags(m: ImageManager) -> dict[str, list[str]]:
    return {i.id: i.repo_tags for i in m.list()}


async def test_records_are_frozen(m: ImageManager) -> None:
    image_id = await commit(m, REF_1, "one")
    rec = m.index.by_id[image_id]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.repo_tags = ()  # type: ignore[misc]
    assert isinstance(rec.repo_tags, tuple) and isinstance(rec.layers, tuple)


async def test_failed_untag_leaves_memory_as_on_disk(
    m: ImageManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    image_id = await commit(m, REF_1, "one")
    await commit(m, REF_2, "one")
    before = m.index.by_id[image_id]
    fail_saves(monkeypatch)
    with pytest.raises(OSError):
        await m.remove(REF_1)  # the image has two tags: only untags
    assert m.index.by_id[image_id] is before
    assert tags(m) == {image_id: [REF_1, REF_2]}
    monkeypatch.undo()
    await m.remove(REF_1)
    assert tags(m) == {image_id: [REF_2]}
    assert RecordStore(m.root).load_all()[0].repo_tags == (REF_2,)


async def test_failed_tag_move_leaves_memory_as_on_disk(
    m: ImageManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_id = await commit(m, REF_1, "old")
    fail_saves(monkeypatch)
    with pytest.raises(OSError):
        await commit(m, REF_1, "new")  # would move the tag to a new image
    assert tags(m) == {old_id: [REF_1]}
    assert [r.repo_tags for r in RecordStore(m.root).load_all()] == [(REF_1,)]


async def test_failed_lease_write_leaves_memory_as_on_disk(
    m: ImageManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    await commit(m, REF_1, "one")
    fail_saves(monkeypatch, "criv.image.leases")
    with pytest.raises(OSError):
        await m.acquire(REF_1, "c1")
    assert m.lease_holders() == set() and m.lease_of("c1") is None


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


async def test_store_is_private(tmp_path: Path) -> None:
    m = manager(tmp_path)
    await m.start()
    try:
        await commit(m, REF_1, "one")
        await m.acquire(REF_1, "c1")
        root = tmp_path / "state/images"
        dirs = [root, *(p for p in root.rglob("*") if p.is_dir() and "fs" not in p.parts)]
        assert {p.relative_to(root).as_posix(): mode(p) for p in dirs} == {
            p.relative_to(root).as_posix(): 0o700 for p in dirs
        }
        assert {"blobs/sha256", "layers", "records", "leases", "tmp", "trash"} <= {
            p.relative_to(root).as_posix() for p in dirs
        }
        files = [p for p in root.rglob("*.json") if "fs" not in p.parts]
        assert files and all(mode(p) == 0o600 for p in files)
    finally:
        await m.close()


async def test_an_older_world_readable_store_is_tightened_at_start(tmp_path: Path) -> None:
    m = manager(tmp_path)
    await m.start()
    try:
        await commit(m, REF_1, "one")
    finally:
        await m.close()
    root = tmp_path / "state/images"
    layer_dir = m.layers.path(LAYER.diff_id)
    for p in (root, root / "layers", root / "records", layer_dir):
        os.chmod(p, 0o755)
    m = manager(tmp_path)
    await m.start()
    try:
        assert [mode(p) for p in (root, root / "layers", root / "records", layer_dir)] == [
            0o700
        ] * 4
        assert m.get(REF_1).layer_dirs[0] == layer_dir / "fs"  # the content is untouched
    finally:
        await m.close()
