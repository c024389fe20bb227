"""libvirt basics the driver and its neighbours share: the default URI, libvirt's event
loop (once per process), libvirt errors as criv's, and a running domain's QEMU pid."""

from __future__ import annotations

import threading
from pathlib import Path

import libvirt

from criv.errors import CrivError, FailedPrecondition, Internal, NotFound, Unavailable
from criv.procscan import process_start_time

DEFAULT_URI = "qemu:///system"
# where libvirt's QEMU driver keeps each running domain's pid file
QEMU_PID_DIR = Path("/run/libvirt/qemu")

_event_loop_lock = threading.Lock()
_event_loop_started = False


def start_libvirt_event_loop() -> None:
    """libvirt's default event implementation, once per process, on a daemon thread."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()
        # libvirt prints every error to stderr by default; criv raises or logs them itself
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="criv-libvirt-events", daemon=True).start()
        _event_loop_started = True


def translate(e: libvirt.libvirtError, what: str) -> CrivError:
    """A libvirt error as criv's: the caller sees NotFound/FailedPrecondition/Unavailable."""
    code = e.get_error_code()
    msg = f"{what}: {e.get_error_message() or e}"
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return NotFound(msg)
    if code == libvirt.VIR_ERR_OPERATION_INVALID:
        return FailedPrecondition(msg)
    if code in (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_RPC):
        return Unavailable(msg)
    return Internal(msg)


def qemu_pid(name: str) -> int:
    """The running domain's QEMU pid from libvirt's pid file, checked against the
    process's command line (0: not running). Blocking: call it off the event loop."""
    try:
        pid = int((QEMU_PID_DIR / f"{name}.pid").read_text().strip())
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return 0
    return pid if f"guest={name}".encode() in cmd and process_start_time(pid) else 0
