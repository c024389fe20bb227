"""Which firmware boots a vm-image disk: SeaBIOS (BIOS) or OVMF (UEFI).

A disk needs UEFI when it has an EFI System Partition and nothing a BIOS could start:
no boot code in the MBR's first 440 bytes (a GPT disk's protective MBR made by a UEFI-only
tool leaves it zero) and no GPT "BIOS boot" partition (where GRUB keeps its BIOS core).
A hybrid disk (both, as most cloud images are) boots with SeaBIOS, which starts faster;
the ``criv.dev/firmware`` annotation (``bios``, ``uefi``, default ``auto``) overrides.

The disk is hostile input (a registry's, or a committed overlay a guest wrote): only its
first :data:`HEAD_SECTORS` sectors are read, through ``qemu-img dd`` with the image's
backing pinned to none, and the tables are parsed with every offset and count bounded by
what was read.
"""

from __future__ import annotations

import asyncio
import struct
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from criv.commands import run_command
from criv.errors import FailedPrecondition, InvalidArgument
from criv.vmimage.qcow2 import pinned_image

Firmware = Literal["bios", "uefi"]
FIRMWARE_ANNOTATION = "criv.dev/firmware"
SECTOR = 512
# the MBR, the GPT header and the usual 128 x 128-byte partition array (LBA 2..33)
HEAD_SECTORS = 34
HEAD_BYTES = HEAD_SECTORS * SECTOR
MBR_CODE = 440
ESP_MBR_TYPE = 0xEF
GPT_PROTECTIVE_TYPE = 0xEE
ESP_GUID = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
BIOS_BOOT_GUID = uuid.UUID("21686148-6449-6e6f-744e-656564454649")
_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQII")  # through the partition entry size


@dataclass(frozen=True)
class FirmwareChoice:
    firmware: Firmware
    why: str


def _mbr_types(head: bytes) -> list[int]:
    if len(head) < SECTOR or head[510:512] != b"\x55\xaa":
        return []
    return [head[446 + 16 * i + 4] for i in range(4) if head[446 + 16 * i + 4]]


def _gpt_types(head: bytes) -> list[uuid.UUID]:
    """The partition type GUIDs of the GPT at LBA 1, as far as ``head`` holds them."""
    if len(head) < 2 * SECTOR:
        return []
    (sig, _rev, hsize, _crc, _res, _cur, _alt, _first, _last, _guid, entries_lba, count,
     esize) = _GPT_HEADER.unpack_from(head, SECTOR)  # fmt: skip
    if sig != b"EFI PART" or hsize < _GPT_HEADER.size or esize < 128 or esize % 8:
        return []
    types = []
    for i in range(min(count, 256)):
        off = entries_lba * SECTOR + i * esize
        if off < 2 * SECTOR or off + 16 > len(head):
            break
        raw = head[off : off + 16]
        if any(raw):
            types.append(uuid.UUID(bytes_le=raw))
    return types


def detect(head: bytes) -> FirmwareChoice:
    """The firmware the disk whose first sectors are ``head`` needs."""
    mbr = _mbr_types(head)
    boot_code = any(head[:MBR_CODE])
    if GPT_PROTECTIVE_TYPE in mbr:
        gpt = _gpt_types(head)
        esp, bios_boot = ESP_GUID in gpt, BIOS_BOOT_GUID in gpt
        table = "GPT"
    else:
        esp, bios_boot, table = ESP_MBR_TYPE in mbr, False, "MBR"
    if esp and not boot_code and not bios_boot:
        return FirmwareChoice(
            "uefi", f"{table} disk with an EFI system partition, no BIOS boot code"
        )
    if esp:
        return FirmwareChoice("bios", f"{table} disk bootable by BIOS and UEFI")
    return FirmwareChoice("bios", f"{table} disk with no EFI system partition")


def requested(annotations: dict[str, str]) -> Firmware | None:
    """What the ``criv.dev/firmware`` annotation asks for (None: detect)."""
    v = annotations.get(FIRMWARE_ANNOTATION, "auto")
    if v == "auto":
        return None
    if v in ("bios", "uefi"):
        return "uefi" if v == "uefi" else "bios"
    raise InvalidArgument(f"annotation {FIRMWARE_ANNOTATION}={v[:40]!r}: use auto, bios or uefi")


async def read_head(path: Path, fmt: str) -> bytes:
    """The disk's first :data:`HEAD_BYTES` bytes as the guest sees them."""
    with tempfile.TemporaryDirectory(prefix="criv-disk-head-") as tmp:
        out = Path(tmp) / "head"
        rc, msg = await run_command(
            "qemu-img", "dd", f"if={pinned_image(path, fmt)}", f"of={out}", f"bs={SECTOR}",
            f"count={HEAD_SECTORS}",
        )  # fmt: skip
        if rc != 0:
            raise FailedPrecondition(f"cannot read the disk's partition table: {msg[-300:]}")
        return await asyncio.to_thread(_read_bounded, out)


def _read_bounded(p: Path) -> bytes:
    with p.open("rb") as f:
        return f.read(HEAD_BYTES)


async def choose(path: Path, fmt: str, annotations: dict[str, str]) -> FirmwareChoice:
    """The annotation's firmware, else what the disk needs."""
    asked = requested(annotations)
    if asked is not None:
        return FirmwareChoice(asked, f"annotation {FIRMWARE_ANNOTATION}={asked}")
    return detect(await read_head(path, fmt))
