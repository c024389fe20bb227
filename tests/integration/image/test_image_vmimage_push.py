"""The VM test disk pushed to the loopback registry as a containerDisk image
(`images/vm-test-disk/build.py --push`), pulled back by criv's image store, and its
disk found in the unpacked layer, byte for byte the built one."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from criv.config import Config, RegistriesConfig
from criv.image.manager import ImageManager
from criv.vmimage.containerdisk import disk_format, find_disk
from tests.support.fixtures import TestRegistry

pytestmark = pytest.mark.integration

BUILD = Path(__file__).resolve().parents[3] / "images" / "vm-test-disk" / "build.py"


async def test_push_then_pull_finds_the_disk(tmp_path: Path, registry: TestRegistry) -> None:
    for tool in ("skopeo", "syslinux", "mcopy", "mkfs.vfat", "sfdisk", "qemu-img"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (make install)")
    ref = registry.ref("vm/criv-test-disk", "v1")
    r = subprocess.run(
        [sys.executable, str(BUILD), "--push", ref, "--insecure"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    built = Path(r.stdout.strip().splitlines()[-1])
    cfg = Config(
        state_dir=str(tmp_path / "state"),
        registries=RegistriesConfig(insecure=[registry.host]),
    )
    m = ImageManager(cfg)
    await m.start()
    try:
        await m.pull(ref)
        img = m.get(ref)
        disk = find_disk(img.layer_dirs, ref)
        assert disk.name == "criv-test.qcow2"
        assert disk_format(disk) == "qcow2"
        st = disk.lstat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (107, 107, 0o440)
        assert disk.read_bytes() == built.read_bytes()
    finally:
        await m.close()
