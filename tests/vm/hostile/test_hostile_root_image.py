"""Guest root against the guest root image (docs/security.md: the root image is read-only to
every guest).

The image is one host file that every pod VM maps through its virtio-pmem device. Guest root
overwrites the start of that device (the erofs superblock included) with random bytes; the
host's file does not change, the guest reads the image's own bytes back from the device, the
pod still answers, and a pod started after it boots from the same image."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from tests.support.cri import Cri
from tests.support.vm import GUEST_ROOT, PRIVILEGED_POD

pytestmark = pytest.mark.vm

HEAD = 256 << 10  # what the guest overwrites: the image's first 256 KiB


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _in_guest(cri: Cri, cid: str, script: str) -> str:
    r = cri.exec(cid, ["nsenter", "-t", "1", "-m", "--", "sh", "-c", script], timeout=120)
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return r.stdout.decode()


@pytest.mark.timeout(600)
def test_guest_root_cannot_change_the_root_image(vm_cri: Cri, vm_config: dict[str, Any]) -> None:
    image = Path(vm_config["vm"]["root_disk"])
    before = _sha256(image.read_bytes())
    head = _sha256(image.read_bytes()[:HEAD])

    pod = vm_cri.run_pod("writer", linux=PRIVILEGED_POD)
    cid = vm_cri.run(pod, "root", ["sleep", "3600"], security=GUEST_ROOT)
    # the root is erofs on this device, mounted with DAX (the mount itself stayed in the
    # initramfs: /proc/mounts does not show it)
    root = _in_guest(vm_cri, cid, "ls -d /sys/fs/erofs/pmem0; dmesg | grep -c 'erofs.*DAX enabled'")
    assert root.split() == ["/sys/fs/erofs/pmem0", "1"], root
    count = HEAD // 4096
    # the guest marks the device read-only; its root undoes that, then writes with direct
    # I/O, straight into the device's memory (not the guest's page cache). dd's own status
    # does not matter: QEMU drops the writes, it does not refuse them. No fsync: a clone's
    # pmem queue answers no flush (docs/vm.md), which would hang only this guest's dd.
    _in_guest(vm_cri, cid, "blockdev --getro /dev/pmem0 | grep -qx 1")
    _in_guest(
        vm_cri, cid,
        f"blockdev --setrw /dev/pmem0 && dd if=/dev/urandom of=/dev/pmem0 bs=4096"
        f" count={count} oflag=direct 2>/dev/null; echo 3 > /proc/sys/vm/drop_caches",
    )  # fmt: skip
    got = _in_guest(
        vm_cri, cid, f"dd if=/dev/pmem0 bs=4096 count={count} iflag=direct 2>/dev/null | sha256sum"
    )
    assert got.split()[0] == head  # the guest reads the image's bytes, not its own
    assert _sha256(image.read_bytes()) == before  # the host's file is untouched
    assert _in_guest(vm_cri, cid, "echo alive").strip() == "alive"

    later = vm_cri.run_pod("later")
    cid2 = vm_cri.run(later, "c", ["sleep", "3600"])
    r = vm_cri.exec(cid2, ["true"], timeout=60)
    assert r.exit_code == 0
