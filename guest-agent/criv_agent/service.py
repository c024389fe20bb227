"""The Agent gRPC service: protobuf in, Runtime calls, protobuf out; errors mapped to
status codes here and nowhere else."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
from google.protobuf import json_format

from criv_agent import API_VERSION, __version__
from criv_agent.api.agent.v1 import agent_pb2, agent_pb2_grpc
from criv_agent.api.runtime.v1 import api_pb2
from criv_agent.crun import cgroup_version
from criv_agent.errors import AgentError
from criv_agent.identity import IdentityTaker
from criv_agent.runtime import Runtime
from criv_agent.state import ContainerRecord, State

log = logging.getLogger(__name__)

_STATE = {
    State.CREATED: agent_pb2.CREATED,
    State.RUNNING: agent_pb2.RUNNING,
    State.EXITED: agent_pb2.EXITED,
    State.UNKNOWN: agent_pb2.UNKNOWN,
}
_EVENT = {
    "created": agent_pb2.Event.CREATED,
    "started": agent_pb2.Event.STARTED,
    "exited": agent_pb2.Event.EXITED,
    "oom": agent_pb2.Event.OOM,
    "removed": agent_pb2.Event.REMOVED,
}

S = TypeVar("S")
Q = TypeVar("Q")  # the request message
R = TypeVar("R")


class Context(Protocol):
    """What the handlers use of ``grpc.aio.ServicerContext`` (grpcio has no type stubs)."""

    async def abort(self, code: grpc.StatusCode, details: str) -> NoReturn: ...


def info(rec: ContainerRecord) -> agent_pb2.ContainerInfo:
    res = api_pb2.LinuxContainerResources()
    json_format.ParseDict(rec.resources, res, ignore_unknown_fields=True)
    return agent_pb2.ContainerInfo(
        container_id=rec.id,
        state=_STATE[rec.state],
        created_at_ns=rec.created_at_ns,
        started_at_ns=rec.started_at_ns,
        finished_at_ns=rec.finished_at_ns,
        exit_code=rec.exit_code,
        reason=rec.reason,
        message=rec.message,
        pid=rec.pid if rec.state in (State.CREATED, State.RUNNING) else 0,
        resources=res,
        user=_user(rec.user),
    )


def _user(user: dict[str, Any]) -> api_pb2.ContainerUser | None:
    """The record's OCI process user as CRI ContainerUser (None before it has one)."""
    if "uid" not in user:
        return None
    return api_pb2.ContainerUser(
        linux=api_pb2.LinuxContainerUser(
            uid=int(user["uid"]),
            gid=int(user.get("gid", 0)),
            supplemental_groups=[int(g) for g in user.get("additionalGids") or []],
        )
    )


def mapped(
    fn: Callable[[S, Q, Context], Awaitable[R]],
) -> Callable[[S, Q, Context], Awaitable[R]]:
    """AgentError -> its status code; anything else -> INTERNAL, logged."""

    @functools.wraps(fn)
    async def wrapper(self: S, request: Q, context: Context) -> R:
        try:
            return await fn(self, request, context)
        except AgentError as e:
            await context.abort(getattr(grpc.StatusCode, e.code), str(e))
        except (OSError, ValueError) as e:
            log.exception("%s failed", fn.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        raise AssertionError("unreachable")  # abort raises

    return wrapper


class AgentService(agent_pb2_grpc.AgentServicer):
    def __init__(self, runtime: Runtime, identity: IdentityTaker | None = None) -> None:
        self.rt = runtime
        # host mode unless told otherwise: a host-mode agent ignores a GuestIdentity
        self.identity = identity or IdentityTaker(in_vm=False)
        self.first_call = asyncio.Event()  # set by the host's first Health or SetupSandbox

    @mapped
    async def Health(
        self, request: agent_pb2.HealthRequest, context: Context
    ) -> agent_pb2.HealthResponse:
        self.first_call.set()
        return agent_pb2.HealthResponse(
            agent_version=__version__,
            api_version=API_VERSION,
            kernel_release=os.uname().release,
            cgroup_version=cgroup_version(),
        )

    @mapped
    async def SetupSandbox(
        self, request: agent_pb2.SetupSandboxRequest, context: Context
    ) -> agent_pb2.SetupSandboxResponse:
        # a VM cloned from a template first takes the pod's clock, RNG, machine-id and
        # share; what is left of its wait budget goes to the hot-plugged NIC
        self.first_call.set()
        nic_wait = 0.0
        t0 = time.monotonic()
        if request.HasField("identity"):
            nic_wait = await self.identity.take(request.identity)
        t1 = time.monotonic()
        if request.HasField("network"):
            from criv_agent import network

            await network.apply(request.network, nic_wait)
        t2 = time.monotonic()
        await self.rt.pod.setup(
            request.sandbox_id, request.config, request.sandbox_dir, list(request.pod_ips)
        )
        # one line per pod, beside the host's "cold path" lines (in the console log)
        log.info(
            "setup sandbox: identity %.3fs, network %.3fs, pod %.3fs",
            t1 - t0, t2 - t1, time.monotonic() - t2,
        )  # fmt: skip
        return agent_pb2.SetupSandboxResponse()

    @mapped
    async def ShutdownSandbox(
        self, request: agent_pb2.ShutdownSandboxRequest, context: Context
    ) -> agent_pb2.ShutdownSandboxResponse:
        await self.rt.shutdown_sandbox(int(request.timeout_seconds))
        return agent_pb2.ShutdownSandboxResponse()

    @mapped
    async def CreateContainer(
        self, request: agent_pb2.CreateContainerRequest, context: Context
    ) -> agent_pb2.CreateContainerResponse:
        return agent_pb2.CreateContainerResponse(info=info(await self.rt.create(request)))

    @mapped
    async def StartContainer(
        self, request: agent_pb2.ContainerRequest, context: Context
    ) -> agent_pb2.ContainerStatusResponse:
        return agent_pb2.ContainerStatusResponse(
            info=info(await self.rt.start(request.container_id))
        )

    @mapped
    async def SignalContainer(
        self, request: agent_pb2.SignalContainerRequest, context: Context
    ) -> agent_pb2.SignalContainerResponse:
        await self.rt.signal(request.container_id, request.signal)
        return agent_pb2.SignalContainerResponse()

    @mapped
    async def StopContainer(
        self, request: agent_pb2.StopContainerRequest, context: Context
    ) -> agent_pb2.ContainerStatusResponse:
        rec = await self.rt.stop(request.container_id, int(request.timeout_seconds))
        return agent_pb2.ContainerStatusResponse(info=info(rec))

    @mapped
    async def WaitContainer(
        self, request: agent_pb2.ContainerRequest, context: Context
    ) -> agent_pb2.ContainerStatusResponse:
        return agent_pb2.ContainerStatusResponse(
            info=info(await self.rt.wait(request.container_id))
        )

    @mapped
    async def RemoveContainer(
        self, request: agent_pb2.ContainerRequest, context: Context
    ) -> agent_pb2.RemoveContainerResponse:
        await self.rt.remove(request.container_id)
        return agent_pb2.RemoveContainerResponse()

    @mapped
    async def ContainerStatus(
        self, request: agent_pb2.ContainerRequest, context: Context
    ) -> agent_pb2.ContainerStatusResponse:
        return agent_pb2.ContainerStatusResponse(info=info(self.rt.get(request.container_id)))

    @mapped
    async def ListContainers(
        self, request: agent_pb2.ListContainersRequest, context: Context
    ) -> agent_pb2.ListContainersResponse:
        return agent_pb2.ListContainersResponse(containers=[info(r) for r in self.rt.containers()])

    @mapped
    async def UpdateContainerResources(
        self, request: agent_pb2.UpdateContainerResourcesRequest, context: Context
    ) -> agent_pb2.UpdateContainerResourcesResponse:
        await self.rt.update_resources(request.container_id, request.linux)
        return agent_pb2.UpdateContainerResourcesResponse()

    @mapped
    async def ExecSync(
        self, request: agent_pb2.ExecSyncRequest, context: Context
    ) -> agent_pb2.ExecSyncResponse:
        r = await self.rt.exec_sync(
            request.container_id,
            list(request.cmd),
            int(request.timeout_seconds),
            int(request.output_limit),
        )
        return agent_pb2.ExecSyncResponse(
            stdout=r.stdout,
            stderr=r.stderr,
            exit_code=r.exit_code,
            timed_out=r.timed_out,
            output_truncated=r.truncated,
        )

    @mapped
    async def StartExec(
        self, request: agent_pb2.StartExecRequest, context: Context
    ) -> agent_pb2.StartExecResponse:
        exec_id = self.rt.start_exec(
            request.container_id, list(request.cmd), bool(request.tty), bool(request.stdin)
        )
        return agent_pb2.StartExecResponse(exec_id=exec_id)

    @mapped
    async def Stats(
        self, request: agent_pb2.StatsRequest, context: Context
    ) -> agent_pb2.StatsResponse:
        out = []
        for cid, s in await self.rt.stats(list(request.container_ids)):
            out.append(
                agent_pb2.ContainerStats(
                    container_id=cid,
                    timestamp_ns=s.timestamp_ns,
                    cpu_usage_core_nanoseconds=s.cpu_ns,
                    memory_working_set_bytes=s.working_set,
                    memory_usage_bytes=s.memory_usage,
                    memory_rss_bytes=s.rss,
                    memory_page_faults=s.page_faults,
                    memory_major_page_faults=s.major_page_faults,
                    memory_available_bytes=s.available,
                    process_count=s.pids,
                )
            )
        return agent_pb2.StatsResponse(stats=out)

    async def Events(
        self, request: agent_pb2.EventsRequest, context: Context
    ) -> AsyncIterator[agent_pb2.Event]:
        async for ev in self.rt.events():
            yield agent_pb2.Event(
                kind=_EVENT[ev.kind],
                container_id=ev.container_id,
                timestamp_ns=ev.timestamp_ns,
                info=info(ev.record),
            )
