#!/usr/bin/env python3
"""The pod share's filesystem transport: virtio-9p (criv before the VM-boundary work)
against virtio-fs (now), in one run, on the same kernel, VM shape and host directory.

  * 9p (old)        -- QEMU's virtio-9p, ``security_model=passthrough`` (QEMU as root),
                       mounted as criv's init used to (``msize=262144,cache=none``)
  * virtio-fs (new) -- QEMU's vhost-user-fs device served by a virtiofsd started with
                       exactly the options criv gives a pod's (criv/sandbox/vm/virtiofs.py),
                       mounted as images/init does
The guest is criv's guest kernel with a busybox initramfs that runs bench/fsbench.c on
the share: a sequential write (fsync'd) and read of SIZE MiB, then create, stat, readdir
and unlink of N small files, timed in the guest. A container's volume in a vm pod is a
bind of a directory of this same mount, so these are the figures a container sees.
TCG on this machine; the figures are per run, the ratio is new / old (higher is better).
Usage: python bench/sharefs.py [--size MiB] [--files N] [--runs R]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from criv.guestimage import build_guest_image  # noqa: E402
from criv.guestimage.cpio import write_cpio  # noqa: E402
from criv.guestimage.debian_kernel import static_busybox  # noqa: E402
from criv.sandbox.isolation import PodPaths  # noqa: E402
from criv.sandbox.vm import virtiofs  # noqa: E402

FIGURES = (
    "write_mb_s",
    "read_mb_s",
    "create_per_s",
    "stat_per_s",
    "readdir_entries_per_s",
    "unlink_per_s",
)
INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /mnt
case "$(cat /proc/cmdline)" in
  *fsbench=9p*) mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=none share /mnt ;;
  *fsbench=virtiofs*) mount -t virtiofs share /mnt ;;
esac || echo "FSBENCH failed mount"
/fsbench /mnt/work $(sed -n 's/.*fsargs=\\([0-9]*\\),\\([0-9]*\\).*/\\1 \\2/p' /proc/cmdline)
poweroff -f
"""


def build_initramfs(out: Path) -> Path:
    root = out / "root"
    for d in ("bin", "dev", "proc", "sys", "mnt"):
        (root / d).mkdir(parents=True)
    subprocess.run(
        ["gcc", "-static", "-O2", "-o", str(root / "fsbench"), str(ROOT / "bench" / "fsbench.c")],
        check=True,
    )
    shutil.copyfile(static_busybox(), root / "bin" / "busybox")
    (root / "init").write_text(INIT)
    for exe in ("bin/busybox", "init", "fsbench"):
        (root / exe).chmod(0o755)
    cpio = out / "initramfs.cpio"
    with cpio.open("wb") as f:
        write_cpio(root, f)
    return cpio


def qemu_argv(kernel: Path, initrd: Path, console: Path, append: str) -> list[str]:
    return [
        "qemu-system-x86_64", "-M", "q35", "-accel", "tcg,tb-size=64", "-cpu", "max",
        "-m", "512", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
        "-serial", f"file:{console}", "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", f"console=ttyS0 quiet panic=-1 {append}",
        "-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-numa", "node,memdev=mem",
    ]  # fmt: skip


def run_guest(argv: list[str], console: Path, timeout: float) -> dict[str, float]:
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        qemu.wait(timeout)
    except subprocess.TimeoutExpired:
        qemu.kill()
        qemu.wait()
        raise RuntimeError(f"guest did not finish in {timeout:.0f}s: {tail(console)}") from None
    text = console.read_text(errors="replace")
    if "FSBENCH done" not in text:
        raise RuntimeError(f"the guest's benchmark failed: {tail(console)}")
    return {k: float(v) for k, v in re.findall(r"FSBENCH (\w+) ([0-9.]+)", text)}


def tail(p: Path) -> str:
    try:
        return p.read_text(errors="replace")[-2000:]
    except OSError:
        return "(no console)"


def run_9p(kernel: Path, initrd: Path, export: Path, d: Path, fsargs: str) -> dict[str, float]:
    console = d / "console-9p.log"
    argv = [
        *qemu_argv(kernel, initrd, console, f"fsbench=9p fsargs={fsargs}"),
        "-fsdev", f"local,id=fs0,path={export},security_model=passthrough",
        "-device", "virtio-9p-pci,fsdev=fs0,mount_tag=share",
    ]  # fmt: skip
    return run_guest(argv, console, timeout=900)


def run_virtiofs(
    kernel: Path, initrd: Path, export: Path, d: Path, fsargs: str
) -> dict[str, float]:
    # criv's own argv for a pod's virtiofsd, with the bench's export as its source
    paths = PodPaths(state=d / "vfs-state", run=d / "vfs-run")
    paths.state.mkdir(exist_ok=True)
    paths.run.mkdir(exist_ok=True)
    cmd = virtiofs.argv(paths, "root")
    cmd[cmd.index(f"source={paths.shared}")] = f"source={export}"
    sock = virtiofs.fs_socket(paths)
    sock.unlink(missing_ok=True)
    with open(d / "virtiofsd.log", "ab") as log:
        fsd = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if fsd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"virtiofsd did not start: {tail(d / 'virtiofsd.log')}")
            time.sleep(0.01)
        console = d / "console-vfs.log"
        argv = [
            *qemu_argv(kernel, initrd, console, f"fsbench=virtiofs fsargs={fsargs}"),
            "-chardev", f"socket,id=vfs,path={sock}",
            "-device", "vhost-user-fs-pci,chardev=vfs,tag=share,queue-size=1024",
        ]  # fmt: skip
        return run_guest(argv, console, timeout=900)
    finally:
        if fsd.poll() is None:
            fsd.kill()
        fsd.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=64, help="MiB written and read")
    ap.add_argument("--files", type=int, default=1000, help="small files created")
    ap.add_argument("--runs", type=int, default=2, help="runs of each, interleaved")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (9p passthrough and virtiofsd run as root)", file=sys.stderr)
        return 2
    img = build_guest_image(progress=lambda line: print(f"[guest-image] {line}", flush=True))
    fsargs = f"{args.size},{args.files}"
    results: dict[str, dict[str, list[float]]] = {"9p (old)": {}, "virtio-fs (new)": {}}
    with tempfile.TemporaryDirectory(prefix="criv-bench-fs-") as td:
        d = Path(td)
        initrd = build_initramfs(d)
        export = d / "export"
        (export / "work").mkdir(parents=True)
        for i in range(args.runs):
            for name, run in (("9p (old)", run_9p), ("virtio-fs (new)", run_virtiofs)):
                print(f"{name}: run {i + 1}/{args.runs}...", flush=True)
                for k, v in run(img.kernel, initrd, export, d, fsargs).items():
                    results[name].setdefault(k, []).append(v)
    report(results, args)
    return 0


def report(results: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> None:
    old, new = results["9p (old)"], results["virtio-fs (new)"]
    print(f"\nshare transport, TCG, {args.size} MiB, {args.files} files, median of {args.runs}")
    print(f"{'figure':<24}{'9p (old)':>12}{'virtio-fs (new)':>17}{'new/old':>10}")
    for k in FIGURES:
        o, n = statistics.median(old[k]), statistics.median(new[k])
        print(f"{k:<24}{o:>12.1f}{n:>17.1f}{n / o if o else 0:>10.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
