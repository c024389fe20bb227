"""containerDisk images: the OCI layout criv writes, finding the disk of an image (its
content untrusted), and importing a layout into the image store as a pull would."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from criv.config import Config
from criv.errors import ImageError, InvalidArgument
from criv.image.importer import import_layout
from criv.image.manager import ImageManager
from criv.vmimage import containerdisk as cd

QCOW2 = b"QFI\xfb" + b"\0" * 4092 + os.urandom(8192)


def disk(tmp_path: Path, name: str = "base.qcow2", data: bytes = QCOW2) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def blob(layout: Path, digest: str) -> bytes:
    data = (layout / "blobs" / "sha256" / digest[7:]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == digest[7:]
    return data


def test_layout_is_a_containerdisk(tmp_path: Path) -> None:
    lay = cd.write_layout(disk(tmp_path), tmp_path / "lay", tag="v1")
    assert lay.disk_name == "base.qcow2"
    index = json.loads((lay.path / "index.json").read_text())
    (entry,) = index["manifests"]
    assert entry["digest"] == lay.manifest_digest
    assert entry["annotations"][cd.REF_NAME_ANNOTATION] == "v1"
    manifest = json.loads(blob(lay.path, lay.manifest_digest))
    assert manifest["config"]["digest"] == lay.config_digest
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
    config = json.loads(blob(lay.path, lay.config_digest))
    assert config["rootfs"]["diff_ids"] == [lay.layer_digest] == [layer["digest"]]
    assert len(blob(lay.path, lay.layer_digest)) == layer["size"]
    path = lay.path / "blobs" / "sha256" / lay.layer_digest[7:]
    with tarfile.open(path) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"disk", "disk/base.qcow2"}
        f = members["disk/base.qcow2"]
        assert (f.uid, f.gid, f.mode, f.size) == (107, 107, 0o440, len(QCOW2))
        assert members["disk"].isdir()
        got = tar.extractfile(f)
        assert got is not None and got.read() == QCOW2
    assert not list(lay.path.rglob("*.partial"))


def test_disk_names(tmp_path: Path) -> None:
    assert cd.disk_file_name(disk(tmp_path, "x.raw", b"\0" * 512)) == "x.raw"
    assert cd.disk_file_name(disk(tmp_path, "noext")) == "noext.qcow2"
    assert cd.disk_file_name(disk(tmp_path, "plain.bin", b"\0" * 512)) == "plain.bin.img"
    assert cd.disk_file_name(disk(tmp_path, "a.qcow2"), name="root") == "root.qcow2"
    with pytest.raises(InvalidArgument):
        cd.disk_file_name(disk(tmp_path, "a.qcow2"), name="../x")


def layer(root: Path, n: int) -> Path:
    d = root / f"l{n}"
    (d / "disk").mkdir(parents=True)
    return d


def test_find_disk_one_file(tmp_path: Path) -> None:
    low = layer(tmp_path, 0)
    (low / "disk" / "a.qcow2").write_bytes(QCOW2)
    (low / "disk" / "README").write_text("not a disk")
    assert cd.find_disk([low]) == low / "disk" / "a.qcow2"
    assert cd.disk_format(low / "disk" / "a.qcow2") == "qcow2"


def test_find_disk_upper_layer_wins_and_whiteouts_hide(tmp_path: Path) -> None:
    low, up = layer(tmp_path, 0), layer(tmp_path, 1)
    (low / "disk" / "old.qcow2").write_bytes(QCOW2)
    (up / "disk" / "new.img").write_bytes(b"\0" * 512)
    with pytest.raises(InvalidArgument, match="more than one disk"):
        cd.find_disk([low, up])
    os.mknod(up / "disk" / "old.qcow2", stat.S_IFCHR | 0o600, 0)  # overlay whiteout
    assert cd.find_disk([low, up]) == up / "disk" / "new.img"


def test_find_disk_opaque_upper_dir_hides_lower(tmp_path: Path) -> None:
    low, up = layer(tmp_path, 0), layer(tmp_path, 1)
    (low / "disk" / "old.qcow2").write_bytes(QCOW2)
    (up / "disk" / "new.raw").write_bytes(b"\0" * 512)
    try:
        os.setxattr(up / "disk", "trusted.overlay.opaque", b"y")
    except OSError as e:
        pytest.skip(f"cannot set trusted xattrs here: {e}")
    assert cd.find_disk([low, up]) == up / "disk" / "new.raw"


@pytest.mark.parametrize("case", ["none", "symlink-file", "symlink-dir", "dir-is-file", "fifo"])
def test_find_disk_refusals(tmp_path: Path, case: str) -> None:
    low = tmp_path / "l0"
    low.mkdir()
    outside = tmp_path / "host.qcow2"
    outside.write_bytes(QCOW2)
    if case == "none":
        (low / "disk").mkdir()
        (low / "disk" / "notes.txt").write_text("x")
    elif case == "symlink-file":
        (low / "disk").mkdir()
        (low / "disk" / "a.qcow2").symlink_to(outside)
    elif case == "symlink-dir":
        (low / "disk").symlink_to(tmp_path)
    elif case == "dir-is-file":
        (low / "disk").write_bytes(QCOW2)
    elif case == "fifo":
        (low / "disk").mkdir()
        os.mkfifo(low / "disk" / "a.raw")
    with pytest.raises(InvalidArgument) as ei:
        cd.find_disk([low], "image x")
    assert "image x" in str(ei.value)


def test_find_disk_no_disk_dir(tmp_path: Path) -> None:
    low = tmp_path / "l0"
    (low / "bin").mkdir(parents=True)
    with pytest.raises(InvalidArgument, match="not a containerDisk"):
        cd.find_disk([low])


async def test_import_into_store(tmp_path: Path) -> None:
    lay = cd.write_layout(disk(tmp_path), tmp_path / "lay", tag="1")
    m = ImageManager(Config(state_dir=str(tmp_path / "state")))
    await m.start()
    try:
        ref = "registry.example/vm/base:1"
        image_id = await import_layout(m, lay.path, ref)
        assert image_id == lay.config_digest
        (img,) = m.list()
        assert img.repo_tags == [ref]
        assert img.repo_digests == [f"registry.example/vm/base@{lay.manifest_digest}"]
        path = cd.find_disk(img.layer_dirs, ref)
        assert path.read_bytes() == QCOW2
        st = path.lstat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (107, 107, 0o440)
        # importing again is idempotent; the tag can move to another image
        assert await import_layout(m, lay.path, ref) == image_id
        await m.remove(ref)
        assert m.list() == []
    finally:
        await m.close()
    # a restarted store still has nothing: removal and GC took the blobs and the layer
    assert not list((tmp_path / "state/images/blobs/sha256").iterdir())


async def test_import_refuses_a_tampered_layout(tmp_path: Path) -> None:
    lay = cd.write_layout(disk(tmp_path), tmp_path / "lay")
    layer_blob = lay.path / "blobs" / "sha256" / lay.layer_digest[7:]
    data = bytearray(layer_blob.read_bytes())
    data[-1] ^= 1
    layer_blob.write_bytes(bytes(data))
    m = ImageManager(Config(state_dir=str(tmp_path / "state")))
    await m.start()
    try:
        with pytest.raises(ImageError):
            await import_layout(m, lay.path, "registry.example/vm/bad:1")
        assert m.list() == []
        assert not list((tmp_path / "state/images/blobs/sha256").iterdir())  # collected
        with pytest.raises(InvalidArgument):
            await import_layout(m, Path("relative/layout"), "registry.example/vm/bad:1")
    finally:
        await m.close()
