"""`criv doctor`: can this machine run criv's pods, and if not, why?

One line per check, ``OK``/``WARN``/``FAIL`` with an explanation. The exit status is non-zero
when criv cannot run pods (any FAIL); WARN marks something slower or degraded (TCG instead of
KVM, a registry mirror down) that still works.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from criv.config import Config
from criv.network.readiness import network_readiness

Level = Literal["OK", "WARN", "FAIL"]
QEMU = "qemu-system-x86_64"


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    detail: str

    def line(self) -> str:
        return f"{self.level:<4} {self.name}: {self.detail}"


def _uses_vm(cfg: Config) -> bool:
    return "vm" in cfg.runtime.handlers.values()


def guest_image_cache(cfg: Config) -> Path:
    """The guest image cache: ``vm.guest_image_cache`` if configured, else under the state dir."""
    configured = cfg.vm.guest_image_cache
    return Path(configured) if configured else Path(cfg.state_dir) / "cache" / "guest-image"


def check_qemu() -> Check:
    exe = shutil.which(QEMU)
    if exe is None:
        return Check("qemu", "FAIL", f"{QEMU} not found: apt-get install qemu-system-x86")
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check("qemu", "FAIL", f"{exe} --version failed: {e}")
    return Check("qemu", "OK", (out.splitlines() or ["?"])[0])


def check_accel(cfg: Config) -> Check:
    from criv.guestimage import cached_image
    from criv.hypervisor.kvm import choose_accel

    # with the guest image the probe boots the real kernel, the only conclusive test
    img = cached_image(guest_image_cache(cfg))
    choice = choose_accel(
        cfg.vm.accel,
        Path(cfg.run_dir) / "kvm-probe.json",
        img.kernel if img else None,
        img.initrd if img else None,
        root_disk=img.root_disk if img else None,
    )
    if choice.accel == "kvm":
        level: Level = "OK" if "works" in choice.reason else "WARN"
        return Check("accel", level, f"KVM: {choice.reason}")
    return Check(
        "accel",
        "WARN",
        f"TCG: {choice.reason}. VMs work, several times slower to boot; "
        "set vm.accel=kvm only where the probe passes",
    )


def check_libvirt(cfg: Config) -> list[Check]:
    from criv.hypervisor.hostsetup import host_mount_issues, qemu_conf_issues
    from criv.hypervisor.reachability import check_libvirt as probe

    level: Level = "FAIL" if _uses_vm(cfg) else "WARN"
    ok, detail = probe()
    out = [
        Check(
            "libvirt",
            "OK" if ok else level,
            detail + ("" if ok else "; start: criv doctor --fix (or make services)"),
        )
    ]
    issues = qemu_conf_issues() + host_mount_issues()
    if issues:
        out.append(
            Check(
                "qemu.conf",
                level,
                "vm pods need QEMU unprivileged (criv-qemu) in a mount namespace of its own, "
                "no relabelling, and / rshared: "
                + "; ".join(issues)
                + "; `criv doctor --fix` sets it, then restart libvirtd",
            )
        )
    else:
        out.append(
            Check(
                "qemu.conf",
                "OK",
                'user = "root", group = "root" (9p passthrough), namespaces = [] (bind mounts)',
            )
        )
    return out


def qemu_devices() -> str:
    exe = shutil.which(QEMU)
    if exe is None:
        return ""
    try:
        r = subprocess.run(
            [exe, "-machine", "none", "-device", "help"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return r.stdout + r.stderr


def check_vsock(cfg: Config) -> Check:
    kernel = os.path.exists("/dev/vhost-vsock")
    want = cfg.vm.vsock
    has_user = '"vhost-user-vsock-pci"' in qemu_devices()
    if want == "kernel":
        # vm pods refuse it (criv/sandbox/vm.py): no host-side vsock forwarder wired yet
        level0: Level = "FAIL" if _uses_vm(cfg) else "WARN"
        extra = "" if kernel else "; /dev/vhost-vsock is missing too (modprobe vhost_vsock)"
        return Check(
            "vsock", level0, f"vm.vsock=kernel is not implemented yet: use auto or backend{extra}"
        )
    if has_user:
        why = f"vm.vsock={want}" + (" (/dev/vhost-vsock present but not used)" if kernel else "")
        return Check(
            "vsock", "OK", f"{why}: criv's userspace backend via QEMU vhost-user-vsock-pci"
        )
    level: Level = "FAIL" if _uses_vm(cfg) else "WARN"
    return Check("vsock", level, "no /dev/vhost-vsock and QEMU lacks vhost-user-vsock-pci")


def check_guest_image(cfg: Config) -> Check:
    from criv.guestimage import cached_image

    cache = guest_image_cache(cfg)
    img = cached_image(cache)
    if img is not None:
        files = [img.initrd, *([img.root_disk] if img.root_disk else [])]
        sizes = ", ".join(f"{f.name} {f.stat().st_size >> 20} MiB" for f in files)
        return Check("guest image", "OK", f"{img.directory} (kernel {img.kernel_release}, {sizes})")
    level: Level = "FAIL" if _uses_vm(cfg) else "WARN"
    return Check(
        "guest image",
        level,
        f"not built for the current sources in {cache}: run `criv image build` "
        "(or `make guest-image`; ~15 min the first time, cached afterwards)",
    )


def check_templates(cfg: Config) -> Check:
    from criv.sandbox.vm.template import listing, template_root

    if cfg.vm.template == "off":
        return Check("templates", "OK", "vm.template off: every pod VM boots cold")
    root = template_root(cfg)
    ready = listing(root)
    if not ready:
        return Check(
            "templates", "OK", f"none yet in {root}: the first pod of each shape boots cold"
        )
    now = time.time()
    parts = [f"{k[:12]} ({b >> 20} MiB, {(now - t) / 3600:.1f} h old)" for k, b, t in ready]
    return Check("templates", "OK", f"{len(ready)} in {root}: " + ", ".join(parts))


def check_uefi(cfg: Config) -> Check:
    """OVMF, for vm-image disks that only boot under UEFI (a WARN: other pods need none)."""
    missing = [p for p in (cfg.vm.uefi_code, cfg.vm.uefi_vars) if not Path(p).is_file()]
    if missing:
        return Check(
            "uefi firmware", "WARN",
            f"{missing[0]} missing: vm-image disks that need UEFI are refused "
            "(apt-get install ovmf)",
        )  # fmt: skip
    return Check("uefi firmware", "OK", f"OVMF {cfg.vm.uefi_code} (vm-image disks that need UEFI)")


def check_crun(cfg: Config) -> Check:
    exe = shutil.which(cfg.runtime.crun)
    if exe is None:
        return Check("crun", "FAIL", f"{cfg.runtime.crun!r} not found: apt-get install crun")
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check("crun", "FAIL", f"{exe} --version failed: {e}")
    return Check(
        "crun", "OK", f"{exe}: {(out.splitlines() or ['?'])[0]} (host pods; the guest has its own)"
    )


def check_cni(cfg: Config) -> Check:
    r = network_readiness(cfg.cni)
    if r.ready:
        return Check("cni", "OK", f"config in {cfg.cni.conf_dir}, plugins found")
    return Check("cni", "FAIL", f"{r.reason}: {r.message}")


def _reachable(url: str, timeout: float) -> str:
    """'' when an HTTP server answered (any status), else the error."""
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return ""
    except urllib.error.HTTPError:
        return ""  # 401/404 from /v2/ still means a registry is there
    except (urllib.error.URLError, OSError, ValueError) as e:
        return str(getattr(e, "reason", e))


def check_registries(cfg: Config, timeout: float = 3.0) -> list[Check]:
    reg = cfg.registries
    out: list[Check] = []
    if reg.auth_file and not Path(reg.auth_file).is_file():
        out.append(Check("registry auth", "WARN", f"registries.auth_file {reg.auth_file} missing"))
    if not reg.mirrors:
        out.append(Check("registries", "OK", "no mirrors configured: pulls go to each registry"))
        return out
    for host, endpoints in sorted(reg.mirrors.items()):
        for ep in endpoints:
            err = _reachable(ep.rstrip("/") + "/v2/", timeout)
            if err:
                out.append(Check(f"mirror {host}", "WARN", f"{ep} unreachable ({err}); falls back"))
            else:
                out.append(Check(f"mirror {host}", "OK", f"{ep} answers"))
    return out


def check_state(cfg: Config) -> list[Check]:
    """What recovery set aside: quarantined records, CNI DELs still failing."""
    from criv.sandbox.cnidel import list_pending, pending_dir
    from criv.sandbox.quarantine import list_quarantined, quarantine_dir

    state = Path(cfg.state_dir)
    out: list[Check] = []
    for q in list_quarantined(state):
        out.append(
            Check(
                f"quarantined {q.kind} {q.id[:12]}",
                "WARN",
                f"record unreadable at {q.at or '?'} ({q.reason}); moved to "
                f"{q.record or '(no file)'}; {q.what_to_do()}; notes in {quarantine_dir(state)}",
            )
        )
    for p in list_pending(state):
        out.append(
            Check(
                f"pending CNI DEL {p.pod_id[:12]}",
                "WARN",
                f"network {p.network_name or '(current list)'} of pod {p.namespace}/{p.name} "
                f"still holds its address (netns {p.netns}): {p.attempts} tries failed, last: "
                f"{p.last_error}. criv retries at start-up and at each pod stop; fix the "
                f"plugin (see its error) or, once its IPAM is freed by hand, remove "
                f"{pending_dir(state) / (p.pod_id + '.json')} and the netns",
            )
        )
    if not out:
        out.append(Check("state", "OK", "no quarantined records, no pending CNI DELs"))
    return out


def collect(cfg: Config) -> list[Check]:
    checks: list[Check] = [check_qemu()]
    steps: list[Callable[[], Check | list[Check]]] = [
        lambda: check_accel(cfg),
        lambda: check_libvirt(cfg),
        lambda: check_vsock(cfg),
        lambda: check_guest_image(cfg),
        lambda: check_templates(cfg),
        lambda: check_uefi(cfg),
        lambda: check_crun(cfg),
        lambda: check_cni(cfg),
        lambda: check_registries(cfg),
        lambda: check_state(cfg),
    ]
    for step in steps:
        try:
            got = step()
        except Exception as e:  # a broken check must not hide the others
            got = Check(getattr(step, "__name__", "check"), "FAIL", f"check crashed: {e!r}")
        checks += got if isinstance(got, list) else [got]
    return checks


def run_doctor(config: Config, fix: bool = False, print_line: Callable[[str], None] = print) -> int:
    """Print the checks; 0 when criv can run pods, 1 otherwise. ``fix`` repairs host setup."""
    if fix:
        from criv.hypervisor.hostsetup import ensure_host_services

        for line in ensure_host_services():
            print_line(f"fixed: {line}")
    checks = collect(config)
    for c in checks:
        print_line(c.line())
    failed = [c for c in checks if c.level == "FAIL"]
    if failed:
        print_line(f"criv cannot run pods: {len(failed)} check(s) failed")
        return 1
    print_line(
        "criv can run pods" + (" (with warnings)" if any(c.level == "WARN" for c in checks) else "")
    )
    return 0
