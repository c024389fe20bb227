"""RuntimeService container RPCs (a mixin of RuntimeService): proto <-> sandbox."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from criv.cri import runtime_convert as conv
from criv.cri.protomemo import ProtoMemo
from criv.sandbox.events import EventKind
from criv.sandbox.manager import SandboxManager
from criv.sandbox.records import ContainerRecord
from criv.sandbox.specs import ContainerFilter
from criv_agent.api.runtime.v1 import api_pb2

_EVENT_TYPES = {
    EventKind.CREATED: api_pb2.CONTAINER_CREATED_EVENT,
    EventKind.STARTED: api_pb2.CONTAINER_STARTED_EVENT,
    EventKind.STOPPED: api_pb2.CONTAINER_STOPPED_EVENT,
    EventKind.DELETED: api_pb2.CONTAINER_DELETED_EVENT,
}


# The longest grace period StopContainer passes on (68 years: forever). A longer one
# (Kubernetes allows any int64) would overflow the gRPC deadline of the agent call,
# which then fails at once with DEADLINE_EXCEEDED and stops nothing.
STOP_TIMEOUT_MAX = 2**31 - 1


class ContainerRpcs:
    _sandboxes: SandboxManager
    _container_items: ProtoMemo[ContainerRecord, api_pb2.Container]

    async def _container_stats(
        self, containers: list[ContainerRecord]
    ) -> dict[str, tuple[api_pb2.ContainerStats, int]]:
        raise NotImplementedError  # provided by PodSandboxRpcs

    async def CreateContainer(
        self, request: api_pb2.CreateContainerRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.CreateContainerResponse:
        cid = await self._sandboxes.create_container(
            request.pod_sandbox_id, conv.container_spec(request)
        )
        return api_pb2.CreateContainerResponse(container_id=cid)

    async def StartContainer(
        self, request: api_pb2.StartContainerRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.StartContainerResponse:
        await self._sandboxes.start_container(request.container_id)
        return api_pb2.StartContainerResponse()

    async def StopContainer(
        self, request: api_pb2.StopContainerRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.StopContainerResponse:
        timeout = min(int(request.timeout), STOP_TIMEOUT_MAX)
        await self._sandboxes.stop_container(request.container_id, timeout)
        return api_pb2.StopContainerResponse()

    async def RemoveContainer(
        self, request: api_pb2.RemoveContainerRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.RemoveContainerResponse:
        await self._sandboxes.remove_container(request.container_id)
        return api_pb2.RemoveContainerResponse()

    async def ListContainers(
        self, request: api_pb2.ListContainersRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ListContainersResponse:
        f = conv.container_filter(request.filter)
        return api_pb2.ListContainersResponse(
            containers=self._container_items.items(self._sandboxes.list_containers(f))
        )

    async def ContainerStatus(
        self, request: api_pb2.ContainerStatusRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ContainerStatusResponse:
        c = await self._sandboxes.container_status(request.container_id)
        resp = api_pb2.ContainerStatusResponse(status=conv.container_status(c))
        if request.verbose:
            resp.info.update(conv.container_verbose_info(c))
        return resp

    async def UpdateContainerResources(
        self,
        request: api_pb2.UpdateContainerResourcesRequest,
        context: grpc.aio.ServicerContext,
    ) -> api_pb2.UpdateContainerResourcesResponse:
        await self._sandboxes.update_resources(
            request.container_id, request.linux.SerializeToString()
        )
        return api_pb2.UpdateContainerResourcesResponse()

    async def ReopenContainerLog(
        self, request: api_pb2.ReopenContainerLogRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ReopenContainerLogResponse:
        await self._sandboxes.reopen_log(request.container_id)
        return api_pb2.ReopenContainerLogResponse()

    async def ExecSync(
        self, request: api_pb2.ExecSyncRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ExecSyncResponse:
        r = await self._sandboxes.exec_sync(
            request.container_id, list(request.cmd), int(request.timeout)
        )
        return api_pb2.ExecSyncResponse(stdout=r.stdout, stderr=r.stderr, exit_code=r.exit_code)

    async def ContainerStats(
        self, request: api_pb2.ContainerStatsRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ContainerStatsResponse:
        c = self._sandboxes.container(request.container_id)
        stats = await self._container_stats([c])
        return api_pb2.ContainerStatsResponse(stats=stats[c.id][0])

    async def ListContainerStats(
        self, request: api_pb2.ListContainerStatsRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ListContainerStatsResponse:
        f = request.filter
        cs = self._sandboxes.list_containers(
            ContainerFilter(id=f.id, pod_sandbox_id=f.pod_sandbox_id, labels=dict(f.label_selector))
        )
        # Stats of running containers only, as containerd reports them.
        cs = [c for c in cs if c.state.value == "running"]
        stats = await self._container_stats(cs)
        return api_pb2.ListContainerStatsResponse(stats=[stats[c.id][0] for c in cs])

    async def GetContainerEvents(
        self, request: api_pb2.GetEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.ContainerEventResponse]:
        async for ev in self._sandboxes.bus.subscribe():
            resp = api_pb2.ContainerEventResponse(
                container_id=ev.container_id,
                container_event_type=_EVENT_TYPES[ev.kind],
                created_at=ev.timestamp_ns,
            )
            pod = self._sandboxes.pods.get(ev.sandbox_id)
            if pod is not None:
                resp.pod_sandbox_status.CopyFrom(conv.pod_status(pod))
                resp.containers_statuses.extend(
                    conv.container_status(c) for c in self._sandboxes.containers_of(pod.id)
                )
            yield resp
