"""VM-image tests: the VM test disk (images/vm-test-disk/, built once per machine and
cached by content hash), and for the pod tests a real criv with the `vm-image` handler
(the vm suite's fixtures, tests/support/vm.py and tests/support/cri.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.cri import (  # noqa: F401  (fixtures)
    Cri,
    cni_overrides,
    config_for,
    cri_factory,
    no_cgroup_leaks,
    registry,
)
from tests.support.vm import (  # noqa: F401  (fixtures)
    libvirtd,
    template_dir,
    vm_config,
    vm_cri,
    vm_cri_factory,
)

ROOT = Path(__file__).resolve().parents[3]
BUILD = ROOT / "images" / "vm-test-disk" / "build.py"
COMMON_TOOLS = ("qemu-system-x86_64", "qemu-img", "mcopy", "mkfs.vfat", "sfdisk")
# what the UEFI variant needs beyond the tools: systemd-boot to put on its ESP (build.py)
# and OVMF to boot it (criv)
SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
OVMF_FILES = (Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), Path("/usr/share/OVMF/OVMF_VARS_4M.fd"))


def build_test_disk(firmware: str, tools: tuple[str, ...], files: tuple[Path, ...] = ()) -> Path:
    """images/vm-test-disk/build.py --firmware FIRMWARE (cached: at once when built), or
    a skip when a tool or file it needs is missing."""
    for tool in (*COMMON_TOOLS, *tools):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (make install)")
    for f in files:
        if not f.is_file():
            pytest.skip(f"{f} not found (make install)")
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, str(BUILD), "--firmware", firmware],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    if r.returncode != 0:
        pytest.fail(f"building the VM test disk ({firmware}) failed:\n{r.stderr[-3000:]}")
    print(f"[vm-test-disk] {firmware} {time.monotonic() - t0:.1f} s: {r.stdout.strip()}")
    return Path(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def test_disk() -> Path:
    """The BIOS test disk: MBR + syslinux, booted by SeaBIOS."""
    return build_test_disk("bios", ("syslinux",))


@pytest.fixture(scope="session")
def test_disk_uefi() -> Path:
    """The UEFI test disk: GPT, an EFI System Partition with systemd-boot, no BIOS boot
    code: it boots under OVMF only."""
    return build_test_disk("uefi", ("mmd",), (SYSTEMD_BOOT, *OVMF_FILES))
