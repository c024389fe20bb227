"""What criv reads about one of its domains: libvirt's state for it, criv's metadata in it
(:data:`criv.hypervisor.domain.CRIV_NS`), and its counters. Blocking reads of a
``virDomain``: the driver (:class:`~criv.hypervisor.driver.Hypervisor`) calls them on its
worker threads.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

import libvirt

from criv.errors import NotFound
from criv.hypervisor.domain import CRIV_NS

_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting-down",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}
STOP_DETAILS = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED: "migrated",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED: "saved",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "failed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT: "snapshot",
}


def stop_reason(detail: int, reset: bool) -> str:
    """Why a domain stopped, from libvirt's STOPPED detail: "shutdown", "destroyed",
    "crashed", ...; "reset" for a shutdown QEMU made because the guest reset
    (``on_reboot=destroy``: a reboot, a triple fault, a firmware that found nothing to
    boot), which libvirt reports as a shutdown."""
    reason = STOP_DETAILS.get(detail, f"stopped({detail})")
    return "reset" if reason == "shutdown" and reset else reason


ALIVE = frozenset({"running", "blocked", "paused", "shutting-down", "suspended", "nostate"})


@dataclass(frozen=True)
class DomainInfo:
    name: str
    uuid: str
    state: str
    sandbox_id: str = ""
    owner: str = ""

    @property
    def alive(self) -> bool:
        return self.state in ALIVE


@dataclass(frozen=True)
class DomainStats:
    """A running domain's counters: vCPU time, and QEMU's resident memory (the guest's
    RAM as the host pays for it: there is no balloon to ask the guest)."""

    cpu_ns: int
    memory_bytes: int


def domain_info(dom: libvirt.virDomain) -> DomainInfo:
    state, _reason = dom.state()
    sandbox = owner = ""
    try:
        md = ET.fromstring(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, CRIV_NS))
        el = md.find("{*}sandbox")
        sandbox = (el.text or "") if el is not None else ""
        el = md.find("{*}owner")
        owner = (el.text or "") if el is not None else ""
    except (libvirt.libvirtError, ET.ParseError):
        pass
    return DomainInfo(dom.name(), dom.UUIDString(), _STATES.get(state, str(state)), sandbox, owner)


def console_pty(c: libvirt.virConnect, name: str) -> str:
    """The host pty of the running domain's serial console (``<serial type='pty'>``:
    libvirt puts the path it opened in the live XML)."""
    root = ET.fromstring(c.lookupByName(name).XMLDesc(0))
    for el in root.iterfind("devices/serial[@type='pty']/source"):
        path = el.get("path", "")
        if path.startswith("/dev/pts/") and path[9:].isdigit():
            return path
    raise NotFound(f"domain {name} has no serial console on a pty")
