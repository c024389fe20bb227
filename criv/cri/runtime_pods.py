"""RuntimeService pod sandbox RPCs (a mixin of RuntimeService): proto <-> sandbox."""

from __future__ import annotations

import time

import grpc

from criv.config import Config
from criv.cri import runtime_convert as conv
from criv.cri.protomemo import ProtoMemo
from criv.sandbox.manager import SandboxManager
from criv.sandbox.records import ContainerRecord, PodRecord
from criv_agent.api.runtime.v1 import api_pb2


class PodSandboxRpcs:
    _config: Config
    _sandboxes: SandboxManager
    _pod_items: ProtoMemo[PodRecord, api_pb2.PodSandbox]

    async def RunPodSandbox(
        self, request: api_pb2.RunPodSandboxRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.RunPodSandboxResponse:
        pod_id = await self._sandboxes.run_pod(conv.pod_spec(request))
        return api_pb2.RunPodSandboxResponse(pod_sandbox_id=pod_id)

    async def StopPodSandbox(
        self, request: api_pb2.StopPodSandboxRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.StopPodSandboxResponse:
        await self._sandboxes.stop_pod(request.pod_sandbox_id)
        return api_pb2.StopPodSandboxResponse()

    async def RemovePodSandbox(
        self, request: api_pb2.RemovePodSandboxRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.RemovePodSandboxResponse:
        await self._sandboxes.remove_pod(request.pod_sandbox_id)
        return api_pb2.RemovePodSandboxResponse()

    async def PodSandboxStatus(
        self, request: api_pb2.PodSandboxStatusRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.PodSandboxStatusResponse:
        pod = self._sandboxes.pod_status(request.pod_sandbox_id)
        resp = api_pb2.PodSandboxStatusResponse(
            status=conv.pod_status(pod),
            containers_statuses=[
                conv.container_status(c) for c in self._sandboxes.containers_of(pod.id)
            ],
            timestamp=time.time_ns(),
        )
        if request.verbose:
            resp.info.update(conv.pod_verbose_info(pod, str(self._sandboxes.paths(pod.id).state)))
        return resp

    async def ListPodSandbox(
        self, request: api_pb2.ListPodSandboxRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ListPodSandboxResponse:
        f = conv.pod_filter(request.filter)
        return api_pb2.ListPodSandboxResponse(
            items=self._pod_items.items(self._sandboxes.list_pods(f))
        )

    async def PodSandboxStats(
        self, request: api_pb2.PodSandboxStatsRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.PodSandboxStatsResponse:
        pod = self._sandboxes.pod_status(request.pod_sandbox_id)
        (stats,) = await self._pod_stats([pod.id])
        return api_pb2.PodSandboxStatsResponse(stats=stats)

    async def ListPodSandboxStats(
        self, request: api_pb2.ListPodSandboxStatsRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ListPodSandboxStatsResponse:
        f = request.filter
        pods = self._sandboxes.list_pods(
            conv.pod_filter(api_pb2.PodSandboxFilter(id=f.id, label_selector=f.label_selector))
        )
        ready = [p.id for p in pods if p.state.value == "ready"]
        return api_pb2.ListPodSandboxStatsResponse(stats=await self._pod_stats(ready))

    async def _pod_stats(self, pod_ids: list[str]) -> list[api_pb2.PodSandboxStats]:
        containers = [c for p in pod_ids for c in self._sandboxes.containers_of(p)]
        per_container = await self._container_stats(containers)
        out = []
        ts = time.time_ns()
        for pid in pod_ids:
            pod = self._sandboxes.pod_status(pid)
            mine = [per_container[c.id] for c in containers if c.sandbox_id == pid]
            procs = sum(n for _, n in mine)
            out.append(conv.pod_stats(pod, [s for s, _ in mine], procs, ts))
        return out

    async def _container_stats(
        self, containers: list[ContainerRecord]
    ) -> dict[str, tuple[api_pb2.ContainerStats, int]]:
        """Stats and process count per container."""
        samples = await self._sandboxes.container_stats([c.id for c in containers])
        out: dict[str, tuple[api_pb2.ContainerStats, int]] = {}
        for c in containers:
            sample = samples.get(c.id)
            s = sample.stats if sample is not None else None
            nano = sample.nano_cores if sample is not None else None
            out[c.id] = (
                conv.container_stats(c, s, nano, c.rootfs),
                s.process_count if s is not None else 0,
            )
        return out
