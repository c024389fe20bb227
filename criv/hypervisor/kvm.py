"""KVM or TCG: a real probe, because /dev/kvm existing does not mean a guest can run.

On this project's CI machines /dev/kvm is nested "PVM" KVM: QEMU starts, and a standard
guest spins forever at "Booting from ROM". So the probe boots something: a 300-byte PVH ELF
built here that, once entered in 32-bit protected mode, writes a marker to the serial port
and leaves through QEMU's isa-debug-exit device. It takes the same path as the real guest
(SeaBIOS, the pvh.bin option ROM, the PVH entry), needs no guest image, and finishes in well
under a second where KVM works. The result is cached per host boot (boot_id).
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from criv.hypervisor.spec import ROOT_DISK_CMDLINE, root_disk_qemu_args

log = logging.getLogger(__name__)

Accel = Literal["kvm", "tcg"]
MARKER = b"CRIV-PROBE-OK"
# printed by images/init in criv.test mode
GUEST_MARKER = b"CRIV-GUEST-MARKER"
# isa-debug-exit: QEMU exits with (value << 1) | 1
EXIT_VALUE = 0x21
EXIT_CODE = (EXIT_VALUE << 1) | 1
LOAD_ADDR = 0x100000
CODE_OFFSET = 0x100
QEMU = "qemu-system-x86_64"
PROBE_MEMORY_MIB = 256
CACHE_VERSION = 1


@dataclass(frozen=True)
class AccelChoice:
    accel: Accel
    reason: str
    probe_seconds: float = 0.0
    boot_id: str = ""

    def describe(self) -> str:
        return f"accel={self.accel}: {self.reason}"


def probe_elf() -> bytes:
    """A minimal 32-bit ELF with a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)."""
    code = bytearray(b"\x66\xba\xf8\x03")  # mov dx, 0x3f8 (COM1 data)
    for ch in MARKER + b"\n":
        code += bytes([0xB0, ch, 0xEE])  # mov al, ch; out dx, al
    code += b"\x66\xba\xf4\x00"  # mov dx, 0xf4 (isa-debug-exit)
    code += bytes([0xB0, EXIT_VALUE, 0xEE])  # mov al, EXIT_VALUE; out dx, al
    code += b"\xf4\xeb\xfd"  # hlt; jmp hlt (not reached)
    entry = LOAD_ADDR + CODE_OFFSET
    note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", entry)
    ehdr_size, phdr_size = 52, 32
    note_off = ehdr_size + 2 * phdr_size
    total = CODE_OFFSET + len(code)
    ehdr = struct.pack(
        "<16sHHIIIIIHHHHHH",
        b"\x7fELF\x01\x01\x01" + b"\0" * 9,  # 32-bit, little endian, version 1
        2,  # ET_EXEC
        3,  # EM_386
        1,
        entry,
        ehdr_size,  # e_phoff
        0,  # e_shoff
        0,
        ehdr_size,
        phdr_size,
        2,  # e_phnum
        40,
        0,
        0,
    )
    # PT_LOAD the whole file at LOAD_ADDR (offset 0 == vaddr mod align), then PT_NOTE
    load = struct.pack("<IIIIIIII", 1, 0, LOAD_ADDR, LOAD_ADDR, total, total, 5, 0x1000)
    pnote = struct.pack("<IIIIIIII", 4, note_off, 0, 0, len(note), len(note), 4, 4)
    head = ehdr + load + pnote + note
    return head + b"\0" * (CODE_OFFSET - len(head)) + bytes(code)


def _qemu_base(exe: str, accel: Accel, cpu: str) -> list[str]:
    cmd = [exe, "-accel", accel, "-machine", "q35", "-m", str(PROBE_MEMORY_MIB), "-nodefaults"]
    cmd += ["-no-user-config", "-display", "none", "-serial", "stdio", "-monitor", "none"]
    # the same CPU model the domain gets: host-passthrough under KVM
    return cmd + (["-cpu", cpu] if accel == "kvm" else [])


def _run_until(
    cmd: list[str], marker: bytes, timeout: float
) -> tuple[bool, int | None, str, float]:
    """Run ``cmd`` until ``marker`` shows on stdout, it exits, or ``timeout``; always reaped."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    os.set_blocking(proc.stdout.fileno(), False)
    seen = b""
    found = False
    try:
        while time.monotonic() - t0 < timeout:
            ready, _, _ = select.select([proc.stdout], [], [], 0.05)
            if ready:
                chunk = proc.stdout.read() or b""
                seen = (seen + chunk)[-4096:]
                if marker in seen:
                    found = True
                    break
                if not chunk and proc.poll() is not None:
                    break
            elif proc.poll() is not None:
                break
    finally:
        secs = time.monotonic() - t0
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        err = proc.stderr.read().decode(errors="replace").strip()
        proc.stdout.close()
        proc.stderr.close()
    return found, proc.returncode, (err.splitlines() or [""])[-1], secs


def run_probe(
    accel: Accel,
    timeout: float = 5.0,
    kernel: Path | None = None,
    initrd: Path | None = None,
    cpu: str = "host",
    qemu: str = QEMU,
    root_disk: Path | None = None,
) -> tuple[bool, str, float]:
    """Boot a probe guest under ``accel``; (ok, detail, seconds).

    Without ``kernel``: the tiny PVH ELF. With it (and ``initrd``, and the image's root
    disk): the real guest in its ``criv.test=boot`` mode, which is what must work (on
    nested PVM KVM the tiny guest can run while the real kernel hangs).
    """
    exe = shutil.which(qemu)
    if exe is None:
        return False, f"{qemu} not found", 0.0
    with tempfile.TemporaryDirectory(prefix="criv-kvm-probe-") as d:
        cmd = _qemu_base(exe, accel, cpu)
        if kernel is None:
            elf = Path(d) / "probe.elf"
            elf.write_bytes(probe_elf())
            cmd += ["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-kernel", str(elf)]
            marker, what = MARKER, "tiny probe guest"
        else:
            cmd += ["-device", "virtio-rng-pci", "-no-reboot", "-kernel", str(kernel)]
            cmd += ["-initrd", str(initrd)] if initrd else []
            append = "console=ttyS0 quiet panic=-1 reboot=t criv.test=boot"
            if root_disk is not None:
                cmd += root_disk_qemu_args(root_disk, PROBE_MEMORY_MIB)
                append += " " + ROOT_DISK_CMDLINE
            cmd += ["-append", append]
            marker, what = GUEST_MARKER, f"guest kernel {kernel.name}"
        found, rc, err, secs = _run_until(cmd, marker, timeout)
    if found:
        return True, f"{what} reached its marker in {secs:.2f} s", secs
    if rc is not None and rc < 0 and secs >= timeout - 0.1:
        return False, f"{what}: no marker within {timeout:.0f} s (guest hangs)", secs
    return False, f"{what}: qemu exited {rc}: {err or 'no marker'}", secs


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def choose_accel(
    wanted: Literal["auto", "kvm", "tcg"],
    cache_file: Path | None = None,
    kernel: Path | None = None,
    initrd: Path | None = None,
    timeout: float = 5.0,
    guest_timeout: float = 15.0,
    root_disk: Path | None = None,
) -> AccelChoice:
    """The accelerator for VMs: config ``vm.accel`` (auto|kvm|tcg) + the probe, logged.

    ``auto``: stage 1 boots the tiny guest under KVM with the domain's CPU model; stage 2 (when
    ``kernel`` is given: the guest image) boots the real guest to its init marker. A definitive
    answer (stage 1 failed, or stage 2 ran) is cached per host boot in ``cache_file``; a stage-1
    pass without a kernel to verify is provisional and not cached.
    ``kvm`` is honoured even if the probe fails (the operator insists), with a warning.
    """
    if wanted == "tcg":
        choice = AccelChoice("tcg", "vm.accel=tcg in the config")
        log.info("VM acceleration: %s", choice.describe())
        return choice
    bid = boot_id()
    key = _cache_key(bid, kernel)
    found = _read_cache(cache_file, key)
    if found is None:
        found, final = _probe(bid, timeout, kernel, initrd, guest_timeout, root_disk)
        if final:
            _write_cache(cache_file, key, found)
    if wanted == "kvm" and found.accel != "kvm":
        choice = AccelChoice("kvm", f"vm.accel=kvm in the config, but: {found.reason}", 0, bid)
        log.warning("VM acceleration: %s", choice.describe())
        return choice
    log.info("VM acceleration: %s", found.describe())
    return found


def kvm_node_problem() -> str:
    """Why /dev/kvm cannot even be opened ("" when it can)."""
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm not accessible"
    return ""


def _probe(
    bid: str,
    timeout: float,
    kernel: Path | None,
    initrd: Path | None,
    guest_timeout: float,
    root_disk: Path | None = None,
) -> tuple[AccelChoice, bool]:
    """(choice, final): final when the answer does not depend on a later guest image."""
    if problem := kvm_node_problem():
        return AccelChoice("tcg", f"{problem}: software emulation (TCG)", 0.0, bid), True
    ok, detail, secs = run_probe("kvm", timeout)
    if not ok:
        reason = f"/dev/kvm exists but a guest cannot run on it ({detail}); using TCG"
        return AccelChoice("tcg", reason, secs, bid), True
    if kernel is None:
        reason = f"/dev/kvm works ({detail}); not yet verified with the guest kernel"
        return AccelChoice("kvm", reason, secs, bid), False
    ok, detail, secs2 = run_probe("kvm", guest_timeout, kernel, initrd, root_disk=root_disk)
    if ok:
        return AccelChoice("kvm", f"/dev/kvm works: {detail}", secs + secs2, bid), True
    reason = f"/dev/kvm runs a tiny guest but not the guest kernel ({detail}); using TCG"
    return AccelChoice("tcg", reason, secs + secs2, bid), True


def _cache_key(bid: str, kernel: Path | None) -> str:
    if not bid:
        return ""
    if kernel is None:
        return bid
    try:
        st = kernel.stat()
    except OSError:
        return bid
    return f"{bid}:{kernel}:{st.st_size}:{st.st_mtime_ns}"


def _read_cache(path: Path | None, key: str) -> AccelChoice | None:
    if path is None or not key:
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("version") != CACHE_VERSION or data.get("key") != key:
            return None
        return AccelChoice(data["accel"], data["reason"], data["probe_seconds"], data["boot_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(path: Path | None, key: str, choice: AccelChoice) -> None:
    if path is None or not key:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "key": key, **asdict(choice)}))
        tmp.replace(path)
    except OSError as e:
        log.warning("cannot cache the KVM probe result in %s: %s", path, e)
