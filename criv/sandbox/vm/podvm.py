"""The VM a vm pod gets (:class:`~criv.hypervisor.spec.PodVm`): its size from the pod's
resources and criv's config (with room to grow live), its devices from the pod's paths
and what the cold path prepared, the agent's command line."""

from __future__ import annotations

import os

from criv.config import Config, VmConfig
from criv.hypervisor.sizing import PodResources, max_memory_for, max_vcpus_for, vm_size
from criv.hypervisor.spec import Accel, PodVm
from criv.sandbox.isolation import PodPaths
from criv.sandbox.records import PodRecord
from criv.sandbox.vm import coldpath, virtiofs
from criv.sandbox.vm.layout import (
    CONTROL_PORT,
    DATA_PORT,
    GUEST_AGENT_STATE,
    console_log,
    vhost_socket,
)


def fixed_helper_layout(vm: VmConfig, accel: Accel) -> bool:
    """Whether the agent's helpers run without ASLR: under TCG (whose translations are
    keyed on virtual addresses too) unless ``vm.fixed_helper_layout`` is off."""
    return vm.fixed_helper_layout and accel == "tcg"


def pod_vm(
    config: Config,
    owner: str,
    pod: PodRecord,
    paths: PodPaths,
    prep: coldpath.Prepared,
    mac: str,
    mtu: int,
) -> PodVm:
    """``pod``'s VM; ``mac`` and ``mtu`` are its eth0's (CNI's), "" and 0 without a tap."""
    size = vm_size(
        PodResources(**pod.resources),
        config.vm.vcpus,
        config.vm.memory_mib,
        os.cpu_count() or 1,
    )
    # the slots above size.vcpus let UpdatePodSandboxResources hot-plug vCPUs
    most = max_vcpus_for(size.vcpus, config.vm.max_vcpus, os.cpu_count() or 1)
    # above size.memory_mib, the balloon holds memory back for a live resize to give
    most_mib = max_memory_for(size.memory_mib, config.vm.max_memory_mib)
    accel = prep.accel.accel
    return PodVm(
        sandbox_id=pod.id,
        kernel=prep.image.kernel,
        initrd=prep.image.initrd,
        root_disk=prep.image.root_disk,
        root_disk_bytes=prep.image.root_disk_bytes(),
        root_dax=config.vm.root_dax,
        size=size,
        accel=accel,
        console_log=console_log(paths),
        max_vcpus=most,
        max_memory_mib=most_mib,
        free_page_reporting=config.vm.free_page_reporting,
        fs_socket=virtiofs.fs_socket(paths),
        tap=prep.tap,
        mac=mac,
        mtu=mtu,
        vsock_socket=vhost_socket(paths),
        machine=config.vm.machine,
        agent_args=[
            "--control", f"vsock:{CONTROL_PORT}", "--data", f"vsock:{DATA_PORT}",
            "--state-dir", GUEST_AGENT_STATE, "--crun", "crun", "--power-off-on-shutdown",
            *(["--fixed-helper-layout"] if fixed_helper_layout(config.vm, accel) else []),
        ],
        owner=owner,
    )  # fmt: skip
