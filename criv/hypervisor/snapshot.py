"""A running domain's state to a file, and a paused domain's state from one (templates).

Blocking libvirt calls, each with an async form below that the driver
(:meth:`~criv.hypervisor.driver.Hypervisor.on_live`) runs on its worker threads with a
deadline, its errors translated.

libvirt's own save/restore keeps a domain's name and UUID (one restore at a time), so the
state moves through QEMU's migration commands over libvirt's monitor passthrough: ``stop``
then ``migrate`` to a file descriptor handed to QEMU (``getfd``) saves it; a domain started
with ``-incoming defer`` and paused loads it with ``migrate-incoming``, as many times over
as there are clones. The stream holds device state only (``x-ignore-shared``: the guest
RAM, a shared memfd, is left out); the RAM goes to a sparse file of its non-zero pages
beside it (:mod:`.guestram`) and into the clone's memfd before the device state. A
vhost-user device is not migratable in QEMU 7.2, so a template has none and its clones get
theirs hot-plugged (:func:`hotplug`, :func:`free_root_ports`).
"""

from __future__ import annotations

import json
import os
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING, Any

import libvirt
import libvirt_qemu  # type: ignore[import-untyped]

from criv.errors import FailedPrecondition
from criv.hypervisor import guestram
from criv.hypervisor.libvirtbase import qemu_pid

if TYPE_CHECKING:
    from criv.hypervisor.driver import Hypervisor

POLL = 0.02
FD_NAME = "criv-state"


def _qmp(dom: libvirt.virDomain, cmd: dict[str, Any], files: list[int] | None = None) -> Any:
    text = json.dumps(cmd)
    if files:
        out = libvirt_qemu.qemuMonitorCommandWithFiles(dom, text, files, 0)[0]
    else:
        out = libvirt_qemu.qemuMonitorCommand(dom, text, 0)
    reply = json.loads(out)
    if "error" in reply:
        raise FailedPrecondition(f"QEMU {cmd['execute']}: {reply['error'].get('desc', reply)}")
    return reply.get("return")


def _wait_migration(dom: libvirt.virDomain, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        st = _qmp(dom, {"execute": "query-migrate"}) or {}
        status = st.get("status", "")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise FailedPrecondition(f"{what}: {st.get('error-desc', status)}")
        if time.monotonic() > deadline:
            raise FailedPrecondition(f"{what}: still {status or 'not started'} after {timeout}s")
        time.sleep(POLL)


def _ignore_shared(dom: libvirt.virDomain) -> None:
    caps = [{"capability": "x-ignore-shared", "state": True}]
    _qmp(dom, {"execute": "migrate-set-capabilities", "arguments": {"capabilities": caps}})


def _pid(name: str) -> int:
    pid = qemu_pid(name)
    if pid <= 0:
        raise FailedPrecondition(f"domain {name} has no QEMU process")
    return pid


def save_state(
    conn: libvirt.virConnect, name: str, state: Path, ram: Path, ram_bytes: int, timeout: float
) -> int:
    """Pause the domain and write its device state to ``state`` and its guest RAM (of
    ``ram_bytes``) to ``ram`` (both 0600); bytes of RAM data saved."""
    dom = conn.lookupByName(name)
    dom.suspend()
    _ignore_shared(dom)
    fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _qmp(dom, {"execute": "getfd", "arguments": {"fdname": FD_NAME}}, [fd])
    finally:
        os.close(fd)  # QEMU holds its own copy
    _qmp(dom, {"execute": "migrate", "arguments": {"uri": f"fd:{FD_NAME}"}})
    _wait_migration(dom, f"saving domain {name}", timeout)
    try:
        return guestram.save_ram(_pid(name), ram_bytes, ram)
    except OSError as e:
        raise FailedPrecondition(f"saving domain {name}'s RAM: {e}") from e


def load_state(
    conn: libvirt.virConnect, name: str, state: Path, ram: Path, ram_bytes: int, timeout: float
) -> None:
    """Load ``ram`` and ``state`` into a domain started paused with ``-incoming defer``,
    then run it."""
    dom = conn.lookupByName(name)
    _ignore_shared(dom)
    try:
        guestram.load_ram(_pid(name), ram_bytes, ram)
    except OSError as e:
        raise FailedPrecondition(f"loading domain {name}'s RAM: {e}") from e
    fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _qmp(dom, {"execute": "getfd", "arguments": {"fdname": FD_NAME}}, [fd])
    finally:
        os.close(fd)
    _qmp(dom, {"execute": "migrate-incoming", "arguments": {"uri": f"fd:{FD_NAME}"}})
    _wait_migration(dom, f"loading domain {name}", timeout)
    dom.resume()


def free_root_ports(conn: libvirt.virConnect, name: str) -> list[int]:
    """Bus numbers of the domain's PCIe root ports with nothing plugged in, lowest first."""
    return empty_root_ports(conn.lookupByName(name).XMLDesc(0))


def empty_root_ports(domain_xml: str) -> list[int]:
    """:func:`free_root_ports` of a domain's live XML."""
    root = ET.fromstring(domain_xml)
    ports = {
        int(c.get("index", "-1"))
        for c in root.iter("controller")
        if c.get("type") == "pci" and c.get("model") == "pcie-root-port"
    }
    used = {
        int(a.get("bus", "0"), 16)
        for a in root.iter("address")
        if a.get("type") == "pci" and a.get("bus") is not None
    }
    return sorted(ports - used)


def hotplug(
    conn: libvirt.virConnect, name: str, qmp: list[dict[str, Any]], device_xmls: list[str]
) -> None:
    """Hot-plug, in this order: by QMP commands what libvirt has no element for (criv's
    vhost-user vsock), then devices libvirt knows (they stay in its live XML)."""
    dom = conn.lookupByName(name)
    for cmd in qmp:
        _qmp(dom, cmd)
    for xml in device_xmls:
        dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)


# --- async, through the driver ---------------------------------------------------------


async def save(
    hv: Hypervisor, name: str, state: Path, ram: Path, ram_bytes: int, timeout: float
) -> int:
    """Pause the domain; its device state to ``state``, its RAM to ``ram``; bytes of RAM
    data."""
    return await hv.on_live(
        save_state, name, state, ram, ram_bytes, timeout,
        what=f"saving domain {name}", timeout=timeout + 30,
    )  # fmt: skip


async def load(
    hv: Hypervisor, name: str, state: Path, ram: Path, ram_bytes: int, timeout: float
) -> None:
    """Load a saved RAM and state into a paused ``-incoming`` domain and run it."""
    await hv.on_live(
        load_state, name, state, ram, ram_bytes, timeout,
        what=f"loading domain {name}", timeout=timeout + 30,
    )  # fmt: skip


async def root_ports(hv: Hypervisor, name: str) -> list[int]:
    """Buses of the running domain's empty PCIe root ports (for hot-plugs)."""
    return await hv.on_live(free_root_ports, name, what=f"root ports of {name}")


async def plug(hv: Hypervisor, name: str, qmp: list[dict[str, Any]], xmls: list[str]) -> None:
    """Hot-plug into the running domain: QMP commands first, then libvirt devices."""
    await hv.on_live(hotplug, name, qmp, xmls, what=f"hot-plug into {name}")
