"""CRI RuntimeService: proto <-> domain for pod sandboxes and containers, nothing else.

The sandbox, container, metrics and streaming RPCs live in :mod:`criv.cri.runtime_pods`,
:mod:`criv.cri.runtime_containers`, :mod:`criv.cri.runtime_metrics` and
:mod:`criv.cri.runtime_streaming` (mixins of
:class:`RuntimeService`). RPCs criv does
not implement yet answer UNIMPLEMENTED with the missing part named (see
``_MISSING``; docs/architecture.md lists them). Every request is checked by
:mod:`criv.cri.validate` before its RPC runs.
"""

from __future__ import annotations

import json
from typing import Any

import grpc

from criv import __version__
from criv.config import Config
from criv.cri import runtime_convert as conv
from criv.cri.protomemo import ProtoMemo
from criv.cri.runtime_containers import ContainerRpcs
from criv.cri.runtime_metrics import MetricsRpcs
from criv.cri.runtime_pods import PodSandboxRpcs
from criv.cri.runtime_streaming import StreamingRpcs
from criv.cri.validate import validate_rpcs
from criv.cri.wire import fill_unimplemented
from criv.sandbox.manager import SandboxManager
from criv.sandbox.readiness import NodeReadiness
from criv.sandbox.userns import SUPPORTED_MODES as USERNS_MODES
from criv.state.runtime_state import RuntimeState
from criv.streaming.service import StreamingService
from criv_agent.api.runtime.v1 import api_pb2, api_pb2_grpc

RUNTIME_NAME = "criv"
RUNTIME_API_VERSION = "v1"

_MISSING = {
    "StreamPodSandboxes": "streaming list RPCs are not supported",
    "StreamContainers": "streaming list RPCs are not supported",
    "StreamContainerStats": "streaming list RPCs are not supported",
    "StreamPodSandboxStats": "streaming list RPCs are not supported",
    "CheckpointContainer": "container checkpoint/restore is not supported",
    "StreamPodSandboxMetrics": "streaming list RPCs are not supported (use ListPodSandboxMetrics)",
}

# isolation modes that make a recursive_read_only mount read-only all the way down:
# host (crun's ``rro``) and vm (mount_setattr on the host side, ``rro`` in the guest)
_RRO_MODES = frozenset({"host", "vm"})


class RuntimeService(
    PodSandboxRpcs,
    ContainerRpcs,
    MetricsRpcs,
    StreamingRpcs,
    api_pb2_grpc.RuntimeServiceServicer,
):
    def __init__(
        self,
        config: Config,
        state: RuntimeState,
        sandboxes: SandboxManager,
        streaming: StreamingService,
    ) -> None:
        self._config = config
        self._state = state
        self._sandboxes = sandboxes
        self._streaming = streaming
        self._readiness = NodeReadiness(config)
        self._pod_items = ProtoMemo(conv.pod_sandbox)
        self._container_items = ProtoMemo(conv.container)

    async def Version(
        self, request: api_pb2.VersionRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.VersionResponse:
        return api_pb2.VersionResponse(
            version="0.1.0",
            runtime_name=RUNTIME_NAME,
            runtime_version=__version__,
            runtime_api_version=RUNTIME_API_VERSION,
        )

    async def Status(
        self, request: api_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.StatusResponse:
        rt = self._readiness.runtime()
        net = self._readiness.network()
        conditions = [
            api_pb2.RuntimeCondition(
                type="RuntimeReady", status=rt.ready, reason=rt.reason, message=rt.message
            ),
            api_pb2.RuntimeCondition(
                type="NetworkReady", status=net.ready, reason=net.reason, message=net.message
            ),
        ]
        resp = api_pb2.StatusResponse(
            status=api_pb2.RuntimeStatus(conditions=conditions),
            # Strict leaves out the image's /etc/group (the agent's spec/users.py)
            features=api_pb2.RuntimeFeatures(supplemental_groups_policy=True),
        )
        if request.verbose:
            info: dict[str, Any] = {
                "version": __version__,
                "config": self._config.public_dict(),
                "pod_cidr": self._state.pod_cidr,
                "streaming": {"url": self._streaming.base_url},
                **self._state.verbose_info(),
            }
            resp.info["info"] = json.dumps(info, sort_keys=True)
        for handler, mode in sorted(self._config.runtime.handlers.items()):
            resp.runtime_handlers.append(
                api_pb2.RuntimeHandler(
                    name=handler,
                    features=api_pb2.RuntimeHandlerFeatures(
                        recursive_read_only_mounts=mode in _RRO_MODES,
                        user_namespaces=mode in USERNS_MODES,
                    ),
                )
            )
        return resp

    async def RuntimeConfig(
        self, request: api_pb2.RuntimeConfigRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.RuntimeConfigResponse:
        driver = api_pb2.SYSTEMD if self._config.cgroup_driver == "systemd" else api_pb2.CGROUPFS
        return api_pb2.RuntimeConfigResponse(
            linux=api_pb2.LinuxRuntimeConfiguration(cgroup_driver=driver)
        )

    async def UpdateRuntimeConfig(
        self, request: api_pb2.UpdateRuntimeConfigRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.UpdateRuntimeConfigResponse:
        cidr = request.runtime_config.network_config.pod_cidr
        if cidr:
            await self._state.set_pod_cidr(cidr)
        return api_pb2.UpdateRuntimeConfigResponse()


validate_rpcs(RuntimeService, "RuntimeService", skip=_MISSING)
fill_unimplemented(RuntimeService, "RuntimeService", _MISSING)
