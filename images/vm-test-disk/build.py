#!/usr/bin/env python3
"""Build (or find cached) criv's bootable VM test disk: a qcow2 that SeaBIOS boots.

Layout: an MBR disk (syslinux's mbr.bin, disk id 0x63726976) with
  1. a FAT boot partition: syslinux (installed with the mtools installer, no mount) and a
     bzImage of criv's guest kernel (the cached build tree of criv/guestimage/kernel.py,
     images/kernel/criv.config unchanged; `make bzImage` there takes ~20 s);
  2. an ext4 root (mkfs.ext4 -d, no mount): static busybox, dropbear + its libraries from
     this host's Debian packages, two small static helpers (isoread: NoCloud seed files
     from an ISO9660 disk, the kernel having no iso9660; acpiwait: the ACPI power button)
     and ./init (NoCloud seed -> hostname, eth0, authorized key, host key on the console).

Cache: ``<cache>/disk-<hash>/disk.qcow2`` (+ manifest.json), the hash covering every input
(these files, the kernel's config hash, the binaries copied in); ``<cache>/kernel-<khash>/``
holds the bzImage. Default cache /var/lib/criv/cache/vm-test-disk (CRIV_VM_TEST_DISK_CACHE).

Needs (Debian): syslinux syslinux-common mtools dosfstools fdisk e2fsprogs dropbear-bin
busybox-static gcc libc6-dev qemu-utils, and linux-source-6.1 (when the kernel is not built).
Usage: build.py [--cache DIR] [--push REF [--insecure]]
  prints the disk path on stdout (progress on stderr); --push also pushes the disk to REF as
  a containerDisk image (/disk/criv-test.qcow2, 107:107 0440) with skopeo
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from criv.guestimage import build as gi_build
from criv.guestimage import debian_kernel, kernel

HERE = Path(__file__).resolve().parent
BUILDER_VERSION = "1"
DEFAULT_CACHE = Path(os.environ.get("CRIV_VM_TEST_DISK_CACHE", "/var/lib/criv/cache/vm-test-disk"))
GUEST_IMAGE_CACHE = Path(os.environ.get("CRIV_GUEST_IMAGE_CACHE", str(gi_build.DEFAULT_CACHE_ROOT)))
INPUT_FILES = ("build.py", "init", "isoread.c", "acpiwait.c", "syslinux.cfg")
DROPBEAR = (Path("/usr/sbin/dropbear"), Path("/usr/bin/dropbearkey"))
MBR_CANDIDATES = (Path("/usr/lib/syslinux/mbr/mbr.bin"), Path("/usr/lib/SYSLINUX/mbr.bin"))
DISK_ID = "0x63726976"  # "criv"; the kernel finds its root as PARTUUID=63726976-02
BOOT_MIB, ROOT_MIB = 16, 240


def log(msg: str) -> None:
    print(f"vm-test-disk: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw: object) -> None:
    subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload]


def mbr_bin() -> Path:
    for p in MBR_CANDIDATES:
        if p.is_file():
            return p
    raise SystemExit("syslinux's mbr.bin not found: apt-get install syslinux-common")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def kernel_bzimage(cache: Path) -> tuple[Path, str]:
    """criv's guest kernel as a bzImage (SeaBIOS + syslinux boot it; PVH vmlinux they cannot)."""
    inputs = gi_build.Inputs.default()
    version = kernel.source_version()
    khash = gi_build.kernel_hash(inputs, version)
    out = cache / f"kernel-{khash}" / "bzImage"
    if out.is_file():
        return out, khash
    # the build tree is the guest image's (criv image build): hold its lock while using it
    with gi_build._locked(GUEST_IMAGE_CACHE):
        vmlinux = gi_build._ensure_kernel(GUEST_IMAGE_CACHE, inputs, log)
        work = GUEST_IMAGE_CACHE / "work"
        tree = work / f"kernel-{version}"
        built = tree / "build" / "vmlinux"
        if not built.is_file() or sha(built) != sha(vmlinux):
            log("kernel build tree holds another config: rebuilding it for criv.config")
            with tempfile.TemporaryDirectory() as td:
                kernel.build_kernel(work, inputs.fragment, Path(td) / "vmlinux", log)
        log("kernel: make bzImage in the cached build tree")
        env = {**os.environ, **kernel.KBUILD_ENV}
        n = str(os.cpu_count() or 1)
        with (tree / "bzimage.log").open("wb") as f:
            subprocess.run(
                ["nice", "-n", "19", "make", "O=../build", f"-j{n}", "bzImage"],
                cwd=tree / "linux-source-6.1", env=env, stdout=f, stderr=subprocess.STDOUT,
                check=True,
            )  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(".bzImage.partial")
        shutil.copyfile(tree / "build" / "arch/x86/boot/bzImage", tmp)
        tmp.rename(out)
    return out, khash


def libraries(exe: Path) -> list[Path]:
    out = subprocess.run(["ldd", str(exe)], capture_output=True, text=True, check=True).stdout
    return [Path(m) for m in re.findall(r"(/\S+\.so[.\d]*)", out)]


def disk_hash(khash: str) -> str:
    h = hashlib.sha256(f"criv-vm-test-disk {BUILDER_VERSION} {khash}\n".encode())
    for name in INPUT_FILES:
        h.update(f"{name} {sha(HERE / name)}\n".encode())
    for p in (debian_kernel.static_busybox(), *DROPBEAR, mbr_bin()):
        h.update(f"{p} {sha(p)}\n".encode())
    return h.hexdigest()[:16]


def assemble_root(root: Path, tmp: Path) -> None:
    for d in ("bin", "dev", "proc", "sys", "tmp", "run", "root", "etc/dropbear", "home",
              "var/lib", "lib/x86_64-linux-gnu", "lib64", "usr"):  # fmt: skip
        (root / d).mkdir(parents=True, exist_ok=True)
    for link, target in (("sbin", "bin"), ("usr/bin", "../bin"), ("usr/sbin", "../bin")):
        (root / link).symlink_to(target)
    busybox = debian_kernel.static_busybox()
    shutil.copy2(busybox, root / "bin/busybox")
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True)
    for name in applets.stdout.split():
        if name not in ("busybox", "init") and not (root / "bin" / name).exists():
            (root / "bin" / name).symlink_to("busybox")
    for exe in DROPBEAR:
        shutil.copy2(exe, root / "bin" / exe.name)
        for lib in libraries(exe):
            dest = root / lib.relative_to("/")
            if lib.name.startswith("ld-linux"):
                dest = root / "lib64" / lib.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.exists():
                shutil.copy2(lib.resolve(), dest)
    for prog in ("isoread", "acpiwait"):
        run(
            ["gcc", "-static", "-Os", "-s", "-o", str(root / "bin" / prog), str(HERE / f"{prog}.c")]
        )
    shutil.copyfile(HERE / "init", root / "init")
    (root / "init").chmod(0o755)
    etc = root / "etc"
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (etc / "group").write_text("root:x:0:\ntty:x:5:\n")
    (etc / "shadow").write_text("root:*:1::::::\n")
    (etc / "shadow").chmod(0o600)
    (etc / "shells").write_text("/bin/sh\n")
    (root / "root").chmod(0o700)
    (root / "tmp").chmod(0o1777)


def build_disk(out_dir: Path, bzimage: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="criv-vm-test-disk-") as td:
        tmp = Path(td)
        root = tmp / "root"
        assemble_root(root, tmp)
        boot = tmp / "boot.img"
        boot_sectors, root_sectors = BOOT_MIB * 2048, ROOT_MIB * 2048
        run(["mkfs.vfat", "-C", "-n", "CRIVBOOT", "-h", "2048", str(boot), str(BOOT_MIB * 1024)],
            stdout=subprocess.DEVNULL)  # fmt: skip
        run(["syslinux", "--install", str(boot)])
        run(["mcopy", "-i", str(boot), str(bzimage), str(HERE / "syslinux.cfg"), "::/"])
        rootimg = tmp / "root.img"
        run(["mkfs.ext4", "-q", "-F", "-L", "criv-root", "-d", str(root), "-O", "^orphan_file",
             str(rootimg), f"{ROOT_MIB}M"])  # fmt: skip
        raw = tmp / "disk.raw"
        with raw.open("wb") as f:
            f.truncate((2048 + boot_sectors + root_sectors) * 512)
        table = (
            f"label: dos\nlabel-id: {DISK_ID}\n"
            f"start=2048, size={boot_sectors}, type=c, bootable\n"
            f"start={2048 + boot_sectors}, size={root_sectors}, type=83\n"
        )
        run(["sfdisk", "-q", str(raw)], input=table.encode())
        with raw.open("r+b") as f:
            f.write(mbr_bin().read_bytes()[:440])
            for part, start in ((boot, 2048), (rootimg, 2048 + boot_sectors)):
                f.seek(start * 512)
                with part.open("rb") as src:
                    shutil.copyfileobj(src, f, 1 << 20)
        stage = Path(tempfile.mkdtemp(prefix=".disk-", dir=out_dir.parent))
        try:
            run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw),
                 str(stage / "disk.qcow2")])  # fmt: skip
            (stage / "disk.qcow2").chmod(0o444)
            manifest = {"builder": BUILDER_VERSION, "boot_mib": BOOT_MIB, "root_mib": ROOT_MIB}
            (stage / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            stage.chmod(0o755)
            stage.rename(out_dir)
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def ensure_disk(cache: Path = DEFAULT_CACHE) -> Path:
    """The test disk for the current inputs, built when missing; returns disk.qcow2's path."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        bzimage, khash = kernel_bzimage(cache)
        out = cache / f"disk-{disk_hash(khash)}"
        if not (out / "disk.qcow2").is_file():
            t0 = time.monotonic()
            log(f"building {out}")
            build_disk(out, bzimage)
            log(f"built in {time.monotonic() - t0:.1f} s")
        return out / "disk.qcow2"


def push(disk: Path, ref: str, insecure: bool) -> None:
    """Push ``disk`` to ``ref`` as a containerDisk image (/disk/criv-test.qcow2; skopeo)."""
    from criv.vmimage.cli import push_layout
    from criv.vmimage.containerdisk import write_layout

    with tempfile.TemporaryDirectory(prefix="criv-vm-test-disk-push-") as td:
        tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else "latest"
        layout = write_layout(disk, Path(td) / "layout", tag=tag, name="criv-test")
        push_layout(layout, ref, tls_verify=not insecure)
    log(f"pushed {ref}")


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--push", metavar="REF", help="also push it as a containerDisk image REF")
    ap.add_argument("--insecure", action="store_true", help="with --push: plain HTTP registry")
    args = ap.parse_args()
    disk = ensure_disk(args.cache)
    if args.push:
        push(disk, args.push, args.insecure)
    print(disk)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
