"""Layer unpacking: whiteouts, opaque dirs, links, devices, ownership, modes, xattrs,
compression, diff id checks."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from criv.errors import DigestMismatch, ImageError
from criv.image.layers import LayerStore, disk_usage
from criv.image.unpack import OPAQUE_XATTR, unpack_layer
from tests.support.images import LayerBuilder, build_layer, busybox_rootfs


def unpack(tmp_path: Path, lb: LayerBuilder, compression: str = "gzip") -> Path:
    built = build_layer(lb, compression, oci=True)
    blob = tmp_path / "blob"
    blob.write_bytes(built.blob)
    dest = tmp_path / "fs"
    dest.mkdir()
    unpack_layer(blob, dest, built.diff_id)
    return dest


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_files_dirs_modes_owners(tmp_path: Path, compression: str) -> None:
    lb = LayerBuilder()
    lb.dir("etc", 0o750, uid=12, gid=34, mtime=1_600_000_000)
    lb.file("etc/conf", "hello", 0o640, uid=1000, gid=1001, mtime=1_500_000_000)
    lb.file("bin/suid", b"\x7fELF", 0o4755, uid=0, gid=0)
    lb.dir("tmp", 0o1777)
    fs = unpack(tmp_path, lb, compression)
    st = os.lstat(fs / "etc")
    assert stat.S_IMODE(st.st_mode) == 0o750 and (st.st_uid, st.st_gid) == (12, 34)
    assert st.st_mtime == 1_600_000_000
    st = os.lstat(fs / "etc/conf")
    assert (fs / "etc/conf").read_text() == "hello"
    assert stat.S_IMODE(st.st_mode) == 0o640 and (st.st_uid, st.st_gid) == (1000, 1001)
    assert st.st_mtime == 1_500_000_000
    assert stat.S_IMODE(os.lstat(fs / "bin/suid").st_mode) == 0o4755
    # implicit parent made 0755
    assert stat.S_IMODE(os.lstat(fs / "bin").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(fs / "tmp").st_mode) == 0o1777


def test_links_devices_xattrs(tmp_path: Path) -> None:
    lb = LayerBuilder()
    lb.file("a/file", "data", 0o600, xattrs={"user.criv": b"v1", "security.x": b"\x00\xff"})
    lb.hardlink("a/hard", "a/file")
    lb.symlink("a/sym", "../etc/passwd")
    lb.symlink("a/abs", "/etc/shadow")
    lb.chardev("dev/null", 1, 3, 0o666)
    lb.fifo("dev/fifo")
    lb.file("over", "ignored", xattrs={"trusted.overlay.redirect": b"/etc"})
    fs = unpack(tmp_path, lb)
    assert os.lstat(fs / "a/file").st_ino == os.lstat(fs / "a/hard").st_ino
    assert os.lstat(fs / "a/file").st_nlink == 2
    assert os.readlink(fs / "a/sym") == "../etc/passwd"
    assert os.readlink(fs / "a/abs") == "/etc/shadow"
    assert os.getxattr(fs / "a/file", "user.criv") == b"v1"
    st = os.lstat(fs / "dev/null")
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
    assert stat.S_IMODE(st.st_mode) == 0o666
    assert stat.S_ISFIFO(os.lstat(fs / "dev/fifo").st_mode)
    # layer content may not steer overlayfs
    assert "trusted.overlay.redirect" not in os.listxattr(fs / "over")


def test_whiteouts_become_overlay_form(tmp_path: Path) -> None:
    lb = LayerBuilder().dir("data").whiteout("data/gone").dir("opq").opaque("opq")
    lb.file("opq/new", "n").whiteout("top")
    fs = unpack(tmp_path, lb)
    for p in (fs / "data/gone", fs / "top"):
        st = os.lstat(p)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
    assert os.getxattr(fs / "opq", OPAQUE_XATTR) == b"y"
    assert sorted(os.listdir(fs / "opq")) == ["new"]
    assert not any(n.startswith(".wh.") for _, ds, fs_ in os.walk(fs) for n in ds + fs_)


def test_later_entry_replaces_earlier(tmp_path: Path) -> None:
    lb = LayerBuilder().file("x", "one").file("x", "two").dir("d").file("d/f", "f")
    lb.file("d", "now a file")
    fs = unpack(tmp_path, lb)
    assert (fs / "x").read_text() == "two"
    assert (fs / "d").read_text() == "now a file"


def test_busybox_rootfs(tmp_path: Path) -> None:
    fs = unpack(tmp_path, busybox_rootfs())
    assert os.readlink(fs / "bin/sh") == "busybox"
    assert os.access(fs / "bin/busybox", os.X_OK)
    assert "app:x:1000:1000" in (fs / "etc/passwd").read_text()
    assert os.lstat(fs / "home/app").st_uid == 1000


def test_diff_id_mismatch(tmp_path: Path) -> None:
    built = build_layer(LayerBuilder().file("a", "a"))
    blob = tmp_path / "blob"
    blob.write_bytes(built.blob)
    (tmp_path / "fs").mkdir()
    with pytest.raises(DigestMismatch):
        unpack_layer(blob, tmp_path / "fs", "sha256:" + "0" * 64)


def test_corrupt_archive(tmp_path: Path) -> None:
    built = build_layer(LayerBuilder().file("a", "a" * 10000))
    blob = tmp_path / "blob"
    blob.write_bytes(built.blob[: len(built.blob) // 2])
    (tmp_path / "fs").mkdir()
    with pytest.raises(ImageError):
        unpack_layer(blob, tmp_path / "fs", built.diff_id)


def test_layer_store_atomic_and_shared(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "images")
    (tmp_path / "images").mkdir()
    store.setup()
    good = build_layer(LayerBuilder().file("a", "a"))
    bad = build_layer(LayerBuilder().file("b", "b"))
    (tmp_path / "good").write_bytes(good.blob)
    (tmp_path / "bad").write_bytes(bad.blob)
    with pytest.raises(DigestMismatch):
        store.unpack("sha256:" + "1" * 64, tmp_path / "bad", "bad layer")
    assert os.listdir(store.dir) == []  # nothing half-unpacked is visible
    info = store.unpack(good.diff_id, tmp_path / "good", "good layer")
    assert (info.fs / "a").read_text() == "a"
    assert store.unpack(good.diff_id, tmp_path / "good", "again") == info
    assert info.inodes >= 3 and info.usage_bytes > 0
    used, inodes = disk_usage(store.path(good.diff_id))
    assert inodes == info.inodes and abs(used - info.usage_bytes) <= 4096
    store.remove(good.diff_id)
    assert store.get(good.diff_id) is None
