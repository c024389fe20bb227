"""Fallback kernel: Debian's packaged linux-image-amd64 instead of building our own.

For machines where building is not possible (no linux-source, no compiler, no time). The
package's vmlinuz is XZ-compressed (decompressing costs ~3.7 s under TCG), so the ELF
``vmlinux`` is extracted here and booted through its PVH entry like ours. Its virtio, vsock,
9p, overlay and friends are modules: they go into the initramfs with their dependency order,
and images/init loads them with a static busybox ``insmod`` before anything else.
Expect ~5.7 s to the agent instead of ~2.3 s.
"""

from __future__ import annotations

import hashlib
import lzma
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from criv.errors import FailedPrecondition

Progress = Callable[[str], None]

# What the guest needs that Debian builds as modules (built-in ones are skipped).
MODULES = (
    # libcrc32c (erofs, ext4) needs a crc32c implementation first: a softdep, not in depends=
    "crc32c_generic",
    "virtio_pci",
    "virtio_rng",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "9pnet_virtio",
    "9p",
    "vmw_vsock_virtio_transport",
    "overlay",
    "erofs",
    "ext4",
    "virtiofs",
    "veth",
    "bridge",
    "tun",
)
GUEST_MODULE_DIR = "lib/modules/criv"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")


def kernel_package() -> str:
    """The versioned package behind linux-image-amd64 (unsigned: same bits, no shim)."""
    out = subprocess.run(
        ["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True
    ).stdout
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split()[-1] + "-unsigned"
    raise FailedPrecondition("cannot resolve linux-image-amd64 (apt-get update?)")


def fetch_deb(pkg: str, debs: Path) -> Path:
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{pkg}_*.deb"))
    if not found:
        r = subprocess.run(["apt-get", "download", pkg], cwd=debs, capture_output=True, text=True)
        if r.returncode != 0:
            raise FailedPrecondition(f"apt-get download {pkg} failed: {r.stderr.strip()}")
        found = sorted(debs.glob(f"{pkg}_*.deb"))
    if not found:
        raise FailedPrecondition(f"apt-get download {pkg} produced nothing")
    return found[-1]


def static_busybox() -> Path:
    for cand in BUSYBOX_CANDIDATES:
        p = Path(cand)
        if p.is_file() and b"ld-linux" not in p.read_bytes()[:8192]:
            return p
    raise FailedPrecondition(
        "the guest image needs a static busybox (early init, the Debian kernel's insmod): "
        "apt-get install busybox-static"
    )


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    start = vmlinuz.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise FailedPrecondition("vmlinuz is not XZ-compressed; cannot extract vmlinux")
    elf = lzma.LZMADecompressor().decompress(vmlinuz[start:])
    if not elf.startswith(b"\x7fELF"):
        raise FailedPrecondition("the extracted kernel is not an ELF image")
    return elf


def modinfo_depends(ko: bytes) -> list[str]:
    i = ko.find(b"\0depends=")
    if i < 0:
        return []
    val = ko[i + 9 : ko.index(b"\0", i + 9)].decode()
    return [d for d in val.split(",") if d]


def module_order(mods: dict[str, Path], wanted: tuple[str, ...]) -> list[str]:
    """``wanted`` plus dependencies, dependencies first; missing names are built in."""
    order: list[str] = []

    def add(name: str) -> None:
        if name in order or name not in mods:
            return
        for dep in modinfo_depends(mods[name].read_bytes()):
            add(dep)
        order.append(name)

    for m in wanted:
        add(m)
    return order


def deb_identity(work: Path) -> str:
    """Cache key part: which package file (version) the fallback kernel comes from."""
    pkg = kernel_package()
    deb = fetch_deb(pkg, work / "debs")
    return hashlib.sha256(deb.name.encode()).hexdigest()[:16] + ":" + deb.name


def build_debian_kernel(work: Path, out: Path, progress: Progress) -> None:
    """``out``/vmlinux, ``out``/modules/<name>.ko, ``out``/modules/order, ``out``/busybox."""
    pkg = kernel_package()
    progress(f"kernel: Debian fallback, {pkg}")
    deb = fetch_deb(pkg, work / "debs")
    with tempfile.TemporaryDirectory(prefix="criv-debkernel-", dir=work) as td:
        tree = Path(td) / "k"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
        vmlinuz = next((tree / "boot").glob("vmlinuz-*"))
        (out / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
        # module names use "_" where file names may use "-" (virtio-rng.ko is virtio_rng)
        mods = {
            p.name.removesuffix(".ko").replace("-", "_"): p
            for p in (tree / "lib/modules").rglob("*.ko")
        }
        order = module_order(mods, MODULES)
        (out / "modules").mkdir()
        for m in order:
            shutil.copyfile(mods[m], out / "modules" / f"{m}.ko")
        (out / "modules/order").write_text("\n".join(order) + "\n")
    shutil.copyfile(static_busybox(), out / "busybox")
    progress(f"kernel: Debian vmlinux extracted, {len(order)} modules")


def install_modules(kernel_dir: Path, root: Path) -> None:
    """Put the fallback kernel's modules and the static busybox (insmod) into the guest."""
    src = kernel_dir / "modules"
    if not src.is_dir():
        return
    dst = root / GUEST_MODULE_DIR
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        shutil.copyfile(f, dst / f.name)
    bb = root / "usr/local/sbin/busybox"
    bb.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(kernel_dir / "busybox", bb)
    bb.chmod(0o755)
