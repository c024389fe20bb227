"""The isolation modes criv knows, by the name runtime handlers map to.

A new mode is one module implementing :class:`criv.sandbox.isolation.Isolation` and one
line here (plus its typed state in :mod:`criv.sandbox.isostate`).
"""

from __future__ import annotations

from collections.abc import Callable

from criv.config import Config
from criv.sandbox.host import HostIsolation
from criv.sandbox.isolation import Isolation
from criv.sandbox.vm import VmIsolation
from criv.state.runtime_state import RuntimeState

IsolationFactory = Callable[[Config, RuntimeState], Isolation]

ISOLATION_MODES: dict[str, IsolationFactory] = {
    "host": lambda config, _state: HostIsolation(config),
    "vm": VmIsolation,
}


def build_isolations(config: Config, runtime_state: RuntimeState) -> dict[str, Isolation]:
    return {name: make(config, runtime_state) for name, make in ISOLATION_MODES.items()}
