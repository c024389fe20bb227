"""Error mapping: CrivError -> its status; anything else -> INTERNAL; missing RPCs named."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from criv.cri.runtime_service import RuntimeService
from criv.cri.wire import ErrorInterceptor
from criv.errors import NotFound
from criv_agent.api.runtime.v1 import api_pb2, api_pb2_grpc


class _Servicer(api_pb2_grpc.ImageServiceServicer):  # type: ignore[misc]
    async def ImageStatus(self, request: object, context: object) -> object:
        raise NotFound("no such image: x")

    async def ListImages(self, request: object, context: object) -> object:
        raise ValueError("boom")


@pytest.fixture
async def channel(tmp_path: object) -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    api_pb2_grpc.add_ImageServiceServicer_to_server(_Servicer(), server)
    api_pb2_grpc.add_RuntimeServiceServicer_to_server(
        RuntimeService.__new__(RuntimeService), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    await server.stop(None)


async def test_crive_error_keeps_its_code(channel: grpc.aio.Channel) -> None:
    stub = api_pb2_grpc.ImageServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.ImageStatus(api_pb2.ImageStatusRequest())
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    assert exc.value.details() == "no such image: x"


async def test_unknown_exception_is_internal(channel: grpc.aio.Channel) -> None:
    stub = api_pb2_grpc.ImageServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.ListImages(api_pb2.ListImagesRequest())
    assert exc.value.code() == grpc.StatusCode.INTERNAL
    assert "boom" in (exc.value.details() or "")


async def test_unimplemented_rpc_names_what_is_missing(channel: grpc.aio.Channel) -> None:
    stub = api_pb2_grpc.RuntimeServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.CheckpointContainer(api_pb2.CheckpointContainerRequest())
    assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "CheckpointContainer" in (exc.value.details() or "")
    assert "criv" in (exc.value.details() or "")


def test_logged_requests_hide_credentials() -> None:
    from criv.cri.wire import _describe

    req = api_pb2.PullImageRequest(
        image=api_pb2.ImageSpec(image="busybox"),
        auth=api_pb2.AuthConfig(
            username="u", password="hunter2", auth="dTpodW50ZXIy", registry_token="rt-6f1c9e"
        ),
    )
    text = _describe(req)
    assert "busybox" in text and "u" in text
    for secret in ("hunter2", "dTpodW50ZXIy", "rt-6f1c9e"):
        assert secret not in text
    assert req.auth.password == "hunter2"  # the request itself is untouched
