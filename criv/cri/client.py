"""A small synchronous CRI client for criv's operator commands (`criv pods`, `inspect`,
...): it asks the running daemon through its socket, as kubelet would, and hands back
plain data (no protobuf outside `criv/cri/`).

Pod and container details come from the verbose status (criv's record facts:
``isolationState``, ``stateDir``, pids), so the commands never guess criv's names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from criv.errors import CrivError, InvalidArgument, NotFound, Unavailable
from criv_agent.api.runtime.v1 import api_pb2, api_pb2_grpc

CALL_TIMEOUT = 30.0

_POD_STATES = {api_pb2.SANDBOX_READY: "ready", api_pb2.SANDBOX_NOTREADY: "notready"}
_CONTAINER_STATES = {
    api_pb2.CONTAINER_CREATED: "created",
    api_pb2.CONTAINER_RUNNING: "running",
    api_pb2.CONTAINER_EXITED: "exited",
    api_pb2.CONTAINER_UNKNOWN: "unknown",
}


@dataclass(frozen=True)
class PodView:
    id: str
    name: str
    namespace: str
    state: str  # criv's own (pending, ready, notready)
    ips: list[str]
    created_at_ns: int
    mode: str
    info: dict[str, Any]  # the verbose info (isolationState, stateDir, pid, ...)
    status: dict[str, Any]  # the CRI status as JSON
    container_ids: list[str] = field(default_factory=list)

    @property
    def isolation_state(self) -> dict[str, Any]:
        st = self.info.get("isolationState")
        return st if isinstance(st, dict) else {}

    @property
    def state_dir(self) -> Path | None:
        d = self.info.get("stateDir")
        return Path(d) if isinstance(d, str) and d else None


@dataclass(frozen=True)
class ContainerView:
    id: str
    name: str
    pod_id: str
    state: str
    image: str
    created_at_ns: int
    started_at_ns: int
    pid: int  # the container's init, as the agent sees it (a guest pid in vm pods)
    working_set_bytes: int | None
    info: dict[str, Any]
    status: dict[str, Any]


def _unavailable(socket: Path, e: grpc.RpcError) -> CrivError:
    code = e.code()
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(e.details() or "not found")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(e.details() or "invalid argument")
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"criv is not answering on {socket} (is `criv serve` running?)")
    return Unavailable(f"criv on {socket}: {code.name}: {e.details()}")


def _info(raw: Any) -> dict[str, Any]:
    try:
        data = json.loads(raw.get("info", "{}"))
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


class CriClient:
    def __init__(self, socket: Path) -> None:
        self.socket = socket
        if not socket.exists():
            raise Unavailable(f"no criv socket at {socket} (is `criv serve` running?)")
        self._channel = grpc.insecure_channel(
            f"unix:{socket}", options=[("grpc.max_receive_message_length", 16 << 20)]
        )
        self._rt = api_pb2_grpc.RuntimeServiceStub(self._channel)

    def __enter__(self) -> CriClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._channel.close()

    def _call(self, rpc: str, request: Any) -> Any:
        try:
            return getattr(self._rt, rpc)(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as e:
            raise _unavailable(self.socket, e) from None

    # -- pods ----------------------------------------------------------------------------

    def pod(self, pod_id: str) -> PodView:
        """One pod by id or unique id prefix (NotFound when there is none)."""
        resp = self._call(
            "PodSandboxStatus", api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True)
        )
        s = resp.status
        info = _info(resp.info)
        ips = [s.network.ip] if s.network.ip else []
        ips += [a.ip for a in s.network.additional_ips]
        return PodView(
            id=s.id,
            name=s.metadata.name,
            namespace=s.metadata.namespace,
            state=str(info.get("state") or _POD_STATES.get(s.state, "unknown")),
            ips=ips,
            created_at_ns=s.created_at,
            mode=str(info.get("isolation", "")),
            info=info,
            status=MessageToDict(s),
            container_ids=sorted(c.id for c in resp.containers_statuses),
        )

    def pods(self) -> list[PodView]:
        items = self._call("ListPodSandbox", api_pb2.ListPodSandboxRequest()).items
        out = []
        for p in items:
            try:
                out.append(self.pod(p.id))
            except NotFound:
                continue  # removed between the list and the status
        return sorted(out, key=lambda p: p.created_at_ns)

    # -- containers ----------------------------------------------------------------------

    def _working_sets(self) -> dict[str, int]:
        resp = self._call("ListContainerStats", api_pb2.ListContainerStatsRequest())
        return {
            s.attributes.id: s.memory.working_set_bytes.value
            for s in resp.stats
            if s.HasField("memory") and s.memory.HasField("working_set_bytes")
        }

    def _container(self, cid: str, working_sets: dict[str, int]) -> ContainerView:
        resp = self._call(
            "ContainerStatus", api_pb2.ContainerStatusRequest(container_id=cid, verbose=True)
        )
        s = resp.status
        info = _info(resp.info)
        pid = info.get("pid")
        return ContainerView(
            id=s.id,
            name=s.metadata.name,
            pod_id=str(info.get("sandboxID", "")),
            state=_CONTAINER_STATES.get(s.state, "unknown"),
            image=s.image.image,
            created_at_ns=s.created_at,
            started_at_ns=s.started_at,
            pid=pid if isinstance(pid, int) else 0,
            working_set_bytes=working_sets.get(s.id),
            info=info,
            status=MessageToDict(s),
        )

    def container(self, cid: str) -> ContainerView:
        """One container by id or unique id prefix (NotFound when there is none)."""
        return self._container(cid, self._working_sets())

    def containers(self) -> list[ContainerView]:
        items = self._call("ListContainers", api_pb2.ListContainersRequest()).containers
        sets = self._working_sets()
        out = []
        for c in items:
            try:
                out.append(self._container(c.id, sets))
            except NotFound:
                continue
        return sorted(out, key=lambda c: c.created_at_ns)
