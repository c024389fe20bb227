#!/usr/bin/env python3
"""Build (or find cached) the guest kernel + initramfs used by the vsock VM tests.

Output: a directory ``<cache>/vsock-<hash>/`` holding ``vmlinux`` (uncompressed, booted via
PVH: 2 s to /init under TCG instead of 5.7 s with the XZ vmlinuz) and ``initramfs.cpio``
(busybox-static, the virtio/vsock modules of Debian's 6.1 kernel and the static test program
from tests/vm/vsock/guest/).  The hash covers every input, so only the first run builds;
later runs print the cached directory at once.  Stale ``vsock-*`` builds are removed.

Needs: gcc (static libc: libc6-dev), busybox-static, apt-get (to download the kernel .deb),
the kernel's headers package (linux-headers-amd64; installed here if missing).
Usage: build.py [--cache DIR]   (prints the output directory on stdout)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from criv.guestimage import debian_kernel
from criv.guestimage.cpio import write_cpio

ROOT = Path(__file__).resolve().parents[2]
GUEST_SRC = ROOT / "tests" / "vm" / "vsock" / "guest" / "vsock-guest.c"
# a hostile-guest kernel module (ignores the host's vsock credit), built against the
# Debian kernel's headers; loaded last
OVERRUN_SRC = ROOT / "tests" / "vm" / "vsock" / "guest" / "overrun"
DEFAULT_CACHE = Path(os.environ.get("CRIV_TEST_CACHE", "/var/cache/criv-test"))
MODULES = (
    "virtio",
    "virtio_ring",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_console",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
)
INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for m in $(cat /modules.order); do insmod /lib/modules/$m.ko || echo "init: insmod $m failed"; done
echo "init: modules loaded"
exec /vsock-guest
"""


def kernel_package() -> str:
    """The Debian kernel package behind linux-image-amd64, unless CRIV_TEST_KERNEL_PKG says."""
    return os.environ.get("CRIV_TEST_KERNEL_PKG") or debian_kernel.kernel_package()


def kernel_release(deb: Path) -> str:
    """``linux-image-6.1.0-57-amd64-unsigned_….deb`` -> ``6.1.0-57-amd64``."""
    name = deb.name.split("_", 1)[0].removeprefix("linux-image-")
    return name.removesuffix("-unsigned")


def build_overrun_module(release: str, work: Path) -> Path:
    """criv_overrun.ko for ``release``; installs the matching headers package if missing."""
    kbuild = Path(f"/usr/src/linux-headers-{release}")
    if not kbuild.is_dir():
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends",
             f"linux-headers-{release}"],
            check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )  # fmt: skip
    src = work / "overrun"
    shutil.copytree(OVERRUN_SRC, src)
    subprocess.run(["make", "-s", "-C", str(kbuild), f"M={src}", "modules"], check=True)
    return src / "criv_overrun.ko"


def build(out: Path, deb: Path) -> None:
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "k")], check=True)
        vmlinuz = next((tmp / "k" / "boot").glob("vmlinuz-*"))
        vmlinux = debian_kernel.extract_vmlinux(vmlinuz.read_bytes())
        mods = {p.stem: p for p in (tmp / "k" / "lib" / "modules").rglob("*.ko")}
        order = debian_kernel.module_order(mods, MODULES)
        mods["criv_overrun"] = build_overrun_module(kernel_release(deb), tmp)
        order.append("criv_overrun")
        guest = tmp / "vsock-guest"
        subprocess.run(["gcc", "-static", "-O2", "-o", str(guest), str(GUEST_SRC)], check=True)
        root = tmp / "root"
        for d in ("bin", "dev", "proc", "sys", "tmp", "lib/modules"):
            (root / d).mkdir(parents=True)
        shutil.copyfile(debian_kernel.static_busybox(), root / "bin" / "busybox")
        (root / "init").write_text(INIT)
        shutil.copyfile(guest, root / "vsock-guest")
        for exe in ("bin/busybox", "init", "vsock-guest"):
            (root / exe).chmod(0o755)
        (root / "modules.order").write_text("\n".join(order) + "\n")
        for m in order:
            shutil.copyfile(mods[m], root / "lib" / "modules" / f"{m}.ko")
        stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=".build-"))
        stage.chmod(0o755)
        (stage / "vmlinux").write_bytes(vmlinux)
        with (stage / "initramfs.cpio").open("wb") as f:
            write_cpio(root, f)
        (stage / "vsock-guest").write_bytes(guest.read_bytes())
        try:
            stage.rename(out)
        except OSError:  # someone else finished first
            shutil.rmtree(stage, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = ap.parse_args()
    cache: Path = args.cache
    cache.mkdir(parents=True, exist_ok=True)
    deb = debian_kernel.fetch_deb(kernel_package(), cache / "debs")
    h = hashlib.sha256()
    parts = [Path(__file__).read_bytes(), GUEST_SRC.read_bytes(), deb.name.encode()]
    parts += [p.read_bytes() for p in sorted(OVERRUN_SRC.iterdir())]
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    h.update(hashlib.sha256(debian_kernel.static_busybox().read_bytes()).digest())
    out = cache / f"vsock-{h.hexdigest()[:16]}"
    if not (out / "initramfs.cpio").exists():
        print(f"building {out} (kernel {deb.name})", file=sys.stderr)
        for stale in cache.glob("vsock-*"):  # older inputs: ~75 MB each, never used again
            shutil.rmtree(stale, ignore_errors=True)
        build(out, deb)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
