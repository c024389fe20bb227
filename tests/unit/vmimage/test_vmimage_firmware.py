"""Which firmware a vm-image disk boots with (criv.vmimage.firmware): partition tables
made by sfdisk, as real tools write them, and hostile ones made by hand."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from criv.errors import InvalidArgument
from criv.vmimage import firmware
from criv.vmimage.firmware import ESP_GUID, HEAD_BYTES, choose, detect, read_head, requested

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(shutil.which("sfdisk") is None, reason="sfdisk (fdisk) not installed"),
]

ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"


def _disk(tmp: Path, table: str, boot_code: bool = False, name: str = "d.raw") -> Path:
    raw = tmp / name
    with raw.open("wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["sfdisk", "-q", str(raw)], input=table.encode(), check=True)
    if boot_code:
        with raw.open("r+b") as f:
            f.write(b"\xfa\x31\xc0" + b"\x90" * 437)  # cli; xor ax,ax; nops: some code
    return raw


def _head(p: Path) -> bytes:
    return p.read_bytes()[:HEAD_BYTES]


GPT_ESP = f"label: gpt\nsize=16M, type={ESP}\ntype={LINUX}\n"


def test_tables_real_tools_write(tmp_path: Path) -> None:
    uefi = detect(_head(_disk(tmp_path, GPT_ESP)))
    assert uefi.firmware == "uefi" and "GPT" in uefi.why
    # GRUB's BIOS core in a BIOS boot partition beside the ESP (a hybrid cloud image)
    hybrid = f"label: gpt\nsize=1M, type={BIOS_BOOT}\nsize=16M, type={ESP}\ntype={LINUX}\n"
    assert detect(_head(_disk(tmp_path, hybrid, boot_code=True))).firmware == "bios"
    # an ESP and boot code in the protective MBR: a BIOS can start it
    assert detect(_head(_disk(tmp_path, GPT_ESP, boot_code=True))).firmware == "bios"
    # the BIOS test disk's layout: MBR, FAT boot partition, boot code
    mbr = "label: dos\nsize=16M, type=c, bootable\ntype=83\n"
    assert detect(_head(_disk(tmp_path, mbr, boot_code=True))).firmware == "bios"
    # an MBR disk whose ESP (type 0xEF) is all there is: UEFI
    mbr_esp = "label: dos\nsize=16M, type=ef\ntype=83\n"
    assert detect(_head(_disk(tmp_path, mbr_esp))).firmware == "uefi"
    # a GPT disk with no ESP (a data disk, or a BIOS-only one)
    assert detect(_head(_disk(tmp_path, f"label: gpt\ntype={LINUX}\n"))).firmware == "bios"


def _gpt_head(entries_lba: int, count: int, esize: int, esp_at: int = 2) -> bytes:
    head = bytearray(HEAD_BYTES)
    head[446 + 4] = 0xEE
    head[510:512] = b"\x55\xaa"
    hdr = struct.pack("<8sIIIIQQQQ16sQII", b"EFI PART", 0x10000, 92, 0, 0, 1, 0, 34, 0,
                      b"\0" * 16, entries_lba, count, esize)  # fmt: skip
    head[512 : 512 + len(hdr)] = hdr
    head[esp_at * 512 : esp_at * 512 + 16] = ESP_GUID.bytes_le
    return bytes(head)


# (entries LBA, count, entry size, what it reads as): out-of-range offsets, counts and
# sizes neither crash nor read past the head; where entry 0 is still in it, it counts
HOSTILE_GPT = [
    (1 << 60, 128, 128, "bios"),
    (0, 128, 128, "bios"),  # the entries would overlap the MBR and the header
    (33, 128, 128, "bios"),  # the ESP is at LBA 2, entry 0 at LBA 33 is empty
    (2, 128, 0, "bios"),
    (2, 128, 7, "bios"),
    (2, 1 << 31, 128, "uefi"),
    (2, 128, 1 << 31, "uefi"),
]


@pytest.mark.parametrize(("entries_lba", "count", "esize", "want"), HOSTILE_GPT)
def test_hostile_gpt_headers_do_not_crash_or_read_past_the_head(
    entries_lba: int, count: int, esize: int, want: str
) -> None:
    assert detect(_gpt_head(entries_lba, count, esize)).firmware == want


def test_a_sane_handmade_gpt_and_short_or_empty_heads() -> None:
    assert detect(_gpt_head(2, 128, 128)).firmware == "uefi"
    for head in (b"", b"\0" * 100, b"\0" * HEAD_BYTES, _gpt_head(2, 128, 128)[:600]):
        assert detect(head).firmware == "bios"


def test_the_annotation_overrides() -> None:
    assert requested({}) is None
    assert requested({firmware.FIRMWARE_ANNOTATION: "auto"}) is None
    assert requested({firmware.FIRMWARE_ANNOTATION: "uefi"}) == "uefi"
    assert requested({firmware.FIRMWARE_ANNOTATION: "bios"}) == "bios"
    with pytest.raises(InvalidArgument, match="auto, bios or uefi"):
        requested({firmware.FIRMWARE_ANNOTATION: "efi"})


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
async def test_read_head_never_follows_a_backing_file(tmp_path: Path) -> None:
    gpt = _disk(tmp_path, GPT_ESP, name="gpt.raw")
    assert (await choose(gpt, "raw", {})).firmware == "uefi"
    qcow = tmp_path / "gpt.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(gpt), str(qcow)], check=True)
    assert await read_head(qcow, "qcow2") == _head(gpt)
    # a qcow2 whose header names another file as its backing: criv reads zeros, not it
    sneaky = tmp_path / "sneaky.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(gpt),
                    str(sneaky)], check=True)  # fmt: skip
    assert await read_head(sneaky, "qcow2") == b"\0" * HEAD_BYTES
    assert (await choose(sneaky, "qcow2", {})).firmware == "bios"
    assert (await choose(sneaky, "qcow2", {firmware.FIRMWARE_ANNOTATION: "uefi"})).why
