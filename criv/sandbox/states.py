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

from enum import StrEnum

from criv.errors import FailedPrecondition


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


def check_pod(old: PodState, new: PodState, what: str = "pod") -> None:
    if new not in POD_TRANSITIONS[old]:
        raise FailedPrecondition(f"{what} cannot go from {old.value} to {new.value}")


def check_container(old: ContainerState, new: ContainerState, what: str = "container") -> None:
    if new not in CONTAINER_TRANSITIONS[old]:
        raise FailedPrecondition(f"{what} cannot go from {old.value} to {new.value}")
