from __future__ import annotations

import lzma
from pathlib import Path

import pytest

from criv.errors import FailedPrecondition
from criv.guestimage.debian_kernel import extract_vmlinux, modinfo_depends, module_order


@pytest.mark.timeout(10)
def test_extract_vmlinux_finds_the_xz_payload() -> None:
    elf = b"\x7fELF" + b"kernel" * 100
    vmlinuz = b"MZ setup code" * 10 + lzma.compress(elf, format=lzma.FORMAT_XZ)
    assert extract_vmlinux(vmlinuz) == elf
    with pytest.raises(FailedPrecondition):
        extract_vmlinux(b"MZ no payload")


@pytest.mark.timeout(10)
def test_module_order_puts_dependencies_first(tmp_path: Path) -> None:
    def ko(name: str, deps: str) -> Path:
        p = tmp_path / f"{name}.ko"
        p.write_bytes(
            b"\x7fELF junk\0name=" + name.encode() + b"\0depends=" + deps.encode() + b"\0"
        )
        return p

    mods = {
        "virtio_pci": ko("virtio_pci", "virtio,virtio_ring"),
        "virtio": ko("virtio", ""),
        "virtio_ring": ko("virtio_ring", "virtio"),
        "9p": ko("9p", "9pnet"),
        "9pnet": ko("9pnet", ""),
    }
    assert modinfo_depends(mods["virtio_pci"].read_bytes()) == ["virtio", "virtio_ring"]
    order = module_order(mods, ("virtio_pci", "9p", "builtin_one"))
    assert order == ["virtio", "virtio_ring", "virtio_pci", "9pnet", "9p"]
