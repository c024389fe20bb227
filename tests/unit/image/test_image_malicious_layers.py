"""The malicious-layer suite: every layer here tries to write outside its root.

Each must fail with UnsafeLayer, and a snapshot of everything around the store (a
sentinel directory with a secret file, the store's own parents) must be unchanged.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from criv.errors import UnsafeLayer
from criv.image.layers import LayerStore
from tests.support.images import LayerBuilder, build_layer


def snapshot(root: Path, skip: Path) -> dict[str, tuple[object, ...]]:
    """Everything under ``root`` except ``skip``: type, mode, owner, size, content, xattrs."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        if d == skip or skip in d.parents:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = d / name
            st = os.lstat(p)
            content: object = None
            if p.is_symlink():
                content = os.readlink(p)
            elif p.is_file():
                content = hashlib.sha256(p.read_bytes()).hexdigest()
            out[str(p.relative_to(root))] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_nlink,
                st.st_mtime_ns,
                content,
                tuple(sorted(os.listxattr(p, follow_symlinks=False))),
            )
    return out


@pytest.fixture
def world(tmp_path: Path) -> tuple[Path, Path, LayerStore]:
    """(sentinel dir, store root, layer store): the store lives at tmp/store/images."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    (outside / "sub").mkdir()
    (outside / "sub" / "file").write_text("file")
    images = tmp_path / "store" / "images"
    images.mkdir(parents=True)
    store = LayerStore(images)
    store.setup()
    return outside, tmp_path / "store", store


def _ti(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = 0o644
    ti.linkname = linkname
    return ti


def case_dotdot(o: Path) -> LayerBuilder:
    return LayerBuilder().raw(_ti("../../../outside/pwned"), b"x")


def case_dotdot_inner(o: Path) -> LayerBuilder:
    return LayerBuilder().dir("a").raw(_ti("a/../../x"), b"x")


def case_absolute(o: Path) -> LayerBuilder:
    return LayerBuilder().raw(_ti(str(o / "pwned")), b"x")


def case_absolute_overwrite(o: Path) -> LayerBuilder:
    return LayerBuilder().raw(_ti(str(o / "secret")), b"overwritten")


def case_symlink_abs_then_write(o: Path) -> LayerBuilder:
    return LayerBuilder().symlink("link", str(o)).file("link/pwned", "x")


def case_symlink_rel_then_write(o: Path) -> LayerBuilder:
    return LayerBuilder().symlink("link", "../../../../outside").file("link/pwned", "x")


def case_symlink_then_overwrite(o: Path) -> LayerBuilder:
    return LayerBuilder().symlink("link", str(o)).file("link/secret", "overwritten")


def case_symlink_then_mkdir(o: Path) -> LayerBuilder:
    return LayerBuilder().symlink("link", str(o)).dir("link/newdir")


def case_symlink_then_symlink(o: Path) -> LayerBuilder:
    return LayerBuilder().symlink("link", str(o)).symlink("link/evil", "/etc/passwd")


def case_symlink_then_device(o: Path) -> LayerBuilder:
    return LayerBuilder().symlink("link", str(o)).chardev("link/mem", 1, 1)


def case_nested_symlink_write(o: Path) -> LayerBuilder:
    lb = LayerBuilder().dir("a").symlink("a/b", str(o / "sub"))
    return lb.file("a/b/file", "overwritten")


def case_hardlink_dotdot(o: Path) -> LayerBuilder:
    return LayerBuilder().hardlink("h", "../../../../outside/secret")


def case_hardlink_absolute(o: Path) -> LayerBuilder:
    return LayerBuilder().hardlink("h", str(o / "secret"))


def case_hardlink_through_symlink(o: Path) -> LayerBuilder:
    return LayerBuilder().symlink("link", str(o)).hardlink("h", "link/secret")


def case_dir_replaced_by_symlink(o: Path) -> LayerBuilder:
    lb = LayerBuilder().dir("d").file("d/a", "a")
    return lb.symlink("d", str(o)).file("d/pwned", "x")


def case_dir_replaced_by_symlink_overwrite(o: Path) -> LayerBuilder:
    lb = LayerBuilder().dir("d").file("d/a", "a")
    return lb.symlink("d", str(o)).file("d/secret", "overwritten")


def case_whiteout_dotdot_target(o: Path) -> LayerBuilder:
    return LayerBuilder().dir("a").file("a/.wh..", "")


def case_whiteout_dotdot_path(o: Path) -> LayerBuilder:
    return LayerBuilder().raw(_ti("../../../outside/.wh.secret"), b"")


def case_whiteout_absolute(o: Path) -> LayerBuilder:
    return LayerBuilder().raw(_ti(str(o / ".wh.secret")), b"")


def case_whiteout_through_symlink(o: Path) -> LayerBuilder:
    return LayerBuilder().symlink("link", str(o)).whiteout("link/secret")


def case_opaque_through_symlink(o: Path) -> LayerBuilder:
    return LayerBuilder().symlink("link", str(o)).opaque("link")


def case_root_replaced(o: Path) -> LayerBuilder:
    return LayerBuilder().raw(_ti("./", tarfile.SYMTYPE, str(o)))


CASES: dict[str, Callable[[Path], LayerBuilder]] = {
    name[len("case_") :]: fn for name, fn in globals().items() if name.startswith("case_")
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malicious_layer_refused(world: tuple[Path, Path, LayerStore], case: str) -> None:
    outside, store_root, store = world
    tmp = outside.parent
    built = build_layer(CASES[case](outside))
    blob = tmp / "blob.tar.gz"
    blob.write_bytes(built.blob)
    before = snapshot(tmp, skip=store_root)
    with pytest.raises(UnsafeLayer):
        store.unpack(built.diff_id, blob, f"malicious layer {case}")
    assert snapshot(tmp, skip=store_root) == before, "something was written outside the store"
    # and nothing half-unpacked is visible in the store
    assert os.listdir(store.dir) == []
    assert os.listdir(store.trash) == []


def test_symlinks_themselves_are_fine(world: tuple[Path, Path, LayerStore]) -> None:
    """A symlink pointing anywhere is only data; hardlinking the symlink is fine too."""
    outside, store_root, store = world
    lb = LayerBuilder().symlink("abs", str(outside / "secret")).symlink("rel", "../../x")
    lb.hardlink("hl", "abs")
    built = build_layer(lb)
    blob = outside.parent / "blob.tar.gz"
    blob.write_bytes(built.blob)
    before = snapshot(outside.parent, skip=store_root)
    info = store.unpack(built.diff_id, blob, "symlinks")
    assert os.readlink(info.fs / "hl") == str(outside / "secret")
    assert snapshot(outside.parent, skip=store_root) == before
