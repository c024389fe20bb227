"""The guest kernel: Debian's linux-source-6.1, `tinyconfig` + our fragment, uncompressed vmlinux.

The build tree is kept (per source version) under the cache's ``work/`` directory, so a changed
fragment rebuilds incrementally instead of from scratch; only the finished ``vmlinux`` is cached
by content hash. The fragment check runs after ``olddefconfig``: Kconfig silently drops an option
whose dependencies are unmet, and a guest without, say, vsock only fails much later.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from criv.errors import FailedPrecondition, Internal
from criv.statmemo import KeyedStatMemo

# Debian ships the source as one tarball; the package version names the build tree.
SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
DPKG_STATUS = Path("/var/lib/dpkg/status")
_SOURCE_VERSIONS: KeyedStatMemo[str] = KeyedStatMemo()

# Reproducible builds: the kernel embeds these in its version banner.
KBUILD_ENV = {
    "KBUILD_BUILD_TIMESTAMP": "1970-01-01",
    "KBUILD_BUILD_USER": "criv",
    "KBUILD_BUILD_HOST": "criv",
}

_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")

Progress = Callable[[str], None]


def parse_config(text: str) -> dict[str, str]:
    """A Kconfig file as {option: value}; ``# X is not set`` becomes ``"n"``."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if m := _SET.match(line):
            out[m.group(1)] = m.group(2)
        elif m := _UNSET.match(line):
            out[m.group(1)] = "n"
    return out


def missing_options(fragment: str, config: str) -> list[str]:
    """Lines of ``fragment`` that the final ``config`` does not honour, as ``OPT=want (got)``.

    Every explicit setting counts (``=y``, values, and ``is not set``), because each one is there
    for a reason; an option absent from the final config reads as "n".
    """
    want = parse_config(fragment)
    have = parse_config(config)
    bad = []
    for opt, value in want.items():
        got = have.get(opt, "n")
        if got != value:
            bad.append(f"{opt}={value} (got {got})")
    return bad


def source_version() -> str:
    """The installed linux-source package version (part of the cache key)."""
    # dpkg's answer changes only with its database or the tarball: a pod start asks
    return _SOURCE_VERSIONS.get(SOURCE_PACKAGE, (DPKG_STATUS, SOURCE_TARBALL), _query_version)


def _query_version() -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as e:
        raise FailedPrecondition(
            f"{SOURCE_PACKAGE} is not installed (apt-get install {SOURCE_PACKAGE}): {e}"
        ) from e
    if not out or not SOURCE_TARBALL.is_file():
        raise FailedPrecondition(f"{SOURCE_TARBALL} missing: apt-get install {SOURCE_PACKAGE}")
    return out


def _run(cmd: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None) -> None:
    with log.open("ab") as f:
        f.write(("$ " + " ".join(cmd) + "\n").encode())
        f.flush()
        r = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise Internal(
            f"{' '.join(cmd[:3])}… failed ({r.returncode}); log {log}:\n" + "\n".join(tail)
        )


def build_kernel(
    work_root: Path,
    fragment: Path,
    out: Path,
    progress: Progress,
    jobs: int = 0,
) -> Path:
    """Configure and build ``vmlinux`` into ``out`` (a file path); return it.

    ``work_root`` holds the extracted source and the build tree, reused between builds.
    """
    version = source_version()
    work = work_root / f"kernel-{version}"
    src = work / "linux-source-6.1"
    build = work / "build"
    log = work / "build.log"
    work.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"")
    env = {**os.environ, **KBUILD_ENV}
    if not (src / "Makefile").is_file():
        progress(f"kernel: extracting {SOURCE_TARBALL}")
        tmp = work / "extract.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _run(["tar", "-xf", str(SOURCE_TARBALL), "-C", str(tmp)], work, log)
        shutil.rmtree(src, ignore_errors=True)
        (tmp / "linux-source-6.1").rename(src)
        tmp.rmdir()
    build.mkdir(exist_ok=True)
    progress("kernel: tinyconfig + criv.config + olddefconfig")
    _run(["make", f"O={build}", "tinyconfig"], src, log, env)
    _run(
        [
            "scripts/kconfig/merge_config.sh",
            "-m",
            "-O",
            str(build),
            str(build / ".config"),
            str(fragment.resolve()),
        ],
        src,
        log,
        env,
    )
    _run(["make", f"O={build}", "olddefconfig"], src, log, env)
    bad = missing_options(fragment.read_text(), (build / ".config").read_text())
    if bad:
        raise FailedPrecondition(
            f"kernel config: {len(bad)} option(s) of {fragment} did not survive olddefconfig "
            f"(unmet dependencies?): " + ", ".join(bad)
        )
    n = jobs or os.cpu_count() or 1
    progress(f"kernel: make -j{n} vmlinux (nice 19; minutes on a small machine), log {log}")
    _run(["nice", "-n", "19", "make", f"O={build}", f"-j{n}", "vmlinux"], src, log, env)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(build / "vmlinux", out)
    shutil.copyfile(build / ".config", out.with_name("kernel.config"))
    progress(f"kernel: done, {out.stat().st_size // (1 << 20)} MiB vmlinux")
    return out


def kernel_release(vmlinux: Path) -> str:
    """The ``uname -r`` string embedded in a vmlinux (best effort, for manifests)."""
    data = vmlinux.read_bytes()
    m = re.search(rb"Linux version (\S+)", data)
    return m.group(1).decode(errors="replace") if m else "unknown"
