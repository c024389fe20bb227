"""Under TCG, the agent's helper processes load at fixed addresses (``--fixed-helper-layout``).

QEMU 7.2's TCG keys a translated block on the guest's virtual PC as well as its physical
address, so a process whose binary and libraries ASLR maps somewhere new has every
instruction translated again, even though the code pages (on the DAX-mapped guest root)
are the same. Every CreateContainer, StartContainer and ExecSync runs crun anew, and
SetupSandbox runs ``ip``: measured in a clone (TCG, ``info jit``), a first container's
create added 12 MiB of translations and its start filled the 64 MiB cache (flushed, all
translated again), and a second container's create added 12 MiB more of the same code.

So the agent clears ASLR for itself (``ADDR_NO_RANDOMIZE`` takes effect at its
children's ``execve``, not its own) and every helper it runs (crun, ip, nsenter, the
namespace holder) inherits it. Containers get ASLR back: the OCI spec the agent writes
names ``linux.personality`` ``LINUX``, which crun applies in the container's init and in
every ``crun exec`` before it runs the container's binary (a ``personality(2)`` call sets
the whole persona, flags included). The host passes the flag only under TCG: with KVM
there is nothing to translate.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("criv_agent")

ADDR_NO_RANDOMIZE = 0x0040000
_QUERY = 0xFFFFFFFF  # personality(0xffffffff) returns the persona and changes nothing


def fix_helper_layout() -> int:
    """Set ``ADDR_NO_RANDOMIZE`` on this process (children exec'd later inherit it);
    the persona now in effect. A failure only costs speed: it is logged, not raised."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.personality.restype = ctypes.c_int
    libc.personality.argtypes = [ctypes.c_ulong]
    current = libc.personality(_QUERY)
    if current < 0 or libc.personality(current | ADDR_NO_RANDOMIZE) < 0:
        log.warning("helpers keep ASLR: personality: %s", os.strerror(ctypes.get_errno()))
    persona: int = libc.personality(_QUERY)
    if persona & ADDR_NO_RANDOMIZE:
        log.info("helpers run at fixed addresses (TCG): persona %#x", persona)
    return persona
