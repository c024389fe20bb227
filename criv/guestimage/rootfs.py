"""The guest root filesystem: Debian bookworm (debootstrap minbase) + wheels + the agent + init.

Two stages, cached separately because they change at different rates:

- the *base* (debootstrap + pip wheels, trimmed) depends only on the package lists and pins;
- the *image* stage copies the base, adds the agent source, the init and precompiled bytecode.

The wheels come from pip, not Debian: the agent's generated code needs the host's major
versions of grpcio/protobuf (bookworm's python3-protobuf 3.21 cannot load protobuf 7 code).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from criv.errors import FailedPrecondition, Internal
from criv.guestimage import slim

Progress = Callable[[str], None]

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# python3 (not python3-minimal): asyncio, ctypes and friends live in libpython3.11-stdlib.
PACKAGES = ("python3", "crun", "iproute2")
# Same versions as the host's pyproject pins; cp311 because bookworm's python3 is 3.11.
WHEELS = ("grpcio==1.85.3", "protobuf==7.36.2")
WHEEL_PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_28_x86_64")
SITE = "usr/local/lib/python3.11/dist-packages"
# Bump when the base procedure changes in a way the hashed lists do not show.
BASE_VERSION = "2"

# Removed from the base: nothing in the guest reads them, and every MiB of initramfs is
# unpacked (and, under TCG, copied) at each boot.
TRIM = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/common-licenses",
    "usr/share/bash-completion",
    "usr/share/zoneinfo",
    "usr/share/perl5",
    "usr/share/debconf",
    "usr/lib/x86_64-linux-gnu/perl-base",
    "usr/lib/x86_64-linux-gnu/gconv",
    "usr/lib/apt",
    "usr/lib/python3.11/test",
    "usr/lib/python3.11/ensurepip",
    "usr/lib/python3.11/idlelib",
    "usr/lib/python3.11/lib2to3",
    "usr/lib/python3.11/pydoc_data",
    "usr/lib/python3.11/tkinter",
    "usr/lib/python3.11/turtledemo",
    "var/cache",
    "var/lib/apt/lists",
    "var/log",
    "usr/bin/perl",
    "usr/bin/perl5.36.0",
)
TRIM_GLOBS = ("usr/bin/apt*", "usr/lib/x86_64-linux-gnu/libapt-*", "**/__pycache__")


def mirror_from_sources(default: str = DEFAULT_MIRROR) -> str:
    """The Debian mirror the host's apt uses (only Debian's mirror is reachable in CI)."""
    candidates: list[str] = []
    d = Path("/etc/apt")
    files = [d / "sources.list", *sorted((d / "sources.list.d").glob("*"))]
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split()
            if words[:1] == ["deb"]:
                url = next((w for w in words[1:] if "://" in w), "")
                candidates.append(url)
            elif words[:1] == ["URIs:"]:
                candidates += words[1:]
    for url in candidates:
        if "debian" in url and "security" not in url:
            return url.rstrip("/")
    return default


def _run(cmd: list[str], log: Path, cwd: Path | None = None) -> None:
    with log.open("ab") as f:
        f.write(("$ " + " ".join(cmd) + "\n").encode())
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd)
    if r.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise Internal(f"{cmd[0]} failed ({r.returncode}); log {log}:\n" + "\n".join(tail))


def trim(root: Path) -> None:
    for rel in TRIM:
        p = root / rel
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    for pattern in TRIM_GLOBS:
        for p in sorted(root.glob(pattern), reverse=True):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists() or p.is_symlink():
                p.unlink()
    for d in ("var/cache", "var/log", "var/lib/apt/lists"):
        (root / d).mkdir(parents=True, exist_ok=True)
    normalize_dates(root)


def normalize_dates(root: Path) -> None:
    """Blank the "last password change" day in /etc/shadow: the only build date in the tree.

    Without it two builds on different days differ (the guest has no logins to age).
    """
    for name in ("etc/shadow", "etc/shadow-"):
        p = root / name
        if not p.is_file():
            continue
        lines = []
        for line in p.read_text().splitlines():
            fields = line.split(":")
            if len(fields) > 2:
                fields[2] = ""
            lines.append(":".join(fields))
        p.write_text("\n".join(lines) + "\n")


def build_base(dest: Path, mirror: str, log: Path, progress: Progress) -> None:
    """debootstrap + wheels + trim into ``dest`` (must not exist)."""
    if shutil.which("debootstrap") is None:
        raise FailedPrecondition("debootstrap not found: apt-get install debootstrap")
    progress(f"rootfs: debootstrap {SUITE} minbase from {mirror} (+{', '.join(PACKAGES)})")
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            str(dest),
            mirror,
        ],
        log,
    )
    progress(f"rootfs: pip wheels {', '.join(WHEELS)} (cp311 manylinux x86_64)")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--only-binary=:all:"]
    for plat in WHEEL_PLATFORMS:
        cmd += ["--platform", plat]
    cmd += ["--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]
    cmd += ["--target", str(dest / SITE), "--no-warn-script-location", *WHEELS]
    _run(cmd, log)
    progress("rootfs: trimming docs, locales, perl, apt, caches")
    trim(dest)
    progress("rootfs: slimming (unused tools, shared-library GC)")
    slim.remove_unneeded(dest)
    slim.gc_libraries(dest)
    reset_dev(dest)


def copy_tree(src: Path, dst: Path) -> None:
    """Copy a root filesystem: dirs, files, symlinks, and device nodes recreated by mknod.

    shutil.copytree would *read* a device node such as /dev/zero as a file, forever.
    """
    dst.mkdir(parents=True, exist_ok=False)
    shutil.copystat(src, dst)
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        for name in sorted(dirnames + filenames):
            s, d = Path(dirpath) / name, dst / rel / name
            st = s.lstat()
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(s), d)
            elif stat.S_ISDIR(st.st_mode):
                d.mkdir()
                shutil.copystat(s, d)
            elif stat.S_ISREG(st.st_mode):
                shutil.copy2(s, d)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                os.mknod(d, st.st_mode, st.st_rdev)
            # fifos and sockets: nothing in a fresh guest needs the build host's
        # os.walk follows no symlinks to directories, so a symlinked dir stays a link


def install_agent(root: Path, agent_src: Path, extra: dict[str, Path]) -> None:
    """Copy the agent package (and extra guest modules) into the guest's site-packages."""
    site = root / SITE
    site.mkdir(parents=True, exist_ok=True)
    shutil.copytree(
        agent_src,
        site / agent_src.name,
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyi", "py.typed"),
    )
    for rel, src in sorted(extra.items()):
        dst = site / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        # namespace-free packages: each parent needs an (empty) __init__ of its own
        parent = dst.parent
        while parent != site:
            (parent / "__init__.py").touch()
            parent = parent.parent
        shutil.copyfile(src, dst)
    launcher = root / "usr/local/bin/criv-agent"
    launcher.parent.mkdir(parents=True, exist_ok=True)
    launcher.write_text(
        "#!/usr/bin/python3\nimport sys\n\nfrom criv_agent.main import main\n\nsys.exit(main())\n"
    )
    launcher.chmod(0o755)


def install_init(root: Path, init: Path) -> None:
    dst = root / "init"
    shutil.copyfile(init, dst)
    dst.chmod(0o755)
    # the init powers the VM off with reboot(2); minbase has no poweroff binary
    helper = root / "usr/local/sbin/criv-poweroff"
    helper.parent.mkdir(parents=True, exist_ok=True)
    helper.write_text(
        "#!/usr/bin/python3\nfrom criv_agent.poweroff import power_off\n\nraise power_off()\n"
    )
    helper.chmod(0o755)
    for d in ("proc", "sys", "dev", "run", "tmp"):
        (root / d).mkdir(exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "etc").mkdir(exist_ok=True)
    for name in ("hostname", "resolv.conf"):
        p = root / "etc" / name
        if p.is_symlink():
            p.unlink()
    (root / "etc/hostname").write_text("criv-guest\n")
    (root / "etc/resolv.conf").write_text("")


def host_python311() -> str:
    """A python3.11 on the host to compile guest bytecode (bytecode is per minor version).

    Debian's own first: the same build the guest runs.
    """
    py = "/usr/bin/python3.11" if os.access("/usr/bin/python3.11", os.X_OK) else None
    py = py or shutil.which("python3.11")
    if py is None:
        raise FailedPrecondition("python3.11 is needed on the host to precompile guest bytecode")
    return py


def precompile(root: Path, log: Path, own: list[str]) -> None:
    """Bytecode for everything; the initramfs has mtime 0 and no writes, so ``unchecked-hash``.

    The stdlib and the wheels become sourceless (.pyc in place of .py, see slim.py); our own
    packages (``own``: names under site-packages) keep their sources beside __pycache__.
    """
    py = host_python311()
    site = root / SITE
    third_party = [p for p in sorted(site.iterdir()) if p.name not in own]
    slim.sourceless(root, [root / "usr/lib/python3.11", *third_party], py)
    _run(slim.compileall_argv(py, root, [site / name for name in own]), log)


def reset_dev(root: Path) -> None:
    """Keep only /dev/console and /dev/null: the guest mounts devtmpfs over /dev.

    The kernel opens /dev/console for init's stdio before init runs, from the initramfs
    itself, so that one node has to be in the archive.
    """
    dev = root / "dev"
    if dev.is_dir():
        shutil.rmtree(dev)
    dev.mkdir(mode=0o755)
    os.mknod(dev / "console", 0o600 | stat.S_IFCHR, os.makedev(5, 1))
    os.mknod(dev / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
