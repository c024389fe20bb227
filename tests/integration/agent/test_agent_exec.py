"""ExecSync through a real agent: exit codes, deadline, output cap; PORT_FORWARD."""

from __future__ import annotations

import socket
import struct
import time

import grpc
import pytest

from criv_agent.api.agent.v1 import agent_pb2
from tests.support.agent_harness import Agent, read_frame

pytestmark = pytest.mark.integration


def _running(agent: Agent, cid: str = "box") -> None:
    agent.setup()
    agent.create(cid, ["sleep", "300"])
    agent.start_c(cid)


@pytest.mark.timeout(60)
def test_exec_exit_code_and_output(agent: Agent) -> None:
    _running(agent)
    r = agent.exec("box", ["sh", "-c", "echo out; echo err >&2; exit 5"])
    assert (r.exit_code, r.stdout, r.stderr) == (5, b"out\n", b"err\n")
    assert not r.timed_out and not r.output_truncated
    assert agent.exec("box", ["true"]).exit_code == 0


@pytest.mark.timeout(60)
def test_exec_deadline(agent: Agent) -> None:
    _running(agent)
    t0 = time.monotonic()
    r = agent.exec("box", ["sh", "-c", "echo started; sleep 30"], timeout=1)
    assert r.timed_out
    assert time.monotonic() - t0 < 6
    assert r.stdout == b"started\n"
    # the exec'd process is gone, only the container's sleep is left
    ps = agent.exec("box", ["ps", "-o", "args"]).stdout.decode().splitlines()
    assert "sleep 30" not in ps and "sh -c echo started; sleep 30" not in ps


@pytest.mark.timeout(60)
def test_exec_output_cap(agent: Agent) -> None:
    _running(agent)
    r = agent.exec("box", ["sh", "-c", "head -c 1000000 /dev/zero; echo tail >&2"], limit=1000)
    assert r.output_truncated
    assert r.stdout == b"\0" * 1000
    assert r.stderr == b"tail\n"
    assert r.exit_code == 0


@pytest.mark.timeout(60)
def test_exec_in_exited_container_fails(agent: Agent) -> None:
    agent.setup()
    agent.run("gone", ["true"])
    with pytest.raises(grpc.RpcError) as e:
        agent.exec("gone", ["true"])
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.timeout(60)
def test_port_forward(agent: Agent) -> None:
    _running(agent)
    with socket.socket() as probe:  # a free port in the agent's (here: the host's) netns
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    agent.create("srv", ["nc", "-l", "-p", str(port), "-e", "echo", "hello"])
    agent.start_c("srv")

    def open_stream(msg: agent_pb2.StreamOpen) -> tuple[socket.socket, agent_pb2.StreamAccept]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(agent.data)
        body = msg.SerializeToString()
        s.sendall(struct.pack(">I", len(body)) + body)
        return s, agent_pb2.StreamAccept.FromString(read_frame(s))

    deadline = time.monotonic() + 10
    while True:
        s, acc = open_stream(agent_pb2.StreamOpen(kind=agent_pb2.StreamOpen.PORT_FORWARD,
                                                  port=port))  # fmt: skip
        if acc.ok or time.monotonic() > deadline:
            break
        s.close()
        time.sleep(0.1)
    with s:
        assert acc.ok, acc.error
        data = b""
        while chunk := s.recv(100):
            data += chunk
        assert data == b"hello\n"
    s, acc = open_stream(agent_pb2.StreamOpen(kind=agent_pb2.StreamOpen.LOG, container_id="no"))
    s.close()
    assert not acc.ok
