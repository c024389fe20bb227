"""The image cache: content-hashed stages, built once, atomic (builders faked)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest

from criv.guestimage import build, kernel, rootfs
from criv.guestimage.build import Inputs, build_guest_image, cached_image


@pytest.fixture
def inputs(tmp_path: Path) -> Inputs:
    src = tmp_path / "src"
    (src / "criv_agent").mkdir(parents=True)
    (src / "criv_agent/__init__.py").write_text("")
    (src / "criv_agent/main.py").write_text("def main(): return 0\n")
    (src / "criv.config").write_text("CONFIG_A=y\n")
    (src / "init").write_text("#!/bin/sh\n")
    (src / "early-init").write_text("#!/bin/busybox sh\n")
    return Inputs(
        fragment=src / "criv.config",
        init=src / "init",
        early_init=src / "early-init",
        agent_src=src / "criv_agent",
        mirror="http://deb.example/debian",
    )


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    n = {"kernel": 0, "base": 0}

    def fake_kernel(work: Path, fragment: Path, out: Path, progress: object, jobs: int = 0) -> Path:
        n["kernel"] += 1
        out.write_bytes(b"ELF Linux version 6.1.0-criv (x)")
        return out

    def fake_base(dest: Path, mirror: str, log: Path, progress: object) -> None:
        n["base"] += 1
        (dest / "usr/bin").mkdir(parents=True)
        (dest / "usr/bin/python3").write_text("")

    monkeypatch.setattr(kernel, "source_version", lambda: "6.1.1-1")
    monkeypatch.setattr(kernel, "build_kernel", fake_kernel)
    monkeypatch.setattr(rootfs, "build_base", fake_base)
    monkeypatch.setattr(rootfs, "precompile", lambda root, log, own: None)
    return n


@pytest.mark.timeout(30)
def test_builds_once_then_cached(tmp_path: Path, inputs: Inputs, calls: dict[str, int]) -> None:
    cache = tmp_path / "cache"
    assert cached_image(cache, inputs) is None
    lines: list[str] = []
    img = build_guest_image(cache, lines.append, inputs)
    assert calls == {"kernel": 1, "base": 1}
    assert img.kernel.read_bytes().startswith(b"ELF")
    # the root on a read-only erofs disk; the initramfs only mounts it
    assert img.initrd.name == "initramfs-early.cpio" and img.initrd.stat().st_size > 0
    assert img.root_disk is not None and img.root_disk.name == "root.erofs"
    assert img.root_disk.stat().st_mode & 0o777 == 0o644  # QEMU runs unprivileged
    assert img.kernel_release == "6.1.0-criv"
    assert any("kernel" in line for line in lines)
    again = build_guest_image(cache, lines.append, inputs)
    assert again == img and calls == {"kernel": 1, "base": 1}
    assert cached_image(cache, inputs) == img
    # no scratch directories left behind
    assert not [p for p in cache.iterdir() if p.name.startswith(".") and p.name != ".lock"]


@pytest.mark.timeout(30)
def test_agent_change_rebuilds_only_the_image(
    tmp_path: Path, inputs: Inputs, calls: dict[str, int]
) -> None:
    cache = tmp_path / "cache"
    first = build_guest_image(cache, lambda s: None, inputs)
    main = inputs.agent_src / "main.py"
    os.utime(main, (1, 1))  # mtime alone changes nothing
    assert build_guest_image(cache, lambda s: None, inputs) == first
    main.write_text("def main(): return 1\n")
    second = build_guest_image(cache, lambda s: None, inputs)
    assert second.hash != first.hash
    assert calls == {"kernel": 1, "base": 1}
    inputs.fragment.write_text("CONFIG_A=y\nCONFIG_B=y\n")
    third = build_guest_image(cache, lambda s: None, inputs)
    assert third.hash != second.hash and calls == {"kernel": 2, "base": 1}


@pytest.mark.timeout(30)
def test_failed_build_leaves_nothing_that_looks_finished(
    tmp_path: Path, inputs: Inputs, calls: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(root: Path, log: Path, own: list[str]) -> None:
        raise RuntimeError("compile failed")

    monkeypatch.setattr(rootfs, "precompile", boom)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError):
        build_guest_image(cache, lambda s: None, inputs)
    names = sorted(p.name for p in cache.iterdir())
    assert not [n for n in names if n.startswith("image-") or (n.startswith(".") and n != ".lock")]
    assert cached_image(cache, inputs) is None


@pytest.mark.timeout(10)
def test_hashes_are_stable_and_cover_inputs(inputs: Inputs) -> None:
    k1 = build.kernel_hash(inputs, "6.1.1-1")
    assert k1 == build.kernel_hash(inputs, "6.1.1-1")
    assert k1 != build.kernel_hash(inputs, "6.1.2-1")
    assert build.base_hash("http://a/debian") != build.base_hash("http://b/debian")
    i1 = build.image_hash(inputs, "k", "b")
    assert i1 != build.image_hash(inputs, "k2", "b")
    assert i1 != build.image_hash(Inputs(**{**inputs.__dict__, "compress": True}), "k", "b")


@pytest.mark.timeout(30)
def test_prune_keeps_only_what_the_image_uses(
    tmp_path: Path, inputs: Inputs, calls: dict[str, int]
) -> None:
    from criv.guestimage.build import prune_cache

    cache = tmp_path / "cache"
    old = build_guest_image(cache, lambda s: None, inputs)
    inputs.fragment.write_text("CONFIG_A=y\nCONFIG_Z=y\n")
    new = build_guest_image(cache, lambda s: None, inputs)
    removed = prune_cache(cache, new)
    assert old.directory.name in removed and any(r.startswith("kernel-") for r in removed)
    assert new.kernel.is_file() and new.initrd.is_file()
    assert cached_image(cache, inputs) == new


def _cpio_names(path: Path) -> list[str]:
    out = subprocess.run(["cpio", "-t"], stdin=path.open("rb"), capture_output=True, text=True)
    return sorted(out.stdout.split())


@pytest.mark.timeout(30)
def test_the_root_disk_holds_the_root_and_the_early_initramfs_only_mounts_it(
    tmp_path: Path, inputs: Inputs, calls: dict[str, int]
) -> None:
    img = build_guest_image(tmp_path / "cache", lambda s: None, inputs)
    assert img.root_disk is not None
    out = tmp_path / "x"
    r = subprocess.run(
        ["fsck.erofs", f"--extract={out}", str(img.root_disk)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    # a virtio-pmem device is the whole file, which the guest maps in 2 MiB sections
    assert img.root_disk.stat().st_size % (2 << 20) == 0
    assert (out / "init").read_text() == "#!/bin/sh\n"  # images/init, PID 1 after the switch
    assert (out / "usr/bin/python3").is_file()
    assert (out / "usr/local/lib/python3.11/dist-packages/criv_agent/main.py").is_file()
    early = _cpio_names(img.initrd)
    assert early == ["bin", "bin/busybox", "dev", "dev/console", "init", "lower",
                     "newroot", "proc", "rw"]  # fmt: skip
    assert "usr" not in early


@pytest.mark.timeout(30)
def test_root_in_the_initramfs_when_asked_or_with_the_debian_kernel(
    tmp_path: Path, inputs: Inputs, calls: dict[str, int]
) -> None:
    ram = dataclasses.replace(inputs, root="initramfs")
    assert build.image_hash(ram, "k", "b") != build.image_hash(inputs, "k", "b")
    img = build_guest_image(tmp_path / "cache", lambda s: None, ram)
    assert img.root_disk is None and img.initrd.name == "initramfs.cpio"
    assert "usr/bin/python3" in _cpio_names(img.initrd)
    assert not dataclasses.replace(inputs, kernel="debian").root_on_disk


@pytest.mark.timeout(10)
def test_the_image_hash_covers_the_early_init(inputs: Inputs) -> None:
    before = build.image_hash(inputs, "k", "b")
    inputs.early_init.write_text("#!/bin/busybox sh\necho changed\n")
    assert build.image_hash(inputs, "k", "b") != before


@pytest.mark.timeout(30)
def test_the_lookup_hashes_again_only_when_an_input_changes(
    tmp_path: Path, inputs: Inputs, calls: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    img = build_guest_image(cache, lambda s: None, inputs)
    hashed: list[Path] = []
    real = build._hash_file

    def counting(h: object, path: Path, name: str) -> None:
        hashed.append(path)
        real(h, path, name)  # type: ignore[arg-type]

    monkeypatch.setattr(build, "_hash_file", counting)
    assert cached_image(cache, inputs) == img
    hashed.clear()
    assert cached_image(cache, inputs) == img
    # nothing changed: no file of the image stage read (the kernel's small config is)
    assert hashed == [inputs.fragment]
    (inputs.agent_src / "main.py").write_text("def main(): return 2\n")
    assert cached_image(cache, inputs) is None  # another image, not built yet
    assert inputs.agent_src / "main.py" in hashed
