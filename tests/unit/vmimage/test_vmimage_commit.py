"""`criv vm-image commit`'s pure pieces: the qcow2 header criv reads itself, the pinned
backing chain handed to qemu-img (a name planted in the overlay's header is never
followed), the flatten's refusals, the scratch dir check and the committed disk's name."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from criv.errors import FailedPrecondition, InvalidArgument
from criv.sandbox.vmimage.commit import check_scratch, disk_stem
from criv.vmimage.containerdisk import layout_ref
from criv.vmimage.flatten import flatten, max_overlay_bytes
from criv.vmimage.qcow2 import (
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    check_header,
    convert_argv,
    parse_header,
    pinned_chain,
    read_header,
)

MIB = 1 << 20


def header(version: int = 3, backing: bool = False, size: int = MIB, incompat: int = 0) -> bytes:
    data = struct.pack(
        ">4sIQIIQI", b"QFI\xfb", version, 512 if backing else 0, 9 if backing else 0, 16, size, 0
    )
    data += b"\0" * (72 - len(data)) + struct.pack(">Q", incompat) + b"\0" * 24
    return data


def test_parse_header() -> None:
    h = parse_header(header(backing=True, size=5 * MIB), "x")
    assert (h.version, h.has_backing, h.size, h.incompatible) == (3, True, 5 * MIB, 0)
    assert not parse_header(header(version=2)[:72], "x").has_backing
    for bad in (b"", b"QFI\xfb", b"\0" * 104, header(version=4), header()[:76]):
        with pytest.raises(FailedPrecondition):
            parse_header(bad, "the overlay")


def test_check_header_refusals() -> None:
    check_header(parse_header(header(incompat=INCOMPAT_DIRTY), "x"), "x")
    for bits, word in (
        (INCOMPAT_DATA_FILE, "external data file"),
        (INCOMPAT_CORRUPT, "corrupt"),
        (1 << 9, "unknown incompatible"),
    ):
        with pytest.raises(FailedPrecondition, match=word):
            check_header(parse_header(header(incompat=bits), "x"), "the overlay")


def test_pinned_chain_names_every_file() -> None:
    spec = pinned_chain(Path("/s/ov.qcow2"), Path("/s/b,x.qcow2"), "qcow2")
    assert spec.startswith("json:")
    assert json.loads(spec[5:]) == {
        "driver": "qcow2",
        "file": {"driver": "file", "filename": "/s/ov.qcow2"},
        "backing": {
            "driver": "qcow2",
            "file": {"driver": "file", "filename": "/s/b,x.qcow2"},
            "backing": None,
        },
    }
    raw = json.loads(pinned_chain(Path("/o"), Path("/b"), "raw")[5:])
    assert raw["backing"] == {"driver": "raw", "file": {"driver": "file", "filename": "/b"}}
    argv = convert_argv(Path("/o"), Path("/b"), "raw", Path("/out.qcow2"))
    assert argv[:6] == ["qemu-img", "convert", "-q", "-c", "-O", "qcow2"]
    assert argv[-1] == "/out.qcow2" and argv[-2].startswith("json:")
    with pytest.raises(ValueError):
        pinned_chain(Path("/o"), Path("/b"), "vmdk")


def _img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def _io(image: Path, cmd: str) -> None:
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", cmd, str(image)], check=True, capture_output=True
    )


def _raw(image: Path, tmp: Path) -> bytes:
    out = tmp / "check.raw"
    _img("convert", "-O", "raw", str(image), str(out))
    return out.read_bytes()


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A raw base with a marker, a qcow2 overlay of it with one written cluster, and a
    host file the overlay must never reach."""
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    base = tmp_path / "base.raw"
    base.write_bytes(b"BASE-MARK" + b"\0" * (MIB - 9))
    secret = tmp_path / "secret"
    secret.write_bytes(b"HOST-SECRET" + b"\0" * (MIB - 11))
    overlay = tmp_path / "overlay.qcow2"
    _img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(overlay))
    _io(overlay, "write -P 0x47 65536 65536")
    return base, overlay, secret


def test_flatten_reads_the_pinned_base_not_the_header(
    chain: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    base, overlay, secret = chain
    # the guest side plants another backing file in the overlay's header
    _img("rebase", "-u", "-F", "raw", "-b", str(secret), str(overlay))
    assert b"HOST-SECRET" in _raw(overlay, tmp_path)  # what a naive convert would copy
    out = tmp_path / "out.qcow2"
    asyncio.run(flatten(overlay, base, "raw", out))
    h = read_header(out, "out")
    assert not h.has_backing and h.size == MIB
    data = _raw(out, tmp_path)
    assert data.startswith(b"BASE-MARK") and b"HOST-SECRET" not in data
    assert data[65536 : 2 * 65536] == b"\x47" * 65536
    assert out.stat().st_size < MIB  # compressed, zeros unallocated
    st = overlay.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (os.getuid(), 0, 0o600)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_flatten_qcow2_base(tmp_path: Path) -> None:
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io not installed")
    base = tmp_path / "base.qcow2"
    _img("create", "-q", "-f", "qcow2", str(base), "1M")
    _io(base, "write -P 0x42 0 4096")
    overlay = tmp_path / "ov.qcow2"
    _img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(overlay))
    _io(overlay, "write -P 0x43 131072 4096")
    out = tmp_path / "out.qcow2"
    asyncio.run(flatten(overlay, base, "qcow2", out))
    data = _raw(out, tmp_path)
    assert data[:4096] == b"\x42" * 4096 and data[131072 : 131072 + 4096] == b"\x43" * 4096


def test_flatten_refusals(chain: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, overlay, _ = chain
    out = tmp_path / "out.qcow2"
    # an overlay of another size than its base
    other = tmp_path / "other.qcow2"
    _img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(other), "2M")
    with pytest.raises(FailedPrecondition, match="not its overlay"):
        asyncio.run(flatten(other, base, "raw", out))
    # an external data file
    data = tmp_path / "data.qcow2"
    _img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'd.raw'}", str(data), "1M")
    with pytest.raises(FailedPrecondition, match="external data file"):
        asyncio.run(flatten(data, base, "raw", out))
    # not a qcow2 at all, or a link
    junk = tmp_path / "junk"
    junk.write_bytes(b"\0" * 4096)
    with pytest.raises(FailedPrecondition, match="not a qcow2"):
        asyncio.run(flatten(junk, base, "raw", out))
    link = tmp_path / "link.qcow2"
    link.symlink_to(overlay)
    with pytest.raises(FailedPrecondition, match="not a regular file"):
        asyncio.run(flatten(link, base, "raw", out))
    # an overlay file larger than any overlay of its base (sparse here)
    huge = tmp_path / "huge.qcow2"
    shutil.copyfile(overlay, huge)
    os.truncate(huge, max_overlay_bytes(MIB) + 1)
    with pytest.raises(FailedPrecondition, match="over"):
        asyncio.run(flatten(huge, base, "raw", out))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".overlay")]


def test_check_scratch(tmp_path: Path) -> None:
    state = tmp_path / "state"
    good = state / ".vm-image-commit-x"
    good.mkdir(parents=True)
    check_scratch(state, good)
    for bad in (
        Path("relative/.vm-image-x"),
        tmp_path / ".vm-image-x",  # not under the state dir
        state / "sub" / ".vm-image-x",
        state / "other",  # not named .vm-image-*
        state / ".vm-image-missing",
    ):
        with pytest.raises(InvalidArgument):
            check_scratch(state, bad)
    (good / "f").write_text("x")
    with pytest.raises(InvalidArgument, match="empty"):
        check_scratch(state, good)
    link = state / ".vm-image-link"
    link.symlink_to(tmp_path)
    with pytest.raises(InvalidArgument):
        check_scratch(state, link)


def test_disk_stem_and_ref() -> None:
    assert disk_stem("criv-test.qcow2") == "criv-test"
    assert disk_stem("root.img") == "root"
    assert disk_stem("") == "disk"
    assert (
        disk_stem("my disk.qcow2") == disk_stem(".qcow2") == disk_stem("x" * 80 + ".img") == "disk"
    )
    assert layout_ref("registry.example/vm/x") == ("registry.example/vm/x:latest", "latest")
    assert layout_ref("registry.example/vm/x:2")[1] == "2"
    with pytest.raises(InvalidArgument, match="not a digest"):
        layout_ref("registry.example/vm/x@sha256:" + "a" * 64)
    with pytest.raises(InvalidArgument):
        layout_ref("Not A Ref")
