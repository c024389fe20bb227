"""Pod and container state machines: the states, and which transitions are legal.

Pod::

    PENDING ──setup ok──▶ READY ──stop──▶ NOTREADY ──stop──▶ NOTREADY
       └──────setup failed / stop──────────▲

PENDING is a pod whose RunPodSandbox has not finished (or whose caller gave up and
will retry with the same name); CRI sees it as NOTREADY. Removal deletes the record.

Container::

    CREATED ──start──▶ RUNNING ──exit / stop──▶ EXITED
       │                  │
       │                  └──agent gone──▶ UNKNOWN ──stop / agent says exited──▶ EXITED
       └──stop / pod stopped / agent gone──────────────────────────▶ EXITED

UNKNOWN is a container that was running when its agent vanished: criv cannot know
how it ended. Every record change goes through ``Store.update``, which calls
:func:`check_pod` / :func:`check_container` on the state change.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import TypeVar

from criv.errors import FailedPrecondition

S = TypeVar("S", bound=StrEnum)


class PodState(StrEnum):
    PENDING = "pending"
    READY = "ready"
    NOTREADY = "notready"


class ContainerState(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"
    UNKNOWN = "unknown"


POD_TRANSITIONS: dict[PodState, frozenset[PodState]] = {
    PodState.PENDING: frozenset({PodState.PENDING, PodState.READY, PodState.NOTREADY}),
    PodState.READY: frozenset({PodState.READY, PodState.NOTREADY}),
    PodState.NOTREADY: frozenset({PodState.NOTREADY}),
}

CONTAINER_TRANSITIONS: dict[ContainerState, frozenset[ContainerState]] = {
    ContainerState.CREATED: frozenset(
        {ContainerState.CREATED, ContainerState.RUNNING, ContainerState.EXITED}
    ),
    ContainerState.RUNNING: frozenset(
        {ContainerState.RUNNING, ContainerState.EXITED, ContainerState.UNKNOWN}
    ),
    ContainerState.UNKNOWN: frozenset(
        {ContainerState.UNKNOWN, ContainerState.EXITED, ContainerState.RUNNING}
    ),
    ContainerState.EXITED: frozenset({ContainerState.EXITED}),
}


def check_transition(table: Mapping[S, frozenset[S]], old: S, new: S, what: str) -> None:
    """FAILED_PRECONDITION unless ``table`` lets ``what`` go from ``old`` to ``new``
    (every state machine of the sandbox layer: pods, containers, vm-image containers)."""
    if new not in table[old]:
        raise FailedPrecondition(f"{what} cannot go from {old.value} to {new.value}")


def check_pod(old: PodState, new: PodState, what: str = "pod") -> None:
    check_transition(POD_TRANSITIONS, old, new, what)


def check_container(old: ContainerState, new: ContainerState, what: str = "container") -> None:
    check_transition(CONTAINER_TRANSITIONS, old, new, what)
