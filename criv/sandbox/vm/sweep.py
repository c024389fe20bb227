"""The vm mode's start-up sweep: domains, vsock backends, virtiofsds and host-netns taps of this
criv (tagged with its state dir / under its run dir) that no live pod owns."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from criv.errors import CrivError
from criv.network.tap import delete_tap, host_taps, tap_name
from criv.sandbox.records import PodRecord
from criv.sandbox.vm import virtiofs
from criv.sandbox.vm.backend import VsockBackends
from criv.sandbox.vm.host import VmHost

log = logging.getLogger("criv.sandbox.vm")


async def sweep_vm_orphans(
    host: VmHost,
    backends: VsockBackends,
    owner: str,
    run_root: Path,
    pods: list[PodRecord],
    live: list[PodRecord],
    names: set[str],
    keep_backends: set[int],
) -> None:
    """Destroy this criv's domains not in ``names``; kill backends and virtiofsds no pod
    in ``live`` owns; delete taps no pod in ``pods`` names."""
    try:
        hv = await host.hypervisor()
        domains = await hv.list_domains()
    except CrivError as e:
        log.warning("cannot list libvirt domains (%s); skipping the VM sweep", e)
        domains = []
    for d in domains:
        if d.owner == owner and d.name not in names:
            log.warning("destroying orphan domain %s", d.name)
            with contextlib.suppress(CrivError):
                await hv.destroy(d.name)
    for pid in await backends.sweep(run_root, keep_backends):
        log.warning("killed orphan vsock backend pid %d", pid)
    for pid in await virtiofs.sweep(run_root, {p.id[:12] for p in live}):
        log.warning("killed orphan virtiofsd pid %d", pid)
    known_taps = {tap_name(p.id) for p in pods}
    for tap in await asyncio.to_thread(host_taps, owner):
        if tap not in known_taps:
            log.warning("deleting orphan tap %s", tap)
            await delete_tap(tap)
