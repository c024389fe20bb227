"""A vm-image container's state machine: its VM's life as criv keeps it.

::

    CREATED ──start──▶ RUNNING ──stop──▶ STOPPING ──VM gone──▶ EXITED
       │                  │ ▲                 │
       │                  │ └──criv restarted─┘  (kubelet retries the stop)
       │                  └──────VM gone (by itself, or while criv was down)──▶ EXITED
       └──stop / remove before it ever ran────────────────────────────────────▶ EXITED

STOPPING is a RUNNING VM whose StopContainer is under way (ACPI power button, then the
deadline, then destroy): a VM that then goes was stopped by criv, not by itself. The
agent API sees it as running. Every change goes through :meth:`VmContainer.move
<criv.sandbox.vmimage.container.VmContainer.move>`, which refuses one the table does not
hold; the record (:mod:`.record`) stores the state by its value.
"""

from __future__ import annotations

from enum import StrEnum

from criv.agent.types import AgentContainerState
from criv.sandbox.states import check_transition


class BoxState(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    STOPPING = "stopping"
    EXITED = "exited"


BOX_TRANSITIONS: dict[BoxState, frozenset[BoxState]] = {
    BoxState.CREATED: frozenset({BoxState.RUNNING, BoxState.EXITED}),
    BoxState.RUNNING: frozenset({BoxState.STOPPING, BoxState.EXITED}),
    # back to RUNNING: a stop that a criv restart cut short, its VM still up
    BoxState.STOPPING: frozenset({BoxState.RUNNING, BoxState.EXITED}),
    BoxState.EXITED: frozenset(),
}

# what the agent API (and so the sandbox layer) sees
AGENT_STATES: dict[BoxState, AgentContainerState] = {
    BoxState.CREATED: AgentContainerState.CREATED,
    BoxState.RUNNING: AgentContainerState.RUNNING,
    BoxState.STOPPING: AgentContainerState.RUNNING,
    BoxState.EXITED: AgentContainerState.EXITED,
}

# a VM runs (or may still run) in these
VM_STATES = frozenset({BoxState.RUNNING, BoxState.STOPPING})


def check_box(old: BoxState, new: BoxState, what: str = "vm-image container") -> None:
    if new is not old:  # staying put is always allowed
        check_transition(BOX_TRANSITIONS, old, new, what)
