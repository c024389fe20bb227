"""The sandbox layer's side of streaming: where a container's agent is, and checks.

:class:`SandboxStreamLink` is the ``AgentLink`` that
:class:`criv.streaming.agent_backend.AgentStreamingBackend` needs (structural
Protocols both ways: neither package imports the other): it maps container and sandbox
ids to the pod's agent client (``StartExec``) and its isolation mode's data endpoint
(one data connection per stream). The ``require_*`` checks let the CRI layer refuse an
Exec/Attach/PortForward up front (NOT_FOUND, FAILED_PRECONDITION), before a URL is
handed out, as containerd does.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from criv.agent.datastream import StreamKind, open_data_stream
from criv.errors import FailedPrecondition, Unavailable
from criv.sandbox.context import SandboxContext
from criv.sandbox.records import ContainerRecord, PodRecord
from criv.sandbox.states import ContainerState, PodState


class StreamParams(Protocol):
    """What a data stream is for (``criv.streaming.agent_backend.DataStreamParams``)."""

    @property
    def kind(self) -> StreamKind: ...

    @property
    def container_id(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def exec_id(self) -> str: ...


def require_running_container(ctx: SandboxContext, cid: str) -> ContainerRecord:
    """The container (by id or unique prefix); it must be running to exec or attach."""
    c = ctx.container(cid)
    if c.state is not ContainerState.RUNNING:
        raise FailedPrecondition(f"container {c.id[:12]} is {c.state.value}, not running")
    return c


def require_ready_pod(ctx: SandboxContext, pod_id: str) -> PodRecord:
    pod = ctx.pod(pod_id)
    if pod.state is not PodState.READY:
        raise FailedPrecondition(f"pod sandbox {pod.id[:12]} is {pod.state.value}, not ready")
    return pod


class SandboxStreamLink:
    def __init__(self, ctx: SandboxContext) -> None:
        self._sandboxes = ctx

    async def start_exec(
        self, container_id: str, cmd: list[str], tty: bool, stdin: bool
    ) -> tuple[str, str]:
        c = require_running_container(self._sandboxes, container_id)
        client = self._sandboxes.client_of(c.sandbox_id)
        if client is None:
            raise Unavailable(f"container {c.id[:12]}: the pod's agent is not connected")
        exec_id = await client.start_exec(c.id, cmd, tty, stdin)
        return c.sandbox_id, exec_id

    async def attach_target(self, container_id: str) -> tuple[str, str]:
        c = require_running_container(self._sandboxes, container_id)
        return c.sandbox_id, c.id

    async def open_data_stream(
        self, sandbox_id: str, params: StreamParams
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        pod = self._sandboxes.pod(sandbox_id)
        iso = self._sandboxes.isolation(pod)
        endpoint = iso.data_endpoint(self._sandboxes.paths(pod.id))
        return await open_data_stream(
            endpoint,
            params.kind,
            container_id=params.container_id,
            port=params.port,
            exec_id=params.exec_id,
        )
