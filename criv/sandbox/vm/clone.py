"""A pod VM started as a clone of its shape's template (:mod:`.template`), or cold.

The clone's domain is the template's (same XML but its name, UUID and console log), started
paused with ``-incoming defer``; the template's state is loaded into it and it runs on from
where the template was saved: its agent already listens. Then what is the pod's own is
hot-plugged into its empty PCIe root ports: the share (virtiofsd), the NIC (the pod's tap
and MAC) and the vsock device (the pod's backend). The agent takes the pod's identity
(clock, RNG reseed, machine-id, share mount, NIC) at SetupSandbox.

A spare (:mod:`.spares`) is such a clone started, loaded and run before its pod came:
the pod only plugs its devices in.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from criv import metrics
from criv.errors import CrivError, FailedPrecondition
from criv.hypervisor import snapshot
from criv.hypervisor.domain import Domain, TapInterface, VhostUserVsock, VirtioFs, device_xml
from criv.hypervisor.domaininfo import DomainInfo
from criv.hypervisor.driver import Hypervisor
from criv.hypervisor.spec import (
    SHARE_TAG,
    PodVm,
    domain_name,
    mac_for,
    pod_domain,
    template_shape,
)
from criv.sandbox.vm.coldpath import StepClock
from criv.sandbox.vm.host import VmHost
from criv.sandbox.vm.spares import Spare, SpareVms
from criv.sandbox.vm.template import Template, Templates, template_key

log = logging.getLogger("criv.sandbox.vm")

LOAD_TIMEOUT = 60.0
HOTPLUGS = 3  # share, NIC, vsock


def clone_domain(vm: PodVm) -> Domain:
    """``vm``'s domain as a clone: the template's shape, the pod's name and console."""
    shape = template_shape(vm)
    return pod_domain(
        replace(
            shape, sandbox_id=vm.sandbox_id, console_log=vm.console_log, owner=vm.owner,
            uuid=vm.uuid, incoming=True,
        )
    )  # fmt: skip


async def plug_pod_devices(hv: Hypervisor, vm: PodVm, name: str) -> None:
    """Hot-plug ``vm``'s own devices into the running clone ``name``'s empty root ports."""
    ports = await snapshot.root_ports(hv, name)
    if len(ports) < HOTPLUGS:
        raise FailedPrecondition(f"clone {name} has {len(ports)} free root ports, needs {HOTPLUGS}")
    # the vsock device first: the agent is reachable once it is in
    qmp = VhostUserVsock(vm.vsock_socket).hotplug_commands(ports[2]) if vm.vsock_socket else []
    devices = []
    if vm.fs_socket is not None:
        devices.append(device_xml(VirtioFs(vm.fs_socket, tag=SHARE_TAG, bus=ports[0])))
    if vm.tap:
        mac = vm.mac or mac_for(vm.sandbox_id)
        devices.append(device_xml(TapInterface(vm.tap, mac, vm.mtu, ports[1])))
    await snapshot.plug(hv, name, qmp, devices)


async def start_clone(
    hv: Hypervisor, vm: PodVm, template: Template, clock: StepClock
) -> tuple[DomainInfo, Domain]:
    """Start ``vm`` from ``template`` with its devices plugged in; on any failure the
    domain is destroyed and the error raised (the caller boots cold instead)."""
    domain = clone_domain(vm)
    with clock.step("clone domain"):
        info = await hv.create(domain, paused=True)
    try:
        with clock.step("load template"):
            await snapshot.load(
                hv,
                domain.name,
                template.state,
                template.ram,
                domain.memory_mib << 20,
                LOAD_TIMEOUT,
            )
        with clock.step("hot-plug"):
            await plug_pod_devices(hv, vm, domain.name)
    except BaseException:
        await asyncio.shield(hv.destroy_quietly(domain.name))
        raise
    return info, domain


async def start_spare(hv: Hypervisor, vm: PodVm, spare: Spare, clock: StepClock) -> None:
    """Make the running ``spare`` ``vm``'s VM: its devices plugged in; on any failure the
    spare is destroyed and the error raised."""
    try:
        with clock.step("hot-plug"):
            await plug_pod_devices(hv, vm, spare.name)
    except BaseException:
        await asyncio.shield(hv.destroy_quietly(spare.name))
        raise


@dataclass(frozen=True)
class Started:
    """The pod's running domain: its console log, and its template's key ("": cold)."""

    info: DomainInfo
    domain: Domain
    console_log: Path
    template: str = ""


async def start_pod_domain(
    hv: Hypervisor,
    vm: PodVm,
    templates: Templates | None,
    spares: SpareVms | None,
    host: VmHost,
    clock: StepClock,
) -> Started:
    """``vm``'s domain: when ``templates`` (``vm.template: auto``) holds its template, a
    spare clone of it (:mod:`.spares`) if one waits, else a clone started now; without a
    template, a cold boot, which has the template built for the next pod. A clone that
    fails is destroyed, its template dropped, and the pod boots cold; a spare that fails
    is destroyed and the pod starts as a clone."""
    key = ""
    if templates is not None and vm.machine == "q35" and not vm.vsock_cid:
        key = template_key(vm)
        if spares is not None:
            spares.want(key, vm)  # a refill, once this start is done
        template = await asyncio.to_thread(templates.find, key)
        if template is not None:
            spare = await spares.take(key) if spares is not None else None
            if spares is not None and spare is not None:
                taken = False
                try:
                    await start_spare(hv, vm, spare, clock)
                    taken = True
                except CrivError as e:
                    log.warning(
                        "pod %s: spare %s failed (%s); starting a clone",
                        vm.sandbox_id[:12], spare.name, e,
                    )  # fmt: skip
                    await host.settle_stop(spare.name)
                finally:
                    if not taken:  # start_spare destroyed it; its directory goes too
                        await asyncio.shield(spares.release(spare.name))
                if taken:
                    metrics.TEMPLATE_HITS.inc()
                    return Started(spare.info, spare.domain, spare.console_log, key)
            try:
                info, domain = await start_clone(hv, vm, template, clock)
                metrics.TEMPLATE_HITS.inc()
                return Started(info, domain, vm.console_log, key)
            except CrivError as e:
                log.warning("pod %s: clone failed (%s); booting cold", vm.sandbox_id[:12], e)
                await asyncio.to_thread(templates.drop, key)
                if spares is not None:
                    spares.drop(key)
                await host.settle_stop(domain_name(vm.sandbox_id))
    domain = pod_domain(vm)
    with clock.step("domain"):
        info = await hv.create(domain)
    if key and templates is not None:
        metrics.TEMPLATE_MISSES.inc()
        templates.ensure(key, vm)
    return Started(info, domain, vm.console_log)
