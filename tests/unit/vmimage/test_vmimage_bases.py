"""A vm-image base disk stays while the image store or an overlay's pin links it, and goes
once neither does (the image was removed and no pod uses it)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from criv.sandbox.vmimage import machine


@pytest.mark.timeout(30)
def test_a_base_goes_once_neither_the_store_nor_a_pin_links_it(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    disk = store / "disk.raw"
    disk.write_bytes(b"\0" * 65536)
    root = tmp_path / "vmimage"
    base = machine.link_base(root, disk, "sha256:" + "a" * 64)
    overlay = machine.make_pod_dir(root, "b" * 64) / "overlay-c.qcow2"
    asyncio.run(machine.make_overlay(base, overlay))
    pin = machine.pin_path(overlay)
    assert pin.stat().st_ino == base.path.stat().st_ino == disk.stat().st_ino
    assert machine.prune_bases(root, grace=0) == []  # store + pin
    disk.unlink()  # RemoveImage
    assert machine.prune_bases(root, grace=0) == []  # the pod's overlay still needs it
    assert base.path.is_file()
    overlay.unlink()
    pin.unlink()  # the container removed
    assert machine.prune_bases(root) == []  # within the grace (just unlinked)
    assert machine.prune_bases(root, grace=0) == [base.path]
    assert not base.path.exists()
    assert machine.prune_bases(tmp_path / "nothing-here", grace=0) == []


@pytest.mark.timeout(30)
def test_prune_leaves_what_is_not_a_lone_regular_file(tmp_path: Path) -> None:
    bases = tmp_path / "bases"
    bases.mkdir()
    (bases / "link").symlink_to("/etc/hostname")
    (bases / "dir").mkdir()
    kept = bases / "kept.raw"
    kept.write_bytes(b"x")
    os.link(kept, tmp_path / "other-link")
    assert machine.prune_bases(tmp_path, grace=0) == []
    assert {p.name for p in bases.iterdir()} == {"link", "dir", "kept.raw"}
