"""Exec and port-forward through a real criv-agent (host mode) behind criv's server.

The agent runs a busybox container with crun; criv's AgentStreamingBackend reaches it
through StartExec and the STDIO / PORT_FORWARD data streams, exactly the path pods take.
Needs root, crun and busybox-static (skipped otherwise).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
from streaming_support import EchoServer

from criv.agent.logstream import open_stream
from criv.config import StreamingConfig
from criv.streaming.agent_backend import AgentStreamingBackend, DataStreamParams
from criv.streaming.server import StreamingServer
from criv.streaming.service import StreamingService
from criv_agent.api.agent.v1 import agent_pb2, agent_pb2_grpc
from tests.support.agent_harness import BUSYBOX, CRUN, Agent, build_rootfs, copy_rootfs
from tests.support.spdy_client import SpdyClient, forward_one, spdy_exec

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.geteuid() != 0 or not os.path.exists(CRUN) or not os.path.exists(BUSYBOX),
        reason="needs root, crun and busybox-static",
    ),
]

BLOB_MIB = 100


class HarnessLink:
    """What the daemon's link does, against one harness agent."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.channel = grpc.aio.insecure_channel(f"unix:{agent.control}")
        self.stub = agent_pb2_grpc.AgentStub(self.channel)

    async def start_exec(
        self, container_id: str, cmd: list[str], tty: bool, stdin: bool
    ) -> tuple[str, str]:
        req = agent_pb2.StartExecRequest(container_id=container_id, cmd=cmd, tty=tty, stdin=stdin)
        resp = await self.stub.StartExec(req, timeout=10)
        return self.agent.sandbox_id, str(resp.exec_id)

    async def open_data_stream(
        self, sandbox_id: str, params: DataStreamParams
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        assert sandbox_id == self.agent.sandbox_id
        kind = {
            "stdio": agent_pb2.StreamOpen.STDIO,
            "port_forward": agent_pb2.StreamOpen.PORT_FORWARD,
        }
        req = agent_pb2.StreamOpen(
            kind=kind[params.kind],
            container_id=params.container_id,
            port=params.port,
            exec_id=params.exec_id,
        )
        return await open_stream(self.agent.data, req)


@dataclass
class AgentStack:
    agent: Agent
    service: StreamingService
    blob_sha256: str


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("stream-rootfs")
    yield build_rootfs(d / "rootfs")
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def agent_stack(tmp_path: Path, rootfs: Path) -> AsyncIterator[AgentStack]:
    agent = Agent(tmp_path, rootfs)
    agent.start()
    server = None
    try:
        agent.setup()
        root = copy_rootfs(rootfs, tmp_path / "rootfs-ctr")
        h = hashlib.sha256()
        with (root / "blob").open("wb") as f:
            for _ in range(BLOB_MIB):
                chunk = os.urandom(1 << 20)
                h.update(chunk)
                f.write(chunk)
        agent.create("ctr", ["sleep", "100000"], rootfs=root)
        agent.start_c("ctr")
        link = HarnessLink(agent)
        server = StreamingServer(StreamingConfig(), AgentStreamingBackend(link))
        await server.start()
        yield AgentStack(agent, StreamingService(server), h.hexdigest())
        await link.channel.close()
    finally:
        if server is not None:
            await server.stop()
        agent.shutdown()
        left = agent.leftovers()
        assert not left, f"left behind: {left}\n{agent.stderr()[-3000:]}"


@pytest.mark.timeout(60)
async def test_agent_exec_exit_code_stdin_and_100mib(agent_stack: AgentStack) -> None:
    svc = agent_stack.service
    r = await spdy_exec(svc.exec_url("ctr", ["sh", "-c", "echo out; echo err >&2; exit 7"]))
    assert (r.stdout, r.stderr) == (b"out\n", b"err\n")
    assert r.status["reason"] == "NonZeroExitCode"
    assert r.status["details"] == {"causes": [{"reason": "ExitCode", "message": "7"}]}
    payload = os.urandom(200_000)
    r = await spdy_exec(svc.exec_url("ctr", ["cat"], stdin=True), stdin=payload)
    assert r.stdout == payload and r.status["status"] == "Success"
    r = await spdy_exec(svc.exec_url("ctr", ["cat", "/blob"], stderr=False), stderr=False)
    assert len(r.stdout) == BLOB_MIB << 20
    assert hashlib.sha256(r.stdout).hexdigest() == agent_stack.blob_sha256


@pytest.mark.timeout(60)
async def test_agent_exec_tty_resize_and_websocket(agent_stack: AgentStack) -> None:
    svc = agent_stack.service
    url = svc.exec_url("ctr", ["sh", "-c", "read x; stty size"], tty=True, stdin=True, stderr=False)
    r = await spdy_exec(url, stdin=b"go\n", tty=True, stderr=False, resize=(111, 33))
    assert b"33 111" in r.stdout and r.status["status"] == "Success"
    url = svc.exec_url("ctr", ["sh", "-c", "cat; exit 3"], stdin=True, stderr=False)
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, protocols=["v5.channel.k8s.io"]) as ws,
    ):
        await ws.send_bytes(b"\x00via websocket\n")
        await ws.send_bytes(b"\xff\x00")
        got: dict[int, bytes] = {}
        async for msg in ws:
            got[msg.data[0]] = got.get(msg.data[0], b"") + msg.data[1:]
    assert got[1] == b"via websocket\n"
    assert b'"message":"3"' in got[3]


@pytest.mark.timeout(120)
async def test_agent_exec_tty_quick_commands_keep_their_output(agent_stack: AgentStack) -> None:
    # a command that is over before the agent has received crun's pty: its output is
    # still in the pty (it was lost when crun's exit was taken for a failed start)
    svc = agent_stack.service

    async def one(i: int) -> None:
        url = svc.exec_url("ctr", ["echo", f"line-{i}"], tty=True, stdin=False, stderr=False)
        r = await spdy_exec(url, tty=True, stderr=False)
        assert r.stdout == f"line-{i}\r\n".encode(), (i, r)

    for batch in range(5):  # several at once: the agent's loop is busy, as under load
        await asyncio.gather(*(one(batch * 8 + i) for i in range(8)))


@pytest.mark.timeout(60)
async def test_agent_exec_client_gone_kills_process(agent_stack: AgentStack) -> None:
    svc = agent_stack.service
    url = svc.exec_url("ctr", ["sh", "-c", "echo $$; exec sleep 999"], stderr=False)
    _resp, c = await SpdyClient.connect(url, ["v4.channel.k8s.io"])
    assert c is not None
    await c.open_stream({"streamtype": "error"})
    out = await c.open_stream({"streamtype": "stdout"})
    async with asyncio.timeout(10):
        while b"\n" not in out.data:
            out.got_data.clear()
            await out.got_data.wait()
    pid = int(out.data.split()[0])
    await c.close()
    async with asyncio.timeout(10):
        while True:
            r = await asyncio.to_thread(agent_stack.agent.exec, "ctr", ["kill", "-0", str(pid)])
            if r.exit_code != 0:
                break
            await asyncio.sleep(0.1)


@pytest.mark.timeout(60)
async def test_agent_port_forward_concurrent(
    agent_stack: AgentStack, echo_server: EchoServer
) -> None:
    # The harness pod uses the host network, so the agent reaches the host's echo server.
    url = agent_stack.service.port_forward_url(agent_stack.agent.sandbox_id)
    _resp, c = await SpdyClient.connect(url, ["portforward.k8s.io"])
    assert c is not None
    payloads = [os.urandom(40_000 + i) for i in range(8)]
    got = await asyncio.gather(
        *(forward_one(c, echo_server.port, i, p) for i, p in enumerate(payloads))
    )
    assert got == payloads
    await c.close()
