"""The other edges of issue 13's input list: ExecSync's agent call always has a
deadline, the CRI socket is never reachable with a mode other than 0660, and a request
that does not parse is INVALID_ARGUMENT."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import grpc
import pytest

from criv import daemon
from criv.agent import client as agent_client
from criv.agent.client import CALL_TIMEOUT, EXEC_SYNC_MAX_WAIT, AgentClient
from criv.cri.runtime_containers import STOP_TIMEOUT_MAX
from criv.cri.runtime_service import RuntimeService
from criv.cri.wire import ErrorInterceptor
from criv_agent.api.agent.v1 import agent_pb2
from criv_agent.api.runtime.v1 import api_pb2, api_pb2_grpc


class _Stub:
    def __init__(self) -> None:
        self.timeouts: list[float | None] = []

    async def ExecSync(self, req: Any, timeout: float | None = None) -> Any:
        self.timeouts.append(timeout)
        return agent_pb2.ExecSyncResponse(exit_code=0)


@pytest.mark.parametrize(
    ("command_timeout", "deadline"),
    [
        (0, EXEC_SYNC_MAX_WAIT + CALL_TIMEOUT),  # no command timeout: still a deadline
        (-5, EXEC_SYNC_MAX_WAIT + CALL_TIMEOUT),
        (10, 10 + CALL_TIMEOUT),
        (2**62, EXEC_SYNC_MAX_WAIT + CALL_TIMEOUT),
    ],
)
async def test_exec_sync_agent_call_always_has_a_deadline(
    command_timeout: int, deadline: float
) -> None:
    c = AgentClient("unix:/nonexistent")
    stub = _Stub()
    c._stub = stub  # type: ignore[assignment]
    try:
        await c.exec_sync("c" * 64, ["true"], command_timeout)
    finally:
        await c.close()
    assert stub.timeouts == [deadline]


def test_exec_sync_wait_cap_is_generous() -> None:
    assert agent_client.EXEC_SYNC_MAX_WAIT >= 3600  # an hour at least: commands run long


async def test_cri_socket_is_0660_from_its_first_moment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = tmp_path / "criv.sock"
    seen: list[tuple[int, int]] = []
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        # the moment the socket appears at its path: its mode, and who could reach it
        # before (the directory it was bound in)
        seen.append(
            (stat.S_IMODE(os.stat(src).st_mode), stat.S_IMODE(os.stat(Path(src).parent).st_mode))
        )
        real_replace(src, dst)

    monkeypatch.setattr(daemon.os, "replace", replace)
    server = grpc.aio.server()
    daemon.listen_unix(server, sock)
    await server.start()
    try:
        assert seen == [(0o660, 0o700)]
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660 and stat.S_ISSOCK(sock.stat().st_mode)
        assert [p.name for p in tmp_path.iterdir()] == ["criv.sock"]  # no temp dir left
        async with grpc.aio.insecure_channel(f"unix:{sock}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await ch.unary_unary("/x.Y/Z")(b"", timeout=10)
            assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED  # served at its path
    finally:
        await server.stop(None)


class _Images(api_pb2_grpc.ImageServiceServicer):  # type: ignore[misc]
    async def ImageStatus(self, request: Any, context: Any) -> Any:
        return api_pb2.ImageStatusResponse()


@pytest.mark.parametrize(
    "data",
    [
        b"\n\x02\xc3(",  # image spec: invalid UTF-8 in a string
        b"\n\x40abc",  # a length beyond the end
        b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",  # no message at all
    ],
)
async def test_request_that_does_not_parse_is_invalid_argument(data: bytes) -> None:
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    api_pb2_grpc.add_ImageServiceServicer_to_server(_Images(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            status = ch.unary_unary("/runtime.v1.ImageService/ImageStatus")
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await status(data, timeout=10)
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid message" in (exc.value.details() or "")
            ok = await status(api_pb2.ImageStatusRequest().SerializeToString(), timeout=10)
            assert ok == b""  # a request that parses still reaches the servicer
    finally:
        await server.stop(None)


class _Stopper:
    def __init__(self) -> None:
        self.timeouts: list[int] = []

    async def stop_container(self, cid: str, timeout: int) -> None:
        self.timeouts.append(timeout)


async def test_stop_container_grace_period_is_clamped_below_grpc_deadline_overflow() -> None:
    me = type("Me", (), {"_sandboxes": _Stopper()})()
    for t in (0, 30, 10**10, 2**63 - 1):
        req = api_pb2.StopContainerRequest(container_id="c", timeout=t)
        await RuntimeService.StopContainer(me, req, None)  # type: ignore[arg-type]
    assert me._sandboxes.timeouts == [0, 30, STOP_TIMEOUT_MAX, STOP_TIMEOUT_MAX]
    assert STOP_TIMEOUT_MAX + CALL_TIMEOUT < 2**32  # what a gRPC deadline still takes
