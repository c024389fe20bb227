"""Live changes to a running domain's size (UpdatePodSandboxResources). Blocking libvirt
calls: the driver (:class:`~criv.hypervisor.driver.Hypervisor`) runs them on its worker
threads with deadlines and translates their errors.

vCPUs: ``setVcpusFlags(n, VIR_DOMAIN_AFFECT_LIVE)`` hot-plugs (QEMU ``device_add`` of a CPU,
announced to the guest through ACPI). Only the slots above ``<vcpu current=…>`` exist, so
a domain booted without them cannot grow. A hot-plugged vCPU comes up offline in the guest;
the guest agent onlines it (guest-agent/criv_agent/cpuonline.py). Unplugging works in the
guest but libvirt cannot track it with QEMU 7.2 (:data:`criv.hypervisor.sizing.VCPU_UNPLUG`),
so the sizing policy never asks for fewer vCPUs.

Memory: ``setMemoryFlags(KiB, VIR_DOMAIN_AFFECT_LIVE)`` sets the virtio balloon's target,
up to the domain's ``<memory>``; the guest's balloon driver then hands pages to QEMU (which
frees them on the host) or takes them back, on its own time. ``memoryStats()["actual"]`` is
what the guest reports it has reached. Before a shrink, :func:`guest_memory_use` asks the
guest what it uses (the balloon's statistics queue, turned on only for that): a balloon
that takes more than the guest has free leaves it nothing, and the guest's next allocation
OOM-kills one of its processes.
"""

from __future__ import annotations

import time

import libvirt


def vcpus(conn: libvirt.virConnect, name: str) -> tuple[int, int]:
    """(live vCPUs, most vCPUs) of the running domain."""
    dom = conn.lookupByName(name)
    live = dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE)
    most = dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_VCPU_MAXIMUM)
    return int(live), int(most)


def set_vcpus(conn: libvirt.virConnect, name: str, count: int) -> int:
    """Plug or unplug vCPUs until the domain has ``count``; returns the live count."""
    dom = conn.lookupByName(name)
    if dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE) != count:
        dom.setVcpusFlags(count, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    return int(dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE))


def memory(conn: libvirt.virConnect, name: str) -> int:
    """MiB the running domain's guest has now, behind its balloon."""
    return int(conn.lookupByName(name).memoryStats().get("actual", 0)) // 1024


def set_memory(conn: libvirt.virConnect, name: str, mib: int) -> None:
    """Set the balloon's target: the guest is to have ``mib`` MiB."""
    conn.lookupByName(name).setMemoryFlags(mib * 1024, libvirt.VIR_DOMAIN_AFFECT_LIVE)


def guest_memory_use(conn: libvirt.virConnect, name: str, wait: float = 5.0) -> tuple[int, int]:
    """(MiB the guest has, MiB of it in use: all but MemAvailable), from fresh balloon
    statistics. Turns the statistics on (every second) until the guest has reported once,
    then off again: an idle VM is not woken for them. (0, 0) if it did not report in
    ``wait`` s (a guest without the balloon driver, or one that does not answer)."""
    dom = conn.lookupByName(name)
    since = int(time.time())
    dom.setMemoryStatsPeriod(1, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    try:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            stats = dom.memoryStats()
            if int(stats.get("last_update", 0)) >= since and "usable" in stats:
                actual, usable = int(stats["actual"]), int(stats["usable"])
                return actual // 1024, max(actual - usable, 0) // 1024
            time.sleep(0.1)
        return 0, 0
    finally:
        dom.setMemoryStatsPeriod(0, libvirt.VIR_DOMAIN_AFFECT_LIVE)
