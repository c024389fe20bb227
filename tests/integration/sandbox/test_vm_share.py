"""The host side of a vm pod's share, with real mounts and no VM: what the guest sees
(``PodPaths.shared``, the 9p export) is written here directly, as QEMU's 9p server does
on the guest's behalf as root. The guest must not be able to steer where criv mounts,
write a read-only volume, or get criv to delete a volume's content."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from criv.mounts import is_mounted, mounts_under
from criv.sandbox.isolation import PodPaths
from criv.sandbox.vm import share as shares
from criv.sandbox.vm.layout import GUEST_SHARED

CID = "c" * 64
OTHER = "d" * 64


@pytest.fixture
def pod(tmp_path: Path) -> Iterator[PodPaths]:
    paths = PodPaths(tmp_path / "pod", tmp_path / "run")
    paths.state.mkdir()
    asyncio.run(shares.prepare(paths))
    yield paths
    asyncio.run(shares.teardown(paths))
    assert not mounts_under(tmp_path), "share mounts left behind"


def _vol(tmp_path: Path, name: str) -> Path:
    v = tmp_path / name
    v.mkdir()
    (v / "data").write_text("original\n")
    return v


def _erofs(fn: object, *args: object) -> None:
    with pytest.raises(OSError) as e:
        fn(*args)  # type: ignore[operator]
    assert e.value.errno in (errno.EROFS, errno.EPERM, errno.EACCES), e.value


def test_guest_sees_binds_at_guest_paths_with_their_flags(pod: PodPaths, tmp_path: Path) -> None:
    rw, ro = _vol(tmp_path, "rw"), _vol(tmp_path, "ro")
    assert asyncio.run(shares.share(pod, CID, rw, "m0", False)) == f"{GUEST_SHARED}/c/{CID}/m0"
    asyncio.run(shares.share(pod, CID, ro, "m1", True))
    guest = pod.shared / "c" / CID
    # the skeleton is searchable, not listable: a user namespace's root in the guest
    # resolves the container's paths through it (on the host, the pod dir is 0700)
    for d in (pod.shared, pod.shared / "c", guest):
        assert d.stat().st_mode & 0o777 == 0o711, d
    assert (guest / "m0" / "data").read_text() == "original\n"  # propagated into the view
    (guest / "m0" / "new").write_text("from the guest\n")  # rw volume: writable
    assert (rw / "new").read_text() == "from the guest\n"
    _erofs((guest / "m1" / "data").write_text, "changed\n")  # read-only: in both layers
    _erofs(os.chmod, guest / "m1" / "data", 0o4755)
    _erofs(os.mknod, guest / "m1" / "dev", 0o600 | 0o020000, os.makedev(1, 3))
    assert (ro / "data").read_text() == "original\n" and not (ro / "dev").exists()
    opts = {m: o for m, o in _mount_opts().items() if m.startswith(str(pod.shared))}
    assert all("nosuid" in o and "nodev" in o for o in opts.values()), opts


def test_guest_cannot_change_the_skeleton(pod: PodPaths, tmp_path: Path) -> None:
    asyncio.run(shares.share(pod, CID, _vol(tmp_path, "v"), "m0", False))
    outside = tmp_path / "host-dir"
    outside.mkdir()
    _erofs(os.rename, pod.shared / "c", pod.shared / "c2")
    _erofs(os.symlink, str(outside), pod.shared / "c" / OTHER)
    _erofs(os.symlink, str(outside), pod.shared / "c" / CID / "m1")
    _erofs(os.mkdir, pod.shared / "x")
    _erofs((pod.shared / "planted").write_text, "x")
    # the host goes on making entries where it meant to, and only there
    asyncio.run(shares.share(pod, OTHER, _vol(tmp_path, "v2"), "m0", True))
    assert list(outside.iterdir()) == [] and not is_mounted(outside)


def test_a_link_in_the_tree_is_refused_not_followed(pod: PodPaths, tmp_path: Path) -> None:
    # belt and braces: even a link in the host-only tree (no guest can put one there)
    # is refused, never mounted over
    outside = tmp_path / "host-dir"
    outside.mkdir()
    (pod.share_tree / "c" / CID).mkdir(parents=True)
    (pod.share_tree / "c" / CID / "m0").symlink_to(outside)
    with pytest.raises(Exception, match="not what criv created"):
        asyncio.run(shares.share(pod, CID, _vol(tmp_path, "v"), "m0", False))
    assert not is_mounted(outside) and list(outside.iterdir()) == []


def test_unshare_never_deletes_volume_content(pod: PodPaths, tmp_path: Path) -> None:
    v = _vol(tmp_path, "v")
    asyncio.run(shares.share(pod, CID, v, "m0", False))
    (pod.shared / "c" / CID / "m0" / "sub").mkdir()  # the guest writes in the volume
    asyncio.run(shares.unshare(pod, CID))
    assert (v / "data").read_text() == "original\n" and (v / "sub").is_dir()
    assert not (pod.share_tree / "c" / CID).exists()
    assert not mounts_under(pod.share_tree)


def test_remove_same_fs_leaves_a_mount_and_its_content(tmp_path: Path) -> None:
    top, v = tmp_path / "top", _vol(tmp_path, "v")
    (top / "a").mkdir(parents=True)
    (top / "link").symlink_to(v)
    (top / "file").write_text("x")
    os.system(f"mount --bind {v} {top / 'a'}")
    try:
        shares.remove_same_fs(top)
        assert (v / "data").exists() and (top / "a").is_dir()
        assert not (top / "link").exists() and not (top / "file").exists()
    finally:
        os.system(f"umount {top / 'a'}")
    shares.remove_same_fs(top)
    assert not top.exists() and (v / "data").exists()


def _mount_opts() -> dict[str, str]:
    out = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        f = line.split()
        out[f[4]] = f[5]
    return out
