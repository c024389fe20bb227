"""`criv image build`: the guest kernel, initramfs and root disk, cached by the content hash
of their inputs.

Cache layout (``cache_root``, default /var/lib/criv/cache/guest-image)::

    kernel-<khash>/vmlinux, kernel.config      the kernel stage
    base-<bhash>/rootfs/                       debootstrap + wheels, trimmed
    image-<ihash>/vmlinux, initramfs-early.cpio, root.erofs, manifest.json   what VMs boot
                                               (the Debian kernel: initramfs.cpio[.lz4])
    work/                                      kernel build tree (incremental), scratch dirs
    .lock                                      one builder at a time (flock)

Each stage is built in a scratch directory and renamed into place, so a crash never leaves a
half-built entry that looks finished. Hashes cover every input (file contents, package lists,
pins, the builder version), so a machine builds once and later runs find the result at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from criv.errors import FailedPrecondition
from criv.guestimage import cpio, debian_kernel, kernel, rootdisk, rootfs, slim
from criv.statmemo import KeyedStatMemo

# Bump when the build procedure changes in a way the hashed inputs do not show.
BUILDER_VERSION = "1"
DEFAULT_CACHE_ROOT = Path("/var/lib/criv/cache/guest-image")
REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCE_DATE_EPOCH = 0

Progress = Callable[[str], None]
# a pod start looks the image up: these spare it the hashing while no input changed
_IMAGE_HASHES: KeyedStatMemo[str] = KeyedStatMemo()


@dataclass(frozen=True)
class GuestImage:
    """A built guest image: what a VM's ``<kernel>`` and ``<initrd>`` point at, and its
    read-only root disk (None: the root is in the initramfs)."""

    kernel: Path
    initrd: Path
    hash: str
    kernel_release: str = ""
    root_disk: Path | None = None

    @property
    def directory(self) -> Path:
        return self.initrd.parent

    def root_disk_bytes(self) -> int:
        """The root disk's size (0: none): a VM's pmem device is the whole file."""
        return self.root_disk.stat().st_size if self.root_disk is not None else 0


@dataclass(frozen=True)
class Inputs:
    """Everything the image depends on; hashed per stage."""

    fragment: Path = REPO_ROOT / "images/kernel/criv.config"
    init: Path = REPO_ROOT / "images/init"
    early_init: Path = REPO_ROOT / "images/early-init"
    agent_src: Path = REPO_ROOT / "guest-agent/criv_agent"
    # extra guest modules: path under site-packages -> source file
    extra: dict[str, Path] = field(default_factory=dict)
    mirror: str = ""
    compress: bool = False  # lz4 (legacy format, as the kernel's unpacker wants) or plain
    # "criv": our kernel from linux-source; "debian": the packaged kernel + modules (fallback)
    kernel: Literal["criv", "debian"] = "criv"
    # "disk": the root on a read-only erofs disk (rootdisk); "initramfs": in the initramfs
    root: Literal["disk", "initramfs"] = "disk"

    @property
    def root_on_disk(self) -> bool:
        return self.root == "disk" and self.kernel == "criv"  # see rootdisk

    @classmethod
    def default(cls) -> Inputs:
        # the vsock splice forwarder is part of the agent package now (criv_agent.vsock_splice)
        return cls(extra={})


def _hash_file(h: hashlib._Hash, path: Path, name: str) -> None:
    h.update(f"file {name} {path.stat().st_mode & 0o111:o}\n".encode())
    h.update(hashlib.sha256(path.read_bytes()).digest())


def _tree_files(root: Path, name: str) -> list[tuple[str, Path]]:
    """The files under ``root`` (bytecode left out), each named by its relative path."""
    return [
        (f"{name}/{p.relative_to(root).as_posix()}", p)
        for p in sorted(root.rglob("*"))
        if "__pycache__" not in p.parts and p.suffix != ".pyc" and p.is_file()
    ]


def kernel_hash(inputs: Inputs, source_version: str) -> str:
    h = hashlib.sha256(f"criv-kernel {BUILDER_VERSION} {source_version}\n".encode())
    if source_version.startswith("debian:"):
        h.update(json.dumps(debian_kernel.MODULES).encode())
    else:
        h.update(json.dumps(kernel.KBUILD_ENV, sort_keys=True).encode())
        _hash_file(h, inputs.fragment, "criv.config")
    return h.hexdigest()[:16]


def base_hash(mirror: str) -> str:
    spec = {
        "builder": BUILDER_VERSION,
        "base": rootfs.BASE_VERSION,
        "suite": rootfs.SUITE,
        "mirror": mirror,
        "packages": sorted(rootfs.PACKAGES),
        "wheels": sorted(rootfs.WHEELS),
        "trim": [*rootfs.TRIM, *rootfs.TRIM_GLOBS],
        "slim": [*slim.REMOVE_GLOBS, *slim.KEEP_LIBS],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _image_files(inputs: Inputs) -> list[tuple[str, Path]]:
    """The files the image stage is made of, each with the name it is hashed under."""
    files = [("init", inputs.init)]
    if inputs.root_on_disk:
        files += [("early-init", inputs.early_init), ("busybox", debian_kernel.static_busybox())]
    files += _tree_files(inputs.agent_src, "agent")
    # the assembly code itself (cheap to rerun); the kernel and base stages use explicit
    # versions instead, since a rebuild there costs minutes
    files += _tree_files(Path(__file__).parent, "builder")
    files += [(f"extra/{rel}", src) for rel, src in sorted(inputs.extra.items())]
    return files


def image_hash(inputs: Inputs, khash: str, bhash: str) -> str:
    return _image_hash(inputs, khash, bhash, _image_files(inputs))


def _image_hash(inputs: Inputs, khash: str, bhash: str, files: list[tuple[str, Path]]) -> str:
    h = hashlib.sha256(f"criv-image {BUILDER_VERSION} {khash} {bhash} {inputs.compress}\n".encode())
    h.update(f"root {inputs.root_on_disk}\n".encode())
    for name, path in files:
        _hash_file(h, path, name)
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _locked(cache_root: Path) -> Iterator[None]:
    cache_root.mkdir(parents=True, exist_ok=True)
    with (cache_root / ".lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _staging(cache_root: Path, final: Path) -> Iterator[Path]:
    """A scratch dir renamed to ``final`` on success, removed on failure."""
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_root))
    try:
        yield scratch
        scratch.rename(final)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)


def _timed(progress: Progress, what: str) -> Callable[[], None]:
    t0 = time.monotonic()
    return lambda: progress(f"{what}: {time.monotonic() - t0:.1f} s")


def _kernel_identity(cache_root: Path, inputs: Inputs) -> str:
    if inputs.kernel == "debian":
        return "debian:" + debian_kernel.deb_identity(cache_root / "work")
    return kernel.source_version()


def _ensure_kernel(cache_root: Path, inputs: Inputs, progress: Progress) -> Path:
    khash = kernel_hash(inputs, _kernel_identity(cache_root, inputs))
    final = cache_root / f"kernel-{khash}"
    if (final / "vmlinux").is_file():
        progress(f"kernel: cached {final}")
        return final / "vmlinux"
    done = _timed(progress, "kernel: build time")
    with _staging(cache_root, final) as scratch:
        if inputs.kernel == "debian":
            debian_kernel.build_debian_kernel(cache_root / "work", scratch, progress)
        else:
            kernel.build_kernel(cache_root / "work", inputs.fragment, scratch / "vmlinux", progress)
    done()
    return final / "vmlinux"


def _ensure_base(cache_root: Path, mirror: str, progress: Progress) -> Path:
    bhash = base_hash(mirror)
    final = cache_root / f"base-{bhash}"
    if (final / "rootfs" / "usr/bin/python3").exists():
        progress(f"rootfs: cached base {final}")
        return final / "rootfs"
    done = _timed(progress, "rootfs: base build time")
    with _staging(cache_root, final) as scratch:
        rootfs.build_base(scratch / "rootfs", mirror, scratch / "build.log", progress)
    done()
    return final / "rootfs"


def _pack(root: Path, out_dir: Path, compress: bool, progress: Progress) -> Path:
    plain = out_dir / "initramfs.cpio"
    with plain.open("wb") as f:
        n = cpio.write_cpio(root, f, mtime=SOURCE_DATE_EPOCH)
    progress(f"initramfs: {n} entries, {plain.stat().st_size // (1 << 20)} MiB")
    if not compress:
        return plain
    if shutil.which("lz4") is None:
        raise FailedPrecondition("lz4 not found: apt-get install lz4")
    lz = out_dir / "initramfs.cpio.lz4"
    # -l: the legacy frame format, the only one the kernel's initramfs unpacker reads
    subprocess.run(["lz4", "-l", "-9", "-q", "-f", str(plain), str(lz)], check=True)
    plain.unlink()
    progress(f"initramfs: lz4 {lz.stat().st_size // (1 << 20)} MiB")
    return lz


def cached_image(
    cache_root: Path = DEFAULT_CACHE_ROOT, inputs: Inputs | None = None
) -> GuestImage | None:
    """The image for the current inputs if it is already built (no building, cheap)."""
    inputs = inputs or Inputs.default()
    try:
        khash = kernel_hash(inputs, _kernel_identity(cache_root, inputs))
        mirror = inputs.mirror or rootfs.mirror_from_sources()
        bhash = base_hash(mirror)
        files = _image_files(inputs)
        key = (khash, bhash, inputs.compress, inputs.root_on_disk, tuple(files))
        ihash = _IMAGE_HASHES.get(
            key, (p for _, p in files), lambda: _image_hash(inputs, khash, bhash, files)
        )
    except FailedPrecondition:
        return None
    return _load(cache_root / f"image-{ihash}")


def _load(d: Path) -> GuestImage | None:
    try:
        m = json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    disk = d / m["root_disk"] if m.get("root_disk") else None
    img = GuestImage(d / m["kernel"], d / m["initrd"], m["hash"], m.get("kernel_release", ""), disk)
    files = [img.kernel, img.initrd, *([disk] if disk else [])]
    return img if all(f.is_file() for f in files) else None


def build_guest_image(
    cache_root: Path = DEFAULT_CACHE_ROOT,
    progress: Progress = print,
    inputs: Inputs | None = None,
) -> GuestImage:
    """Build (or find) the guest image; blocking, minutes on first use, instant when cached."""
    inputs = inputs or Inputs.default()
    for p in (inputs.fragment, inputs.init, inputs.early_init):
        if not p.is_file():
            raise FailedPrecondition(f"guest image input missing: {p}")
    if not (inputs.agent_src / "__init__.py").is_file():
        raise FailedPrecondition(f"agent source not found: {inputs.agent_src}")
    mirror = inputs.mirror or rootfs.mirror_from_sources()
    with _locked(cache_root):
        vmlinux = _ensure_kernel(cache_root, inputs, progress)
        khash = vmlinux.parent.name.removeprefix("kernel-")
        bhash = base_hash(mirror)
        ihash = image_hash(inputs, khash, bhash)
        final = cache_root / f"image-{ihash}"
        if (img := _load(final)) is not None:
            progress(f"image: cached {final}")
            return img
        base = _ensure_base(cache_root, mirror, progress)
        done = _timed(progress, "image: assemble time")
        with _staging(cache_root, final) as scratch:
            root = scratch / "rootfs"
            progress("image: copying base, adding agent, init, bytecode")
            rootfs.copy_tree(base, root)
            rootfs.install_agent(root, inputs.agent_src, inputs.extra)
            rootfs.install_init(root, inputs.init)
            debian_kernel.install_modules(vmlinux.parent, root)
            own = sorted({inputs.agent_src.name, *(r.split("/")[0] for r in inputs.extra)})
            rootfs.precompile(root, scratch / "build.log", own)
            rootfs.reset_dev(root)
            disk = None
            if inputs.root_on_disk:
                disk = rootdisk.make_erofs(root, scratch, ihash)
                progress(f"root disk: erofs {disk.stat().st_size // (1 << 20)} MiB")
                busybox = debian_kernel.static_busybox()
                initrd = rootdisk.pack_early(busybox, inputs.early_init, scratch, SOURCE_DATE_EPOCH)
            else:
                # the Debian kernel needs more RAM itself: a plain cpio does not unpack in
                # 256 MiB
                compress = inputs.compress or inputs.kernel == "debian"
                initrd = _pack(root, scratch, compress, progress)
            shutil.rmtree(root)
            scratch.chmod(0o755)  # mkdtemp made it 0700; QEMU may run unprivileged one day
            # a hard link keeps one copy of the kernel on disk
            try:
                os.link(vmlinux, scratch / "vmlinux")
            except OSError:
                shutil.copyfile(vmlinux, scratch / "vmlinux")
            manifest = {
                "hash": ihash,
                "kernel": "vmlinux",
                "initrd": initrd.name,
                **({"root_disk": disk.name} if disk else {}),
                "kernel_hash": khash,
                "base_hash": bhash,
                "kernel_release": kernel.kernel_release(vmlinux),
                "builder": BUILDER_VERSION,
                "mirror": mirror,
                "wheels": list(rootfs.WHEELS),
                "packages": list(rootfs.PACKAGES),
            }
            (scratch / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        done()
        img = _load(final)
        assert img is not None
        progress(f"image: ready {final}")
        return img


def prune_cache(cache_root: Path, keep: GuestImage) -> list[str]:
    """Remove every cached stage that ``keep`` does not use; return the removed names.

    Not automatic: tests and operators may keep variants (lz4, the Debian kernel) side by
    side. The kernel build tree under work/ is kept (it makes the next kernel build quick).
    """
    try:
        m = json.loads((keep.directory / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise FailedPrecondition(f"cannot read {keep.directory}/manifest.json: {e}") from e
    wanted = {keep.directory.name, f"kernel-{m['kernel_hash']}", f"base-{m['base_hash']}"}
    removed = []
    with _locked(cache_root):
        for p in sorted(cache_root.iterdir()):
            if p.name.startswith(("image-", "kernel-", "base-")) and p.name not in wanted:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed
