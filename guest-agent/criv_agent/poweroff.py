"""Ending the VM from inside: sync, then an emergency restart (sysrq ``b``).

The guest init runs it (as ``criv-poweroff``) once the agent has exited; an agent started
with ``--power-off-on-shutdown`` runs it itself after ShutdownSandbox, which spares the
interpreter's teardown and a new Python's start in the init (~0.5 s of every pod stop
under TCG). Stdlib only.

Not reboot(2): the kernel's power-off and restart first run every driver's shutdown, and
the guest root's pmem driver flushes its device there. QEMU 7.2 keeps no state of a
virtio-pmem device across a migration, so in a template's clone that flush is never
answered and the VM would never stop. sysrq's emergency restart runs no driver's shutdown;
``reboot=t`` on the command line and ``on_reboot=destroy`` end the domain. Everything is
synced first, and what the pod keeps is on the host already (the share is virtio-fs).
reboot(2) stays the fallback where sysrq cannot be written.
"""

from __future__ import annotations

import ctypes
import os

RB_POWER_OFF = 0x4321FEDC
RB_AUTOBOOT = 0x01234567
SYSRQ_TRIGGER = "/proc/sysrq-trigger"


def power_off(sysrq: str = SYSRQ_TRIGGER) -> OSError:
    """Sync and end the VM; returns only if that failed, with the last error."""
    os.sync()
    try:
        with open(sysrq, "w") as f:
            f.write("b")  # emergency restart: returns only if the kernel has no sysrq
    except OSError:
        pass
    libc = ctypes.CDLL(None, use_errno=True)
    # POWER_OFF needs ACPI (q35); without it (microvm) it only halts, so restart instead:
    # reboot=t on the cmdline + on_reboot=destroy (or -no-reboot) end the VM as well
    acpi = os.path.exists("/sys/firmware/acpi/tables")
    libc.reboot(RB_POWER_OFF if acpi else RB_AUTOBOOT)
    return OSError(ctypes.get_errno(), "reboot(2)")


if __name__ == "__main__":
    raise power_off()
