"""The agent client: typed calls over a grpc.aio channel with deadlines and bounds.

The agent is untrusted (in a VM it is the guest): every call has a deadline, answers
are size-bounded by the channel and their strings clipped, and an answer about the
wrong container is rejected. gRPC failures become :mod:`criv.errors` classes so the
CRI layer maps them like any other error.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from criv import metrics
from criv.agent import convert
from criv.agent.types import (
    AgentContainerInfo,
    AgentEvent,
    AgentHealth,
    AgentStats,
    CreateContainerArgs,
    ExecResult,
    GuestIdentity,
    GuestNetwork,
)
from criv.errors import (
    AgentError,
    AlreadyExists,
    CrivError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from criv_agent.api.agent.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger("criv.agent")

AGENT_API_VERSION = 1
# kubelet's gRPC client refuses messages over 16 MiB, so stdout and stderr of an
# ExecSync must fit together in one answer: each is capped at half of it (minus room
# for the rest of the message).
EXEC_SYNC_OUTPUT_LIMIT = 8 * 1024 * 1024 - 64 * 1024
MAX_AGENT_MESSAGE = 2 * EXEC_SYNC_OUTPUT_LIMIT + 1024 * 1024
# Default deadlines (seconds); long-running calls get explicit ones.
CALL_TIMEOUT = 30.0
HEALTH_TIMEOUT = 5.0
CREATE_TIMEOUT = 60.0
# The longest criv waits for an ExecSync answer (seconds): for a command without a
# timeout (kubelet's 0), or with a longer one. Generous, since such a command may
# legitimately run long (crictl exec --sync); an agent that stopped answering is
# given up on after it, with DEADLINE_EXCEEDED.
EXEC_SYNC_MAX_WAIT = 24 * 3600
MAX_ERROR_TEXT = 2000

T = TypeVar("T")

_CODE_MAP: dict[grpc.StatusCode, type[CrivError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def map_rpc_error(method: str, e: grpc.aio.AioRpcError) -> CrivError:
    code = e.code()
    detail = (e.details() or "")[:MAX_ERROR_TEXT]
    cls = _CODE_MAP.get(code, AgentError)
    if cls is AgentError:
        return AgentError(f"agent {method}: {code.name}: {detail}")
    return cls(f"agent: {detail}")


class AgentClient:
    """One agent, reached at ``target`` (``unix:/path``)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._channel = grpc.aio.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", MAX_AGENT_MESSAGE),
                ("grpc.max_send_message_length", 16 * 1024 * 1024),
                # A unix socket: reconnect fast after an agent restart.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ],
        )
        self._stub = agent_pb2_grpc.AgentStub(self._channel)

    async def close(self) -> None:
        await self._channel.close(grace=None)

    async def _call(
        self, method: str, fn: Callable[..., Any], req: Any, timeout: float | None
    ) -> Any:
        try:
            return await fn(req, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            if method != "Health":  # the readiness probe, polled while an agent boots
                metrics.AGENT_RPC_ERRORS.labels(method=method, code=e.code().name).inc()
            raise map_rpc_error(method, e) from None

    async def health(self, timeout: float = HEALTH_TIMEOUT) -> AgentHealth:
        resp = await self._call("Health", self._stub.Health, agent_pb2.HealthRequest(), timeout)
        h = convert.health(resp)
        if h.api_version != AGENT_API_VERSION:
            raise AgentError(f"agent speaks API v{h.api_version}, criv speaks v{AGENT_API_VERSION}")
        return h

    async def setup_sandbox(
        self,
        sandbox_id: str,
        config: bytes,
        sandbox_dir: str,
        pod_ips: list[str],
        network: GuestNetwork | None = None,
        *,
        identity: GuestIdentity | None = None,
    ) -> None:
        req = agent_pb2.SetupSandboxRequest(
            sandbox_id=sandbox_id,
            config=convert.pod_config(config),
            sandbox_dir=sandbox_dir,
            pod_ips=pod_ips,
        )
        if network is not None:
            req.network.CopyFrom(convert.guest_network(network))
        timeout = CALL_TIMEOUT
        if identity is not None:
            req.identity.CopyFrom(convert.guest_identity(identity))
            timeout += identity.wait_seconds  # the agent may wait that long for the share/NIC
        await self._call("SetupSandbox", self._stub.SetupSandbox, req, timeout)

    async def shutdown(self, timeout_seconds: int) -> None:
        req = agent_pb2.ShutdownSandboxRequest(timeout_seconds=timeout_seconds)
        await self._call(
            "ShutdownSandbox", self._stub.ShutdownSandbox, req, timeout_seconds + CALL_TIMEOUT
        )

    async def create_container(self, args: CreateContainerArgs) -> AgentContainerInfo:
        req = convert.create_request(args)
        resp = await self._call("CreateContainer", self._stub.CreateContainer, req, CREATE_TIMEOUT)
        return convert.container_info(resp.info, args.container_id)

    async def start_container(self, cid: str) -> AgentContainerInfo:
        req = agent_pb2.ContainerRequest(container_id=cid)
        resp = await self._call("StartContainer", self._stub.StartContainer, req, CREATE_TIMEOUT)
        return convert.container_info(resp.info, cid)

    async def stop_container(self, cid: str, timeout_seconds: int) -> AgentContainerInfo:
        req = agent_pb2.StopContainerRequest(container_id=cid, timeout_seconds=timeout_seconds)
        resp = await self._call(
            "StopContainer",
            self._stub.StopContainer,
            req,
            max(timeout_seconds, 0) + CALL_TIMEOUT,
        )
        return convert.container_info(resp.info, cid)

    async def remove_container(self, cid: str) -> None:
        req = agent_pb2.ContainerRequest(container_id=cid)
        await self._call("RemoveContainer", self._stub.RemoveContainer, req, CALL_TIMEOUT)

    async def container_status(self, cid: str) -> AgentContainerInfo:
        req = agent_pb2.ContainerRequest(container_id=cid)
        resp = await self._call("ContainerStatus", self._stub.ContainerStatus, req, CALL_TIMEOUT)
        return convert.container_info(resp.info, cid)

    async def list_containers(self) -> list[AgentContainerInfo]:
        resp = await self._call(
            "ListContainers",
            self._stub.ListContainers,
            agent_pb2.ListContainersRequest(),
            CALL_TIMEOUT,
        )
        return [convert.container_info(i, None) for i in resp.containers]

    async def update_resources(self, cid: str, linux: bytes) -> None:
        req = agent_pb2.UpdateContainerResourcesRequest(
            container_id=cid, linux=convert.resources(linux)
        )
        await self._call(
            "UpdateContainerResources", self._stub.UpdateContainerResources, req, CALL_TIMEOUT
        )

    async def exec_sync(self, cid: str, cmd: list[str], timeout_seconds: int) -> ExecResult:
        req = agent_pb2.ExecSyncRequest(
            container_id=cid,
            cmd=cmd,
            timeout_seconds=timeout_seconds,
            output_limit=EXEC_SYNC_OUTPUT_LIMIT,
        )
        # The agent enforces the command's timeout; ours only guards against an agent
        # that never answers. A command with no timeout (0) may run for as long as it
        # likes, but criv waits for the agent at most EXEC_SYNC_MAX_WAIT.
        wait = timeout_seconds if 0 < timeout_seconds < EXEC_SYNC_MAX_WAIT else EXEC_SYNC_MAX_WAIT
        resp = await self._call("ExecSync", self._stub.ExecSync, req, wait + CALL_TIMEOUT)
        return convert.exec_result(resp, EXEC_SYNC_OUTPUT_LIMIT)

    async def start_exec(self, cid: str, cmd: list[str], tty: bool, stdin: bool) -> str:
        """Register an interactive exec; its STDIO data stream (exec_id) runs it."""
        req = agent_pb2.StartExecRequest(container_id=cid, cmd=cmd, tty=tty, stdin=stdin)
        resp = await self._call("StartExec", self._stub.StartExec, req, CALL_TIMEOUT)
        exec_id = str(resp.exec_id)
        # it goes back to the agent in a StreamOpen header, which is size-limited
        if not exec_id or len(exec_id) > 128:
            raise AgentError("agent StartExec: bad exec id")
        return exec_id

    async def stats(self, cids: list[str]) -> list[AgentStats]:
        req = agent_pb2.StatsRequest(container_ids=cids)
        resp = await self._call("Stats", self._stub.Stats, req, CALL_TIMEOUT)
        return [convert.stats(s) for s in resp.stats]

    async def events(self) -> AsyncIterator[AgentEvent]:
        """Events from now on, until the agent goes away (then AgentError)."""
        call = self._stub.Events(agent_pb2.EventsRequest())
        try:
            async for ev in call:
                out = convert.event(ev)
                if out is not None:
                    yield out
        except grpc.aio.AioRpcError as e:
            raise map_rpc_error("Events", e) from None
        finally:
            call.cancel()
