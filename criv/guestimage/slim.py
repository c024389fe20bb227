"""Make the guest root small: it is an initramfs, so every byte sits in guest RAM.

A 256 MiB guest cannot even unpack the plain debootstrap tree (the archive and its unpacked
copy are both in memory during boot), and the files stay resident afterwards. So:

1. remove tools no guest uses (package managers, filesystem makers, login/shadow, perl, bash);
2. remove Python extension modules whose only purpose needs big libraries (ssl, sqlite,
   curses, readline); ``hashlib`` falls back to its builtin algorithms without OpenSSL;
3. garbage-collect shared libraries no remaining ELF file needs (DT_NEEDED closure), keeping
   what glibc loads by name at run time (NSS modules, the dynamic loader);
4. ship the standard library and the wheels as sourceless bytecode (``.pyc`` in place of
   ``.py``); the agent keeps its sources for readable tracebacks.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
from pathlib import Path

LIBDIR = "usr/lib/x86_64-linux-gnu"
PYLIB = "usr/lib/python3.11"

REMOVE_GLOBS = (
    "usr/bin/apt*",
    "usr/bin/dpkg*",
    "usr/bin/debconf*",
    "usr/bin/deb-systemd-*",
    "usr/bin/bash",
    "usr/bin/rbash",
    "usr/bin/bashbug",
    "usr/bin/gpgv",
    "usr/bin/localedef",
    "usr/bin/iconv",
    "usr/bin/pydoc3*",
    "usr/bin/pdb3*",
    "usr/bin/pygettext3*",
    "usr/bin/py3c*",
    "usr/bin/tic",
    "usr/bin/infocmp",
    "usr/bin/toe",
    "usr/bin/captoinfo",
    "usr/bin/infotocap",
    "usr/bin/passwd",
    "usr/bin/chfn",
    "usr/bin/chsh",
    "usr/bin/chage",
    "usr/bin/gpasswd",
    "usr/bin/newgrp",
    "usr/bin/login",
    "usr/bin/su",
    "usr/bin/lslogins",
    "usr/bin/script*",
    "usr/bin/wall",
    "usr/sbin/ldconfig",
    "usr/sbin/iconvconfig",
    "usr/sbin/dpkg*",
    "usr/sbin/mkfs*",
    "usr/sbin/mke2fs",
    "usr/sbin/fsck*",
    "usr/sbin/e2*",
    "usr/sbin/e4*",
    "usr/sbin/debugfs",
    "usr/sbin/dumpe2fs",
    "usr/sbin/resize2fs",
    "usr/sbin/tune2fs",
    "usr/sbin/badblocks",
    "usr/sbin/logsave",
    "usr/sbin/mklost+found",
    "usr/sbin/filefrag",
    "usr/sbin/user*",
    "usr/sbin/group*",
    "usr/sbin/*passwd",
    "usr/sbin/pw*",
    "usr/sbin/grp*",
    "usr/sbin/newusers",
    "usr/sbin/vipw",
    "usr/sbin/vigr",
    "usr/sbin/add*",
    "usr/sbin/del*",
    "usr/sbin/*getty",
    "usr/sbin/sulogin",
    "usr/sbin/pam*",
    "usr/sbin/unix_*",
    "usr/sbin/zic",
    "usr/sbin/zramctl",
    "usr/sbin/installkernel",
    "usr/sbin/update-*",
    "usr/sbin/arpd",
    "usr/sbin/rtmon",
    "usr/sbin/rtacct",
    "usr/sbin/rmt*",
    "usr/sbin/tarcat",
    "usr/lib/x86_64-linux-gnu/*.a",
    "usr/lib/x86_64-linux-gnu/pkgconfig",
    "usr/lib/x86_64-linux-gnu/security",
    "usr/lib/x86_64-linux-gnu/audit",
    "usr/lib/x86_64-linux-gnu/e2fsprogs",
    # OpenSSL/Kerberos plugins: they alone would keep libcrypto and krb5 (grpc has BoringSSL)
    "usr/lib/x86_64-linux-gnu/engines-3",
    "usr/lib/x86_64-linux-gnu/ossl-modules",
    "usr/lib/x86_64-linux-gnu/krb5",
    "usr/lib/python3.11/lib-dynload/nis.*",
    "usr/bin/ss",
    "usr/lib/python3.11/lib-dynload/_ssl.*",
    "usr/lib/python3.11/lib-dynload/_hashlib.*",
    "usr/lib/python3.11/lib-dynload/_sqlite3.*",
    "usr/lib/python3.11/lib-dynload/_curses*",
    "usr/lib/python3.11/lib-dynload/readline.*",
    "usr/lib/python3.11/lib-dynload/_dbm.*",
    "usr/lib/python3.11/lib-dynload/_gdbm.*",
    "usr/lib/python3.11/sqlite3",
    "usr/lib/python3.11/curses",
    "usr/lib/python3.11/dbm",
    "usr/lib/python3.11/distutils",
    "usr/share/terminfo",
    "usr/lib/terminfo",
    "var/lib/dpkg",
    "etc/apt",
)

# Loaded by name at run time (dlopen), so no DT_NEEDED points at them.
KEEP_LIBS = ("ld-linux-x86-64.so*", "libnss_*", "libresolv*", "libc.so*", "libgcc_s.so*")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def remove_unneeded(root: Path) -> None:
    for pattern in REMOVE_GLOBS:
        for p in sorted(root.glob(pattern), reverse=True):
            _remove(p)


def _is_elf(p: Path) -> bool:
    try:
        with p.open("rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _needed(p: Path) -> list[str]:
    r = subprocess.run(["readelf", "-d", str(p)], capture_output=True, text=True)
    out = []
    for line in r.stdout.splitlines():
        if "(NEEDED)" in line and "[" in line:
            out.append(line.split("[", 1)[1].rstrip("]"))
    return out


def gc_libraries(root: Path) -> list[str]:
    """Delete shared libraries in LIBDIR that nothing needs; return their names."""
    libdir = root / LIBDIR
    libs = {p.name: p for p in libdir.iterdir()} if libdir.is_dir() else {}
    elves = [
        p
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink() and p.parent != libdir and _is_elf(p)
    ]
    keep: set[str] = set()
    todo = [n for e in elves for n in _needed(e)]
    todo += [n for n in libs if any(fnmatch.fnmatch(n, k) for k in KEEP_LIBS)]
    while todo:
        name = todo.pop()
        if name in keep or name not in libs:
            continue
        keep.add(name)
        p = libs[name]
        if p.is_symlink():
            todo.append(Path(os.readlink(p)).name)  # the versioned file it names
        elif _is_elf(p):
            todo += _needed(p)
    removed = []
    for name, p in sorted(libs.items()):
        if name in keep or p.is_dir():
            continue
        if ".so" in name:
            _remove(p)
            removed.append(name)
    return removed


def compileall_argv(python: str, root: Path, trees: list[Path], legacy: bool = False) -> list[str]:
    """``compileall`` of ``trees`` under the guest root, as the guest will import them.

    ``unchecked-hash``: nothing compares the .pyc to a source or an mtime at import (the
    initramfs has mtime 0); ``-s root -p /``: the paths recorded are the guest's;
    ``legacy`` (-b): ``x.pyc`` beside ``x.py`` instead of __pycache__, for sourceless trees.
    """
    return [
        python,
        "-m",
        "compileall",
        "-q",
        *(["-b"] if legacy else []),
        "-j",
        "0",
        "--invalidation-mode",
        "unchecked-hash",
        "-s",
        str(root),
        "-p",
        "/",
        *map(str, trees),
    ]


def sourceless(root: Path, trees: list[Path], python: str) -> None:
    """Compile ``trees`` to in-place .pyc (legacy layout) and drop the .py sources."""
    subprocess.run(
        compileall_argv(python, root, trees, legacy=True),
        check=False,  # a few test-data files in the stdlib do not compile; that is expected
        capture_output=True,
    )
    for tree in trees:
        for py in sorted(tree.rglob("*.py")):
            if py.with_suffix(".pyc").is_file():
                py.unlink()
        for cache in sorted(tree.rglob("__pycache__"), reverse=True):
            shutil.rmtree(cache, ignore_errors=True)
