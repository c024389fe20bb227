"""The host side of a vm pod's share with sub-mounts and propagation, real mounts and no
VM (``PodPaths.shared`` is what virtiofsd serves the guest): a read-only volume's
sub-mounts keep their flags, recursive read-only reaches them, a host-to-container
volume receives the host's later mounts, and a volume of ``/`` leaves the pods' own
mounts out."""

from __future__ import annotations

import asyncio
import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from criv.mounts import is_mounted, mounts_under
from criv.sandbox.isolation import PodPaths
from criv.sandbox.vm import share as shares

CID = "c" * 64


@pytest.fixture
def pod(tmp_path: Path) -> Iterator[PodPaths]:
    paths = PodPaths(tmp_path / "pod", tmp_path / "run")
    paths.state.mkdir()
    asyncio.run(shares.prepare(paths))
    yield paths
    asyncio.run(shares.teardown(paths))
    assert not mounts_under(paths.state), "share mounts left behind"


@pytest.fixture
def host_mounts(tmp_path: Path) -> Iterator[list[Path]]:
    """Mount points the test makes on the host, unmounted before the pod's check."""
    made: list[Path] = []
    yield made
    for p in reversed(made):
        subprocess.run(["umount", "-R", "--lazy", str(p)], capture_output=True)


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def _tmpfs(at: Path, made: list[Path]) -> None:
    at.mkdir(parents=True, exist_ok=True)
    _sh("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(at))
    made.append(at)


def _writable(p: Path) -> bool:
    try:
        p.write_text("x")
    except OSError as e:
        assert e.errno == errno.EROFS, e
        return False
    return True


def test_read_only_keeps_sub_mounts_flags_recursive_reaches_them(
    pod: PodPaths, tmp_path: Path, host_mounts: list[Path]
) -> None:
    vol = tmp_path / "vol"
    _tmpfs(vol / "sub", host_mounts)
    asyncio.run(shares.share(pod, CID, vol, "m0", True))
    asyncio.run(shares.share(pod, CID, vol, "m1", True, recursive_ro=True))
    guest = pod.shared / "c" / CID
    assert not _writable(guest / "m0" / "top") and _writable(guest / "m0" / "sub" / "f")
    assert not _writable(guest / "m1" / "top") and not _writable(guest / "m1" / "sub" / "g")
    assert (vol / "sub" / "f").exists() and not (vol / "sub" / "g").exists()
    # nosuid,nodev on every mount of the bind, sub-mounts included
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        f = line.split()
        if f[4].startswith(str(guest)):
            assert {"nosuid", "nodev"} <= set(f[5].split(",")), line


def test_host_to_container_receives_later_host_mounts_private_does_not(
    pod: PodPaths, tmp_path: Path, host_mounts: list[Path]
) -> None:
    src = tmp_path / "src"
    (src / "late").mkdir(parents=True)
    _sh("mount", "--bind", str(src), str(src))
    host_mounts.append(src)
    _sh("mount", "--make-private", str(src))
    _sh("mount", "--make-shared", str(src))
    asyncio.run(shares.share(pod, CID, src, "m0", False, host_to_container=True))
    asyncio.run(shares.share(pod, CID, src, "m1", False))
    _tmpfs(src / "late", host_mounts)
    (src / "late" / "marker").write_text("from the host\n")
    guest = pod.shared / "c" / CID
    assert (guest / "m0" / "late" / "marker").read_text() == "from the host\n"
    assert not (guest / "m1" / "late" / "marker").exists()
    # nothing flows back: a mount on the guest's side is not a host mount
    asyncio.run(shares.unshare(pod, CID))
    assert is_mounted(src / "late") and (src / "late" / "marker").exists()


def test_a_volume_of_root_leaves_the_pods_mounts_out(
    tmp_path: Path, host_mounts: list[Path]
) -> None:
    _tmpfs(tmp_path / "elsewhere", host_mounts)  # a host mount outside the pods' dir
    pods = [PodPaths(tmp_path / "pods" / n, tmp_path / f"run-{n}") for n in "ab"]
    try:
        for p in pods:  # each with its share's mounts under the pods' dir
            p.state.mkdir(parents=True)
            asyncio.run(shares.prepare(p))
        asyncio.run(shares.share(pods[0], CID, Path("/"), "m0", True))
        inside = pods[0].shared / "c" / CID / "m0" / str(tmp_path).lstrip("/")
        assert is_mounted(inside / "elsewhere")  # the host's other sub-mounts are there
        assert not mounts_under(inside / "pods")  # not the pods' shares (its own neither)
        assert not _writable(inside / "top")
    finally:
        for p in pods:
            asyncio.run(shares.teardown(p))
    assert not mounts_under(tmp_path / "pods")
