"""Host setup for libvirt: QEMU runs as root (9p passthrough) in the host's mount namespace,
and the daemons are started.

Why root: with QEMU as ``libvirt-qemu``, the kernel, initrd, console file and sockets all work
(libvirt passes fds), but 9p passthrough writes and chowns in the shared directory fail. Until
criv uses a 9p security model without root (or block-device rootfs only), QEMU runs as root.

Why ``namespaces = []``: by default libvirt starts each QEMU in a private mount namespace, a
copy of the host's taken at start. On a host whose mounts are private (this project's
machines) nothing criv mounts later (container rootfs and volumes bound into a pod's 9p
shared dir) reaches that copy, and the copy pins every mount that existed at the time, other
pods' network namespaces included, until that VM stops (their veths outlive their pods).
Used by ``make install`` (via ``criv doctor --fix``) and reported by ``criv doctor``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

QEMU_CONF = Path("/etc/libvirt/qemu.conf")
WANTED = {"user": '"root"', "group": '"root"', "namespaces": "[]"}
_WHY = {
    "user": "9p passthrough needs QEMU as root",
    "group": "9p passthrough needs QEMU as root",
    "namespaces": "QEMU in the host mount namespace (bind mounts into 9p shares)",
}
_DEFAULTS = {"user": "(default libvirt-qemu)", "group": "(default libvirt-qemu)",
             "namespaces": '(default ["mount"])'}  # fmt: skip


def _norm(value: str) -> str:
    return value.split("#")[0].replace(" ", "").strip()


def qemu_conf_issues(path: Path = QEMU_CONF) -> list[str]:
    """What differs from what criv needs, e.g. ``['user = "libvirt-qemu" (want "root")']``."""
    try:
        text = path.read_text()
    except OSError as e:
        return [f"cannot read {path}: {e}"]
    found: dict[str, str] = {}
    for line in text.splitlines():
        if m := re.match(r"^\s*(user|group|namespaces)\s*=\s*(.+)$", line):
            found[m.group(1)] = _norm(m.group(2))
    out = []
    for key, want in WANTED.items():
        got = found.get(key)
        if got != want:
            out.append(f"{key} = {got or _DEFAULTS[key]} (want {want})")
    return out


def ensure_qemu_conf(path: Path = QEMU_CONF) -> bool:
    """Set ``user``/``group`` to root and ``namespaces`` to [] in qemu.conf; True if the
    file changed.

    libvirtd reads qemu.conf at start only: restart it after a change.
    """
    text = path.read_text()
    lines = text.splitlines()
    changed = False
    for key, want in WANTED.items():
        pat = re.compile(rf"^\s*{key}\s*=")
        idx = [i for i, line in enumerate(lines) if pat.match(line)]
        new = f"{key} = {want}  # criv: {_WHY[key]}"
        if idx:
            for i in idx:
                if _norm(lines[i].split("=", 1)[1]) != want:
                    lines[i] = new
                    changed = True
        else:
            lines.append(new)
            changed = True
    if changed:
        tmp = path.with_suffix(".criv-tmp")
        tmp.write_text("\n".join(lines) + "\n")
        shutil.copymode(path, tmp)
        tmp.replace(path)
    return changed


def _pids(name: str) -> list[int]:
    r = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()]


def libvirtd_running() -> bool:
    return bool(_pids("libvirtd") or _pids("virtqemud"))


def start_libvirtd(wait: float = 10.0) -> None:
    """Start virtlogd and libvirtd as daemons when they are not running (no systemd needed)."""
    if not _pids("virtlogd"):
        subprocess.run(["virtlogd", "-d"], check=True)
    if not libvirtd_running():
        subprocess.run(["libvirtd", "-d"], check=True)
    deadline = time.monotonic() + wait
    sock = Path("/run/libvirt/libvirt-sock")
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def restart_libvirtd(wait: float = 10.0) -> None:
    """Stop the running libvirtd (it reads qemu.conf only at start) and start it again."""
    for pid in _pids("libvirtd"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait
    while _pids("libvirtd") and time.monotonic() < deadline:
        time.sleep(0.1)
    start_libvirtd(wait)


def ensure_host_services() -> list[str]:
    """What `make services` does: qemu.conf as criv needs it, virtlogd and libvirtd up
    (restarted when qemu.conf changed under a running libvirtd). Returns what it did."""
    done = []
    changed = ensure_qemu_conf()
    if changed:
        done.append(f"set user/group = root, namespaces = [] in {QEMU_CONF}")
    if changed and libvirtd_running():
        restart_libvirtd()
        done.append("restarted libvirtd")
    elif not libvirtd_running() or not _pids("virtlogd"):
        start_libvirtd()
        done.append("started virtlogd/libvirtd")
    return done


if __name__ == "__main__":
    for line in ensure_host_services() or ["host services already set up"]:
        print(line)
