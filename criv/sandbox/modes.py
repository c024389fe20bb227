"""The isolation modes criv knows, by the name runtime handlers map to.

A new mode is one module implementing :class:`criv.sandbox.isolation.Isolation` and one
line here (plus its typed state in :mod:`criv.sandbox.isostate`). ``vm`` and
``vm-image`` share one :class:`criv.sandbox.vm.host.VmHost` (libvirt connection, KVM
probe, the published ``vm`` status).
"""

from __future__ import annotations

from criv.config import Config
from criv.sandbox.host import HostIsolation
from criv.sandbox.isolation import Isolation
from criv.sandbox.vm import VmIsolation
from criv.sandbox.vmimage import VmImageIsolation
from criv.state.runtime_state import RuntimeState


def build_isolations(config: Config, runtime_state: RuntimeState) -> dict[str, Isolation]:
    vm = VmIsolation(config, runtime_state)
    return {
        "host": HostIsolation(config),
        "vm": vm,
        "vm-image": VmImageIsolation(config, vm.host),
    }
