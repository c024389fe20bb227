from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest

from criv.guestimage.cpio import write_cpio


def _tree(root: Path) -> None:
    (root / "b/sub").mkdir(parents=True)
    (root / "a.txt").write_text("hello")
    (root / "b/sub/x.bin").write_bytes(b"\0\1\2" * 1000)
    (root / "b/exe").write_text("#!/bin/sh\n")
    (root / "b/exe").chmod(0o755)
    (root / "link").symlink_to("b/exe")


def _pack(root: Path) -> bytes:
    buf = io.BytesIO()
    write_cpio(root, buf)
    return buf.getvalue()


@pytest.mark.timeout(20)
def test_deterministic_and_readable_by_cpio(tmp_path: Path) -> None:
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    for r in (r1, r2):
        r.mkdir()
        _tree(r)
    os.utime(r2 / "a.txt", (12345, 12345))
    data = _pack(r1)
    assert data == _pack(r2)  # mtimes and inode numbers of the host do not leak in
    assert len(data) % 512 == 0
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=data, capture_output=True, check=True
    ).stdout.decode()
    names = [line.split()[8] for line in listing.splitlines()]
    assert names == ["a.txt", "b", "b/exe", "b/sub", "b/sub/x.bin", "link"]
    assert "root" in listing.splitlines()[0]
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--quiet"], input=data, cwd=out, check=True)
    assert (out / "b/sub/x.bin").read_bytes() == b"\0\1\2" * 1000
    assert os.readlink(out / "link") == "b/exe"
    assert os.access(out / "b/exe", os.X_OK)


@pytest.mark.timeout(20)
def test_copy_tree_recreates_device_nodes_without_reading_them(tmp_path: Path) -> None:
    import stat

    from criv.guestimage.rootfs import copy_tree

    src = tmp_path / "src"
    (src / "dev").mkdir(parents=True)
    # /dev/zero read as a file never ends: the copy must mknod it instead
    os.mknod(src / "dev/zero", 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    (src / "etc").mkdir()
    (src / "etc/f").write_text("x")
    (src / "lib").symlink_to("etc")
    copy_tree(src, tmp_path / "dst")
    st = (tmp_path / "dst/dev/zero").lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 5)
    assert (tmp_path / "dst/lib").is_symlink()
    assert (tmp_path / "dst/etc/f").read_text() == "x"
