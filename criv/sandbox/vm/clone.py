"""A pod VM started as a clone of its shape's template (:mod:`.template`), or cold.

The clone's domain is the template's (same XML but its name, UUID and console log), started
paused with ``-incoming defer``; the template's state is loaded into it and it runs on from
where the template was saved: its agent already listens. Then what is the pod's own is
hot-plugged into its empty PCIe root ports: the share (virtiofsd), the NIC (the pod's tap
and MAC) and the vsock device (the pod's backend). The agent takes the pod's identity
(clock, RNG reseed, machine-id, share mount, NIC) at SetupSandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import replace

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
            ports = await snapshot.root_ports(hv, domain.name)
            if len(ports) < HOTPLUGS:
                raise FailedPrecondition(
                    f"clone {domain.name} has {len(ports)} free root ports, needs {HOTPLUGS}"
                )
            # the vsock device first: the agent is reachable once it is in
            qmp = (
                VhostUserVsock(vm.vsock_socket).hotplug_commands(ports[2])
                if vm.vsock_socket
                else []
            )
            devices = []
            if vm.fs_socket is not None:
                devices.append(device_xml(VirtioFs(vm.fs_socket, tag=SHARE_TAG, bus=ports[0])))
            if vm.tap:
                mac = vm.mac or mac_for(vm.sandbox_id)
                devices.append(device_xml(TapInterface(vm.tap, mac, vm.mtu, ports[1])))
            await snapshot.plug(hv, domain.name, qmp, devices)
    except BaseException:
        with contextlib.suppress(CrivError):
            await hv.destroy(domain.name)
            await hv.wait_stopped(domain.name, 10.0)
        raise
    return info, domain


async def start_pod_domain(
    hv: Hypervisor, vm: PodVm, templates: Templates | None, host: VmHost, clock: StepClock
) -> tuple[DomainInfo, Domain, str]:
    """``vm``'s domain: a clone of its template when ``templates`` (``vm.template: auto``)
    holds one (its key is returned), else a cold boot, which has the template built for the
    next pod ("" returned). A clone that fails is destroyed, its template dropped, and the
    pod boots cold."""
    key = ""
    if templates is not None and vm.machine == "q35" and not vm.vsock_cid:
        key = template_key(vm)
        template = await asyncio.to_thread(templates.find, key)
        if template is not None:
            try:
                info, domain = await start_clone(hv, vm, template, clock)
                metrics.TEMPLATE_HITS.inc()
                return info, domain, key
            except CrivError as e:
                log.warning("pod %s: clone failed (%s); booting cold", vm.sandbox_id[:12], e)
                await asyncio.to_thread(templates.drop, key)
                await host.settle_stop(domain_name(vm.sandbox_id))
    domain = pod_domain(vm)
    with clock.step("domain"):
        info = await hv.create(domain)
    if key and templates is not None:
        metrics.TEMPLATE_MISSES.inc()
        templates.ensure(key, vm)
    return info, domain, ""
