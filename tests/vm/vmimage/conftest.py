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


@pytest.fixture(scope="session")
def test_disk() -> Path:
    for tool in ("qemu-system-x86_64", "qemu-img", "syslinux", "mcopy", "mkfs.vfat", "sfdisk"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (make install)")
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, str(BUILD)], capture_output=True, text=True, timeout=900, check=False
    )
    if r.returncode != 0:
        pytest.fail(f"building the VM test disk failed:\n{r.stderr[-3000:]}")
    print(f"[vm-test-disk] {time.monotonic() - t0:.1f} s: {r.stdout.strip()}")
    return Path(r.stdout.strip().splitlines()[-1])
