"""The Python gRPC floor: a CRI server that does nothing but answer.

It serves ``Status``, ``ListPodSandbox`` and ``ListContainers`` with empty replies on the
same stack as criv's daemon (``grpc.aio``, criv's error interceptor, the same options),
so beside criv and containerd it shows what any Python CRI server pays per call under
the same load; what criv adds over it is criv's own work.

    .venv/bin/python bench/grpcfloor.py SOCKET

Used by density.py through ``floor_runtime``; figures only.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Runtime

from criv.cri.wire import cri_server
from criv_agent.api.runtime.v1 import api_pb2, api_pb2_grpc


class EmptyRuntime(api_pb2_grpc.RuntimeServiceServicer):
    """Answers the three calls the density bench times. Anything else reaches the generated
    servicer's stub, which the error interceptor turns into INTERNAL: nothing calls it."""

    async def Status(
        self, request: api_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.StatusResponse:
        return api_pb2.StatusResponse()

    async def ListPodSandbox(
        self, request: api_pb2.ListPodSandboxRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ListPodSandboxResponse:
        return api_pb2.ListPodSandboxResponse()

    async def ListContainers(
        self, request: api_pb2.ListContainersRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ListContainersResponse:
        return api_pb2.ListContainersResponse()


async def serve(socket: Path) -> None:
    server = cri_server()  # as criv's daemon builds its own
    # mypy sees the generated servicer's other methods as abstract
    floor = EmptyRuntime()  # type: ignore[abstract]
    api_pb2_grpc.add_RuntimeServiceServicer_to_server(floor, server)
    server.add_insecure_port(f"unix:{socket}")
    await server.start()
    await server.wait_for_termination()


@contextlib.contextmanager
def floor_runtime(root: Path) -> Iterator[Runtime]:
    """The floor server in a process of its own session, as criv's daemon runs."""
    socket = root / "grpc-floor.sock"
    proc = subprocess.Popen(
        [sys.executable, __file__, str(socket)], stdin=subprocess.DEVNULL, start_new_session=True
    )
    try:
        r = Runtime(socket)
        r.name = "grpc floor"
        try:
            yield r
        finally:
            r.close()
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    asyncio.run(serve(Path(sys.argv[1])))
