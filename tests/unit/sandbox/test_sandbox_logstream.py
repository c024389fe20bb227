"""The host side of log streams against a fake agent data socket: handshake, resume
from the persisted offset, reopen at a line boundary."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import struct
from pathlib import Path

import pytest

from criv.agent.logstream import LogFollower, open_log, read_offset
from criv_agent.api.agent.v1 import agent_pb2

LOG = b"".join(b"2026-01-01T00:00:00.000000000Z stdout F line %d\n" % i for i in range(6))


async def serve(path: Path, chunks: list[bytes], seen: list[int]) -> asyncio.Server:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        (n,) = struct.unpack(">I", await r.readexactly(4))
        req = agent_pb2.StreamOpen.FromString(await r.readexactly(n))
        seen.append(req.offset)
        acc = agent_pb2.StreamAccept(ok=True).SerializeToString()
        w.write(struct.pack(">I", len(acc)) + acc)
        data = b"".join(chunks)[req.offset :]
        for i in range(0, len(data), 7):  # odd chunking: lines split across reads
            w.write(data[i : i + 7])
            await w.drain()
            await asyncio.sleep(0.005)
        w.close()

    return await asyncio.start_unix_server(handle, path=str(path))


def test_follow_resume_and_reopen(tmp_path: Path) -> None:
    async def go() -> None:
        sock = tmp_path / "d.sock"
        seen: list[int] = []
        server = await serve(sock, [LOG], seen)
        log = tmp_path / "logs" / "c.log"
        offset = tmp_path / "log.offset"
        offset.write_text(str(len(LOG) // 2 - 3))  # resume mid-line, as after a restart
        f = LogFollower(str(sock), "c1", log, offset)
        f.start()
        await asyncio.sleep(0.01)
        log.rename(tmp_path / "logs" / "c.log.1")
        await asyncio.to_thread(f.reopen)
        assert await f.wait(5)
        server.close()
        assert seen == [len(LOG) // 2 - 3]
        assert read_offset(offset) == len(LOG)
        old = (tmp_path / "logs" / "c.log.1").read_bytes()
        new = log.read_bytes()
        assert old + new == LOG[len(LOG) // 2 - 3 :]
        assert new == b"" or new.startswith(b"2026-")  # the switch happened at a line start

    asyncio.run(go())


def test_refused_stream_ends_follower(tmp_path: Path) -> None:
    async def go() -> None:
        sock = tmp_path / "d.sock"

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            (n,) = struct.unpack(">I", await r.readexactly(4))
            await r.readexactly(n)
            acc = agent_pb2.StreamAccept(ok=False, error="no such container").SerializeToString()
            w.write(struct.pack(">I", len(acc)) + acc)
            w.close()

        server = await asyncio.start_unix_server(handle, path=str(sock))
        f = LogFollower(str(sock), "c1", tmp_path / "c.log", tmp_path / "off")
        f.start()
        assert await f.wait(5)
        server.close()

    asyncio.run(go())


def test_open_log_creates_a_regular_file_and_refuses_links_and_fifos(tmp_path: Path) -> None:
    log = tmp_path / "0.log"
    os.close(open_log(log))
    assert log.is_file() and stat.S_IMODE(log.stat().st_mode) & ~0o640 == 0
    target = tmp_path / "elsewhere"
    target.write_text("keep\n")
    link = tmp_path / "1.log"
    link.symlink_to(target)
    with pytest.raises(OSError) as e:
        open_log(link)
    assert e.value.errno == errno.ELOOP
    assert target.read_text() == "keep\n"
    fifo = tmp_path / "2.log"
    os.mkfifo(fifo)
    with pytest.raises(OSError):  # ENXIO: no reader; never blocks waiting for one
        open_log(fifo)
