"""Boot the built guest kernel + initramfs with plain QEMU (TCG) and see init run."""

from __future__ import annotations

import os
import select
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from criv.guestimage import DEFAULT_CACHE_ROOT, GuestImage, Inputs, build_guest_image
from criv.hypervisor.spec import ROOT_DISK_CMDLINE, root_disk_qemu_args

pytestmark = pytest.mark.vm


def boot(image: GuestImage, mode: str, timeout: float = 90.0) -> tuple[str, dict[str, float]]:
    """Run the guest in ``criv.test=<mode>``; (console output, marker -> seconds since start)."""
    cmd = [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-machine",
        "q35",
        "-cpu",
        "max",
        "-m",
        "256",
        "-nographic",
        "-no-reboot",
        "-device",
        "virtio-rng-pci",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initrd),
        "-append",
        f"console=ttyS0 quiet panic=-1 reboot=t criv.test={mode}"
        + (f" {ROOT_DISK_CMDLINE}" if image.root_disk else ""),
    ]
    if image.root_disk is not None:
        cmd += root_disk_qemu_args(image.root_disk, 256)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    out = b""
    times: dict[str, float] = {}
    try:
        while time.monotonic() - t0 < timeout:
            if select.select([proc.stdout], [], [], 0.05)[0]:
                chunk = proc.stdout.read() or b""
                out += chunk
                for marker in (b"CRIV-GUEST-MARKER", b"CRIV-GUEST-PYTHON", b"CRIV-GUEST-DONE"):
                    if marker in out and marker.decode() not in times:
                        times[marker.decode()] = time.monotonic() - t0
                if not chunk and proc.poll() is not None:
                    break
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
    times["exit"] = time.monotonic() - t0
    return out.decode(errors="replace"), times


@pytest.mark.timeout(2400)  # the first run on a machine builds the kernel (~10-15 min)
def test_guest_reaches_init_and_runs_python(guest_image: GuestImage) -> None:
    out, times = boot(guest_image, "python")
    print(f"boot timings (s since QEMU start): {times}")
    assert "CRIV-GUEST-MARKER init reached" in out, out[-3000:]
    assert f"CRIV-GUEST-UNAME {guest_image.kernel_release}" in out
    assert "CRIV-GUEST-PYTHON grpc 1.85.3 protobuf 7.36.2" in out, out[-3000:]
    # the root is the image's erofs on its read-only pmem device, mapped with DAX, and the
    # guest cannot change it
    assert "CRIV-GUEST-ROOT erofs /dev/pmem0" in [ln.strip() for ln in out.splitlines()], out
    assert "CRIV-GUEST-ROOT-DISK read-only" in out, out[-3000:]
    assert "CRIV-GUEST-ROOT-DAX on" in out, out[-3000:]
    assert "CRIV-GUEST-DONE" in out
    assert "Kernel panic" not in out
    assert "reboot: Power down" in out or times["exit"] < 90  # powered itself off


@pytest.mark.timeout(600)
def test_root_in_an_lz4_initramfs_boots(guest_image: GuestImage) -> None:
    cache = Path(os.environ.get("CRIV_GUEST_IMAGE_CACHE", str(DEFAULT_CACHE_ROOT)))
    inputs = replace(Inputs.default(), compress=True, root="initramfs")
    lz4 = build_guest_image(cache, lambda s: None, inputs)
    assert lz4.initrd.suffix == ".lz4" and lz4.kernel_release == guest_image.kernel_release
    assert lz4.root_disk is None
    out, times = boot(lz4, "boot")
    print(f"lz4 boot timings: {times}")
    assert "CRIV-GUEST-MARKER init reached" in out, out[-3000:]
    assert "CRIV-GUEST-ROOT initramfs" in out


@pytest.mark.timeout(900)
def test_debian_kernel_fallback_boots(guest_image: GuestImage) -> None:
    cache = Path(os.environ.get("CRIV_GUEST_IMAGE_CACHE", str(DEFAULT_CACHE_ROOT)))
    deb = build_guest_image(cache, lambda s: None, replace(Inputs.default(), kernel="debian"))
    assert deb.initrd.suffix == ".lz4"  # a plain cpio does not unpack in 256 MiB with it
    out, times = boot(deb, "python", timeout=120)
    print(f"Debian kernel boot timings: {times}")
    assert "CRIV-GUEST-MARKER init reached" in out, out[-3000:]
    assert "-amd64" in out.split("CRIV-GUEST-UNAME", 1)[1].splitlines()[0]
    assert "CRIV-GUEST-PYTHON grpc 1.85.3" in out, out[-3000:]
    assert "insmod" not in out  # every module loaded
