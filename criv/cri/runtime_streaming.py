"""RuntimeService Exec/Attach/PortForward (a mixin of RuntimeService): proto <-> URLs.

The bytes never pass through CRI: each call is checked (the container or sandbox must
exist and be running / ready, as containerd checks) and answered with a single-use URL
on criv's streaming server (criv/streaming, docs/streaming.md). An empty id is left to
the streaming service, which refuses it with the kubelet library's INVALID_ARGUMENT.
"""

from __future__ import annotations

import grpc

from criv.sandbox.manager import SandboxManager
from criv.sandbox.streams import require_ready_pod, require_running_container
from criv.streaming.service import StreamingService
from criv_agent.api.runtime.v1 import api_pb2


class StreamingRpcs:
    _sandboxes: SandboxManager
    _streaming: StreamingService

    async def Exec(
        self, request: api_pb2.ExecRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ExecResponse:
        cid = request.container_id
        if cid:
            cid = require_running_container(self._sandboxes.ctx, cid).id
        url = self._streaming.exec_url(
            cid,
            list(request.cmd),
            tty=request.tty,
            stdin=request.stdin,
            stdout=request.stdout,
            stderr=request.stderr,
        )
        return api_pb2.ExecResponse(url=url)

    async def Attach(
        self, request: api_pb2.AttachRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.AttachResponse:
        cid = request.container_id
        if cid:
            cid = require_running_container(self._sandboxes.ctx, cid).id
        url = self._streaming.attach_url(
            cid,
            tty=request.tty,
            stdin=request.stdin,
            stdout=request.stdout,
            stderr=request.stderr,
        )
        return api_pb2.AttachResponse(url=url)

    async def PortForward(
        self, request: api_pb2.PortForwardRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.PortForwardResponse:
        pod_id = request.pod_sandbox_id
        if pod_id:
            pod_id = require_ready_pod(self._sandboxes.ctx, pod_id).id
        url = self._streaming.port_forward_url(pod_id, list(request.port))
        return api_pb2.PortForwardResponse(url=url)
