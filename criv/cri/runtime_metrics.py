"""RuntimeService pod metrics and pod resize RPCs (a mixin of RuntimeService).

ListMetricDescriptors / ListPodSandboxMetrics: cAdvisor-named metrics of every ready
pod and its running containers (:mod:`criv.cri.metrics_convert`): the containers' from
the agent's stats, the pod's network and host cost measured by criv
(:mod:`criv.sandbox.podmetrics`). UpdatePodSandboxResources:
:mod:`criv.sandbox.podresources`.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from criv.cri import metrics_convert as mconv
from criv.sandbox.manager import SandboxManager
from criv.sandbox.podmetrics import PodUsage, pod_usage
from criv.sandbox.podresources import update_pod_resources
from criv.sandbox.records import PodRecord
from criv.sandbox.specs import PodFilter
from criv.sandbox.states import ContainerState, PodState
from criv.sandbox.stats import ContainerSample
from criv_agent.api.runtime.v1 import api_pb2


class MetricsRpcs:
    _sandboxes: SandboxManager

    async def ListMetricDescriptors(
        self, request: api_pb2.ListMetricDescriptorsRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ListMetricDescriptorsResponse:
        return api_pb2.ListMetricDescriptorsResponse(descriptors=mconv.descriptors())

    async def ListPodSandboxMetrics(
        self, request: api_pb2.ListPodSandboxMetricsRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ListPodSandboxMetricsResponse:
        sb = self._sandboxes
        pods = [p for p in sb.list_pods(PodFilter()) if p.state is PodState.READY]
        running = [
            c for p in pods for c in sb.containers_of(p.id) if c.state is ContainerState.RUNNING
        ]
        samples = await sb.container_stats([c.id for c in running])
        usages = await asyncio.gather(*(pod_usage(p, sb.paths(p.id)) for p in pods))
        ts = time.time_ns()
        out = []
        for pod, usage in zip(pods, usages, strict=True):
            out.append(self._one_pod(pod, usage, ts, samples))
        return api_pb2.ListPodSandboxMetricsResponse(pod_metrics=out)

    def _one_pod(
        self, pod: PodRecord, usage: PodUsage, ts: int, samples: dict[str, ContainerSample]
    ) -> api_pb2.PodSandboxMetrics:
        containers = []
        for c in self._sandboxes.containers_of(pod.id):
            sample = samples.get(c.id)
            if sample is not None:
                containers.append(mconv.container_metrics(pod, c, sample.stats))
        return mconv.pod_metrics(pod, usage, containers, ts)

    async def UpdatePodSandboxResources(
        self,
        request: api_pb2.UpdatePodSandboxResourcesRequest,
        context: grpc.aio.ServicerContext,
    ) -> api_pb2.UpdatePodSandboxResourcesResponse:
        await update_pod_resources(
            self._sandboxes.ctx, request.pod_sandbox_id, request.resources, request.overhead
        )
        return api_pb2.UpdatePodSandboxResourcesResponse()
