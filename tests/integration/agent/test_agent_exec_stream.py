"""Interactive exec: StartExec plus a STDIO data stream (frames per agent.proto)."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from criv_agent.api.agent.v1 import agent_pb2
from criv_agent.execframes import CLOSE, EXIT, RESIZE, STDERR, STDIN, STDOUT, frame
from tests.support.agent_harness import Agent, read_frame

pytestmark = pytest.mark.integration


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def _open(agent: Agent, cid: str, cmd: list[str], tty: bool, stdin: bool) -> socket.socket:
    exec_id = agent.stub.StartExec(
        agent_pb2.StartExecRequest(container_id=cid, cmd=cmd, tty=tty, stdin=stdin), timeout=10
    ).exec_id
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(agent.data)
    body = agent_pb2.StreamOpen(kind=agent_pb2.StreamOpen.STDIO, exec_id=exec_id)
    raw = body.SerializeToString()
    s.sendall(struct.pack(">I", len(raw)) + raw)
    acc = agent_pb2.StreamAccept.FromString(read_frame(s))
    assert acc.ok, acc.error
    return s


def _collect(s: socket.socket) -> tuple[dict[int, bytes], list[int], int]:
    out: dict[int, bytes] = {STDOUT: b"", STDERR: b""}
    closed: list[int] = []
    while True:
        kind, n = struct.unpack(">BI", _recv_exact(s, 5))
        payload = _recv_exact(s, n)
        if kind in (STDOUT, STDERR):
            out[kind] += payload
        elif kind == CLOSE:
            closed.append(payload[0])
        elif kind == EXIT:
            (code,) = struct.unpack(">i", payload)
            assert s.recv(1) == b""  # the agent closes after EXIT
            return out, closed, code


def _running(agent: Agent) -> None:
    agent.setup()
    agent.create("box", ["sleep", "300"])
    agent.start_c("box")


@pytest.mark.timeout(60)
def test_exec_stream_stdin_stdout_stderr_exit(agent: Agent) -> None:
    _running(agent)
    with _open(agent, "box", ["sh", "-c", "cat; echo bye >&2; exit 4"], False, True) as s:
        s.sendall(frame(STDIN, b"hello\n") + frame(STDIN, b"world\n") + frame(CLOSE, b"\0"))
        out, closed, code = _collect(s)
    assert out == {STDOUT: b"hello\nworld\n", STDERR: b"bye\n"}
    assert sorted(closed) == [STDOUT, STDERR] and code == 4


@pytest.mark.timeout(60)
def test_exec_stream_tty_and_resize(agent: Agent) -> None:
    _running(agent)
    with _open(agent, "box", ["sh", "-c", "read x; stty size; echo got=$x; exit 3"], True,
               True) as s:  # fmt: skip
        s.sendall(frame(RESIZE, struct.pack(">HH", 100, 40)))
        time.sleep(0.2)
        s.sendall(frame(STDIN, b"abc\n"))
        out, _, code = _collect(s)
    text = out[STDOUT].decode().replace("\r", "")
    assert "40 100" in text and "got=abc" in text
    assert code == 3 and out[STDERR] == b""


@pytest.mark.timeout(60)
def test_exec_stream_hangup_kills_process(agent: Agent) -> None:
    _running(agent)
    s = _open(agent, "box", ["sh", "-c", "echo up; sleep 60"], False, False)
    kind, n = struct.unpack(">BI", _recv_exact(s, 5))
    assert (kind, _recv_exact(s, n)) == (STDOUT, b"up\n")
    s.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ps = agent.exec("box", ["ps", "-o", "args"]).stdout.decode().splitlines()
        if "sleep 60" not in ps:
            break
        time.sleep(0.2)
    assert "sleep 60" not in ps


@pytest.mark.timeout(60)
def test_exec_stream_unknown_id(agent: Agent) -> None:
    _running(agent)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(agent.data)
        raw = agent_pb2.StreamOpen(kind=agent_pb2.StreamOpen.STDIO, exec_id="nope")
        body = raw.SerializeToString()
        s.sendall(struct.pack(">I", len(body)) + body)
        acc = agent_pb2.StreamAccept.FromString(read_frame(s))
    assert not acc.ok
