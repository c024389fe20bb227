"""Is libvirtd there and answering? For `criv doctor`: a bounded, synchronous check on a
connection of its own (the daemon's driver is not involved)."""

from __future__ import annotations

import threading

import libvirt

from criv.hypervisor.domain import DOMAIN_PREFIX
from criv.hypervisor.libvirtbase import DEFAULT_URI


def check_libvirt(uri: str = DEFAULT_URI, timeout: float = 20.0) -> tuple[bool, str]:
    """Synchronous reachability check for `criv doctor`: (ok, explanation), within
    ``timeout`` s (a hung libvirtd is a finding, not a hung doctor)."""
    answer: list[tuple[bool, str]] = []
    t = threading.Thread(target=lambda: answer.append(_probe(uri)), daemon=True)
    t.start()
    t.join(timeout)
    if not answer:
        return False, f"{uri} did not answer in {timeout:g}s (libvirtd hung?)"
    return answer[0]


def _probe(uri: str) -> tuple[bool, str]:
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as e:
        return False, f"cannot connect to {uri}: {e.get_error_message()}"
    try:
        lv = conn.getLibVersion()
        hv = conn.getVersion()
        n = len([d for d in conn.listAllDomains(0) if d.name().startswith(DOMAIN_PREFIX)])
    except libvirt.libvirtError as e:
        return False, f"{uri} answered with an error: {e.get_error_message()}"
    finally:
        conn.close()

    def ver(v: int) -> str:
        return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"

    return True, f"{uri}: libvirt {ver(lv)}, QEMU {ver(hv)}, {n} criv domain(s)"
