#!/usr/bin/env python3
"""Build (or find cached) criv's bootable VM test disk: a qcow2 that SeaBIOS (or OVMF) boots.

Two variants sharing one root and one code path (``--firmware``):
  bios (default): an MBR disk (syslinux's mbr.bin, disk id 0x63726976) whose partition 1
    is a FAT boot partition: syslinux (installed with the mtools installer, no mount),
    syslinux.cfg and a bzImage of criv's guest kernel (the cached build tree of
    criv/guestimage/kernel.py, images/kernel/criv.config unchanged; `make bzImage` there
    takes ~20 s);
  uefi: a GPT disk (fixed disk and partition GUIDs, a protective MBR with no boot code, no
    BIOS-boot partition: it needs UEFI) whose partition 1 is an EFI System Partition (FAT,
    written with mtools): systemd-boot (Debian's systemd-boot-efi) as
    /EFI/BOOT/BOOTX64.EFI, /loader/loader.conf, /loader/entries/criv.conf and the same
    bzImage, started through its EFI stub;
  partition 2 of both: an ext4 root (mkfs.ext4 -d, no mount): static busybox, dropbear +
    its libraries from this host's Debian packages, two small static helpers (isoread:
    NoCloud seed files from an ISO9660 disk, the kernel having no iso9660; acpiwait: the
    ACPI power button) and ./init (NoCloud seed -> hostname, eth0, authorized key, host key
    on the console). The kernel finds it as root=PARTUUID=<the partition's id>.

Cache: ``<cache>/disk-<hash>/disk.qcow2`` (bios) or ``<cache>/disk-uefi-<hash>/disk.qcow2``
(uefi), + manifest.json, the hash covering every input (these files, the firmware variant,
the kernel's config hash, the binaries copied in); ``<cache>/kernel-<khash>/`` holds the
bzImage. Default cache /var/lib/criv/cache/vm-test-disk (CRIV_VM_TEST_DISK_CACHE).

Needs (Debian): mtools dosfstools fdisk e2fsprogs dropbear-bin busybox-static gcc libc6-dev
qemu-utils, syslinux syslinux-common (bios) or systemd-boot-efi (uefi), and
linux-source-6.1 (when the kernel is not built). Booting the uefi disk needs ovmf.
Usage: build.py [--firmware bios|uefi] [--cache DIR] [--push REF [--insecure]]
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
SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
FIRMWARES = ("bios", "uefi")
DISK_ID = "0x63726976"  # "criv"; the kernel finds its root as PARTUUID=63726976-02
# uefi: fixed GUIDs ("criv" again), the root found as root=PARTUUID=<GPT_ROOT_UUID>
GPT_DISK_ID = "63726976-0000-4000-8000-000000000000"
GPT_ESP_UUID = "63726976-0000-4000-8000-000000000001"
GPT_ROOT_UUID = "63726976-0000-4000-8000-000000000002"
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_FS_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
BOOT_MIB, ROOT_MIB = 16, 240
START = 2048  # sectors: partition 1 at 1 MiB; a GPT disk keeps 1 MiB at the end too


def log(msg: str) -> None:
    print(f"vm-test-disk: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw: object) -> None:
    subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload]


def mbr_bin() -> Path:
    for p in MBR_CANDIDATES:
        if p.is_file():
            return p
    raise SystemExit("syslinux's mbr.bin not found: apt-get install syslinux-common")


def systemd_boot() -> Path:
    if SYSTEMD_BOOT.is_file():
        return SYSTEMD_BOOT
    raise SystemExit(f"{SYSTEMD_BOOT} not found: apt-get install systemd-boot-efi")


def boot_binaries(firmware: str) -> tuple[Path, ...]:
    """What the variant's boot code is made of (outside this directory, so hashed)."""
    return (mbr_bin(),) if firmware == "bios" else (systemd_boot(),)


def kernel_options() -> str:
    """The kernel command line, syslinux.cfg's APPEND with the variant's root swapped in
    (one command line for both; only `root=` differs)."""
    cfg = (HERE / "syslinux.cfg").read_text()
    m = re.search(r"^\s*APPEND\s+root=PARTUUID=\S+\s+(.*)$", cfg, re.M)
    if m is None:
        raise SystemExit("syslinux.cfg: no `APPEND root=PARTUUID=... OPTIONS` line")
    return f"root=PARTUUID={GPT_ROOT_UUID} {m.group(1).strip()}"


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


def disk_hash(khash: str, firmware: str = "bios") -> str:
    h = hashlib.sha256(f"criv-vm-test-disk {BUILDER_VERSION} {khash}\n".encode())
    if firmware != "bios":  # bios: the same formula as before there were variants
        h.update(f"firmware {firmware}\n".encode())
    for name in INPUT_FILES:
        h.update(f"{name} {sha(HERE / name)}\n".encode())
    for p in (debian_kernel.static_busybox(), *DROPBEAR, *boot_binaries(firmware)):
        h.update(f"{p} {sha(p)}\n".encode())
    return h.hexdigest()[:16]


def disk_dir(cache: Path, khash: str, firmware: str) -> Path:
    prefix = "disk-" if firmware == "bios" else f"disk-{firmware}-"
    return cache / f"{prefix}{disk_hash(khash, firmware)}"


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


def boot_fs(img: Path, firmware: str, bzimage: Path, tmp: Path) -> None:
    """Partition 1: FAT, written with mtools. bios: syslinux + syslinux.cfg + bzImage;
    uefi (an EFI System Partition): systemd-boot as the removable-media default loader,
    its loader.conf and one entry booting the bzImage through its EFI stub."""
    label = "CRIVBOOT" if firmware == "bios" else "CRIVESP"
    run(["mkfs.vfat", "-C", "-n", label, "-h", str(START), str(img), str(BOOT_MIB * 1024)],
        stdout=subprocess.DEVNULL)  # fmt: skip
    if firmware == "bios":
        run(["syslinux", "--install", str(img)])
        run(["mcopy", "-i", str(img), str(bzimage), str(HERE / "syslinux.cfg"), "::/"])
        return
    conf = tmp / "esp"
    conf.mkdir()
    (conf / "loader.conf").write_text("timeout 0\ndefault criv.conf\neditor no\n")
    (conf / "criv.conf").write_text(
        f"title criv test disk\nlinux /bzImage\noptions {kernel_options()}\n"
    )
    run(["mmd", "-i", str(img), "::/EFI", "::/EFI/BOOT", "::/loader", "::/loader/entries"])
    for src, dest in (
        (systemd_boot(), "::/EFI/BOOT/BOOTX64.EFI"),
        (conf / "loader.conf", "::/loader/loader.conf"),
        (conf / "criv.conf", "::/loader/entries/criv.conf"),
        (bzimage, "::/bzImage"),
    ):
        run(["mcopy", "-i", str(img), str(src), dest])


def partition_table(firmware: str, boot_sectors: int, root_sectors: int) -> tuple[str, int]:
    """sfdisk's script for the variant and the disk's size in sectors."""
    root_start = START + boot_sectors
    if firmware == "bios":
        table = (
            f"label: dos\nlabel-id: {DISK_ID}\n"
            f"start={START}, size={boot_sectors}, type=c, bootable\n"
            f"start={root_start}, size={root_sectors}, type=83\n"
        )
        return table, root_start + root_sectors
    table = (
        f"label: gpt\nlabel-id: {GPT_DISK_ID}\n"
        f"start={START}, size={boot_sectors}, type={ESP_TYPE}, uuid={GPT_ESP_UUID}, "
        'name="EFI System"\n'
        f"start={root_start}, size={root_sectors}, type={LINUX_FS_TYPE}, "
        f'uuid={GPT_ROOT_UUID}, name="criv-root"\n'
    )
    return table, root_start + root_sectors + START  # room for the backup GPT


def build_disk(out_dir: Path, bzimage: Path, firmware: str = "bios") -> None:
    with tempfile.TemporaryDirectory(prefix="criv-vm-test-disk-") as td:
        tmp = Path(td)
        root = tmp / "root"
        assemble_root(root, tmp)
        boot = tmp / "boot.img"
        boot_sectors, root_sectors = BOOT_MIB * 2048, ROOT_MIB * 2048
        boot_fs(boot, firmware, bzimage, tmp)
        rootimg = tmp / "root.img"
        run(["mkfs.ext4", "-q", "-F", "-L", "criv-root", "-d", str(root), "-O", "^orphan_file",
             str(rootimg), f"{ROOT_MIB}M"])  # fmt: skip
        raw = tmp / "disk.raw"
        table, sectors = partition_table(firmware, boot_sectors, root_sectors)
        with raw.open("wb") as f:
            f.truncate(sectors * 512)
        run(["sfdisk", "-q", str(raw)], input=table.encode())
        with raw.open("r+b") as f:
            if firmware == "bios":
                f.write(mbr_bin().read_bytes()[:440])
            elif f.read(440).strip(b"\0"):  # a protective MBR only: no BIOS boot code
                raise SystemExit("sfdisk wrote boot code into the protective MBR")
            for part, start in ((boot, START), (rootimg, START + boot_sectors)):
                f.seek(start * 512)
                with part.open("rb") as src:
                    shutil.copyfileobj(src, f, 1 << 20)
        stage = Path(tempfile.mkdtemp(prefix=".disk-", dir=out_dir.parent))
        try:
            run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw),
                 str(stage / "disk.qcow2")])  # fmt: skip
            (stage / "disk.qcow2").chmod(0o444)
            manifest = {"builder": BUILDER_VERSION, "boot_mib": BOOT_MIB, "root_mib": ROOT_MIB}
            if firmware != "bios":
                manifest["firmware"] = firmware
            (stage / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            stage.chmod(0o755)
            stage.rename(out_dir)
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def ensure_disk(cache: Path = DEFAULT_CACHE, firmware: str = "bios") -> Path:
    """The test disk for the current inputs, built when missing; returns disk.qcow2's path."""
    if firmware not in FIRMWARES:
        raise ValueError(f"firmware {firmware!r}: not one of {', '.join(FIRMWARES)}")
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        bzimage, khash = kernel_bzimage(cache)
        out = disk_dir(cache, khash, firmware)
        if not (out / "disk.qcow2").is_file():
            t0 = time.monotonic()
            log(f"building {out}")
            build_disk(out, bzimage, firmware)
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
    ap.add_argument(
        "--firmware",
        choices=FIRMWARES,
        default="bios",
        help="bios: MBR + syslinux (SeaBIOS); uefi: GPT + ESP + systemd-boot (OVMF)",
    )
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--push", metavar="REF", help="also push it as a containerDisk image REF")
    ap.add_argument("--insecure", action="store_true", help="with --push: plain HTTP registry")
    args = ap.parse_args()
    disk = ensure_disk(args.cache, args.firmware)
    if args.push:
        push(disk, args.push, args.insecure)
    print(disk)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
