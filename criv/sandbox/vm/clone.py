"""A pod VM started as a clone of its shape's template (:mod:`.template`).

The clone's domain is the template's (same XML but its name, UUID and console log), started
paused with ``-incoming defer``; the template's state is loaded into it and it runs on from
where the template was saved: its agent already listens. Then what is the pod's own is
hot-plugged into its empty PCIe root ports: the share (virtiofsd), the NIC (the pod's tap
and MAC) and the vsock device (the pod's backend). The agent takes the pod's identity
(clock, RNG reseed, machine-id, share mount, NIC) at SetupSandbox.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

from criv.errors import CrivError, FailedPrecondition
from criv.hypervisor.domain import Domain, TapInterface, VhostUserVsock, VirtioFs, device_xml
from criv.hypervisor.domaininfo import DomainInfo
from criv.hypervisor.driver import Hypervisor
from criv.hypervisor.spec import PodVm, mac_for, pod_domain, template_shape
from criv.sandbox.vm.coldpath import StepClock
from criv.sandbox.vm.template import Template

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
            await hv.load_state(
                domain.name, template.state, template.ram, domain.memory_mib << 20, LOAD_TIMEOUT
            )
        with clock.step("hot-plug"):
            ports = await hv.free_root_ports(domain.name)
            if len(ports) < HOTPLUGS:
                raise FailedPrecondition(
                    f"clone {domain.name} has {len(ports)} free root ports, needs {HOTPLUGS}"
                )
            if vm.vsock_socket is not None:  # first: the agent is reachable once it is in
                vsock = VhostUserVsock(vm.vsock_socket)
                await hv.hotplug_qmp(domain.name, vsock.hotplug_commands(ports[2]))
            if vm.fs_socket is not None:
                fs = VirtioFs(vm.fs_socket, tag="criv", bus=ports[0])
                await hv.attach(domain.name, device_xml(fs))
            if vm.tap:
                nic = TapInterface(vm.tap, vm.mac or mac_for(vm.sandbox_id), vm.mtu, ports[1])
                await hv.attach(domain.name, device_xml(nic))
    except BaseException:
        with contextlib.suppress(CrivError):
            await hv.destroy(domain.name)
            await hv.wait_stopped(domain.name, 10.0)
        raise
    return info, domain
