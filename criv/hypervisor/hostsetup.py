"""Host setup for libvirt: QEMU unprivileged and confined, and the daemons started.

QEMU runs as ``criv-qemu`` (a system user criv creates), in libvirt's per-domain mount
namespace and its seccomp sandbox. It opens no host file of a pod's share: virtiofsd,
run by criv, serves it (docs/security.md); what QEMU does open (guest kernel and
initrd: world-readable; vhost-user sockets: group ``criv-qemu``) needs no relabelling,
so libvirt's ``dynamic_ownership`` is off (it would chown the shared guest image).

The root mount must be ``rshared`` (systemd's default; done here where there is no
systemd): each QEMU's mount namespace is a copy of the host's taken at its start, and
only with shared propagation does criv unmounting a pod's netns or overlay release the
copy; with ``/`` private every VM would pin the mounts of every pod that existed when it
started (their veths would outlive their pods).

Used by ``make services`` (and ``criv doctor --fix``) and reported by ``criv doctor``.
"""

from __future__ import annotations

import contextlib
import grp
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

from criv.commands import run_sync

QEMU_CONF = Path("/etc/libvirt/qemu.conf")
REAPER = Path(__file__).with_name("reaper.py")  # run as a script (criv's python)
QEMU_USER = "criv-qemu"
WANTED = {
    "user": f'"{QEMU_USER}"',
    "group": f'"{QEMU_USER}"',
    "namespaces": '["mount"]',
    "dynamic_ownership": "0",
}
_WHY = {
    "user": "QEMU unprivileged",
    "group": "QEMU unprivileged",
    "namespaces": "each QEMU in a mount namespace of its own",
    "dynamic_ownership": "no relabelling of the shared guest image",
}
_DEFAULTS = {"user": "(default libvirt-qemu)", "group": "(default libvirt-qemu)",
             "namespaces": '(default ["mount"])', "dynamic_ownership": "(default 1)"}  # fmt: skip
_KEYS = "|".join(WANTED)


def _norm(value: str) -> str:
    return value.split("#")[0].replace(" ", "").strip()


def qemu_conf_issues(path: Path = QEMU_CONF) -> list[str]:
    """What differs from what criv needs, e.g. ``['user = "root" (want "criv-qemu")']``."""
    try:
        text = path.read_text()
    except OSError as e:
        return [f"cannot read {path}: {e}"]
    found: dict[str, str] = {}
    for line in text.splitlines():
        if m := re.match(rf"^\s*({_KEYS})\s*=\s*(.+)$", line):
            found[m.group(1)] = _norm(m.group(2))
    out = []
    for key, want in WANTED.items():
        got = found.get(key)
        if got != want:
            out.append(f"{key} = {got or _DEFAULTS[key]} (want {want})")
    return out


def ensure_qemu_conf(path: Path = QEMU_CONF) -> bool:
    """Set the keys of ``WANTED`` in qemu.conf; True if the file changed.

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


def ensure_kvm_device(dev: Path = Path("/dev/kvm")) -> bool:
    """/dev/kvm as udev leaves it on a normal host (root:kvm 0660). Where nothing set it
    (no udev), libvirt finds it unusable for the QEMU user, drops its capabilities cache
    and re-probes QEMU at every VM start (~50 s here)."""
    if not dev.exists() or not _has_group("kvm"):
        return False
    gid = grp.getgrnam("kvm").gr_gid
    st = dev.stat()
    if st.st_gid == gid and st.st_mode & 0o660 == 0o660:
        return False
    os.chown(dev, 0, gid)
    os.chmod(dev, 0o660)
    return True


def ensure_qemu_user() -> bool:
    """Create the system user/group QEMU runs as, in group kvm where there is one."""
    if run_sync(["getent", "passwd", QEMU_USER]).returncode == 0:
        if _has_group("kvm") and QEMU_USER not in grp.getgrnam("kvm").gr_mem:
            run_sync(["usermod", "--append", "--groups", "kvm", QEMU_USER], check=True)
            return True
        return False
    if run_sync(["getent", "group", QEMU_USER]).returncode != 0:
        run_sync(["groupadd", "--system", QEMU_USER], check=True)
    extra = ["--groups", "kvm"] if _has_group("kvm") else []
    run_sync(
        ["useradd", "--system", "--gid", QEMU_USER, *extra, "--no-create-home",
         "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", QEMU_USER],
        check=True,
    )  # fmt: skip
    return True


def _has_group(name: str) -> bool:
    return run_sync(["getent", "group", name]).returncode == 0


def root_propagation(mountinfo: Path = Path("/proc/1/mountinfo")) -> str:
    """``shared`` or ``private`` (or ``slave``): how the root mount propagates."""
    for line in mountinfo.read_text().splitlines():
        f = line.split()
        if f[4] == "/":
            opt = f[6 : f.index("-")]
            if any(o.startswith("shared:") for o in opt):
                return "shared"
            return "slave" if any(o.startswith("master:") for o in opt) else "private"
    return "private"


def host_mount_issues() -> list[str]:
    prop = root_propagation()
    return [] if prop == "shared" else [f"the root mount is {prop} (want rshared)"]


def ensure_root_shared() -> bool:
    if not host_mount_issues():
        return False
    run_sync(["mount", "--make-rshared", "/"], check=True)
    return True


def _pids(name: str) -> list[int]:
    r = run_sync(["pgrep", "-x", name])
    return [int(p) for p in r.stdout.split()]


def libvirtd_running() -> bool:
    return bool(_pids("libvirtd") or _pids("virtqemud"))


def start_libvirtd(wait: float = 10.0) -> None:
    """Start virtlogd and libvirtd as daemons when they are not running (no systemd needed).

    libvirtd runs under criv's reaper (reaper.py): QEMUs are orphans, and libvirt counts
    a domain stopped only once its QEMU is reaped, which a container's PID 1 may delay."""
    if not _pids("virtlogd"):
        run_sync(["virtlogd", "-d"], check=True, capture=False)
    if not libvirtd_running():
        if shutil.which("libvirtd") is None:
            raise FileNotFoundError("libvirtd is not installed (make install)")
        run_sync([sys.executable, str(REAPER), "--detach", "libvirtd"], check=True, capture=False)
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
    """What `make services` does: the QEMU user, / rshared, qemu.conf as criv needs it,
    virtlogd and libvirtd up
    (restarted when qemu.conf changed under a running libvirtd). Returns what it did."""
    done = []
    if ensure_qemu_user():
        done.append(f"created system user {QEMU_USER}")
    if ensure_root_shared():
        done.append("made / rshared (as systemd does)")
    if ensure_kvm_device():
        done.append("set /dev/kvm to root:kvm 0660 (as udev does)")
    changed = ensure_qemu_conf()
    if changed:
        keys = ", ".join(f"{k} = {v}" for k, v in WANTED.items())
        done.append(f"set {keys} in {QEMU_CONF}")
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
