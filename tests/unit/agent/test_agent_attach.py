"""The agent's attach plumbing (criv_agent/attach.py) over plain pipes and sockets: fan-out,
stdin, stdin_once, slow sessions, and the end of output."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest

from criv_agent import attach
from criv_agent.attach import ContainerIO, serve_attach
from criv_agent.execframes import CLOSE, EXIT, STDIN, STDOUT, frame, read_frame


async def session(
    io: ContainerIO, code: int = 0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Task[None]]:
    """The host end of an attach session served over a socketpair."""
    a, b = socket.socketpair()
    host_r, host_w = await asyncio.open_connection(sock=a)
    agent_r, agent_w = await asyncio.open_connection(sock=b)

    async def exit_code() -> int:
        return code

    async def serve() -> None:
        try:
            await serve_attach(io, agent_r, agent_w, exit_code)
        finally:
            agent_w.close()

    task = asyncio.create_task(serve())
    await asyncio.sleep(0)  # registered before the test feeds output
    return host_r, host_w, task


async def test_fan_out_stdin_once_and_exit() -> None:
    r, w = os.pipe()
    io = ContainerIO(tty=False, stdin_once=True, stdin_fd=w, master_fd=None)
    r1, w1, t1 = await session(io, code=3)
    r2, w2, t2 = await session(io, code=3)
    io.feed("stdout", b"to both\n")
    for rd in (r1, r2):
        assert await read_frame(rd) == (STDOUT, b"to both\n")
    # stdin from a session reaches the container; its EOF closes the container's stdin
    w1.write(frame(STDIN, b"typed\n") + frame(CLOSE, b"\0"))
    await w1.drain()
    async with asyncio.timeout(5):
        got = b""
        while chunk := await asyncio.to_thread(os.read, r, 100):
            got += chunk
    assert got == b"typed\n" and not io.has_stdin
    os.close(r)
    # the end of output ends every session with the exit code
    io.stream_ended("stdout")
    io.stream_ended("stderr")
    for rd in (r1, r2):
        assert await read_frame(rd) == (CLOSE, bytes([STDOUT]))
        assert await read_frame(rd) == (CLOSE, b"\x02")
        assert await read_frame(rd) == (EXIT, struct.pack(">i", 3))
    await asyncio.gather(t1, t2)
    assert not io.sessions
    for wr in (w1, w2):
        wr.close()
    io.close()


async def test_detaching_keeps_stdin_without_stdin_once() -> None:
    r, w = os.pipe()
    io = ContainerIO(tty=False, stdin_once=False, stdin_fd=w, master_fd=None)
    _r1, w1, t1 = await session(io)
    w1.write(frame(CLOSE, b"\0"))
    await w1.drain()
    w1.close()  # the host leaves: a detach, never the container's end
    await asyncio.wait_for(t1, 5)
    assert io.has_stdin and not io.sessions
    io.close()
    os.close(r)


async def test_slow_session_loses_output_instead_of_blocking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(attach, "SESSION_BUFFER", 1000)
    io = ContainerIO(tty=False, stdin_once=False, stdin_fd=None, master_fd=None)
    s = io.new_session()
    for _ in range(10):
        io.feed("stdout", b"x" * 300)  # never waits, whatever the session does
    assert s._size <= 1000
    io.sessions.discard(s)
    io.close()


async def test_attach_after_output_ended_gets_exit_at_once() -> None:
    io = ContainerIO(tty=False, stdin_once=False, stdin_fd=None, master_fd=None)
    io.stream_ended("stdout")
    io.stream_ended("stderr")
    rd, wr, task = await session(io, code=0)
    assert await read_frame(rd) == (EXIT, struct.pack(">i", 0))
    await asyncio.wait_for(task, 5)
    wr.close()
