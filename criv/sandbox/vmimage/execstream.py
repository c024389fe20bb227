"""Interactive exec in a vm-image VM: a STDIO data stream (``criv_agent.execframes``)
joined to an SSH session (:class:`criv.vmimage.sshstream.SSHStream`).

Host -> here: STDIN bytes, CLOSE 0 (stdin EOF), RESIZE (tty). Here -> host: STDOUT and
STDERR bytes, CLOSE 1/2 at their end, then EXIT with the command's status; the
connection closes after it. A host that goes away closes the SSH session (the command
is killed, :meth:`SSHStream.close`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from criv.errors import CrivError
from criv.vmimage.sshstream import SSHStream
from criv_agent import execframes as fr

log = logging.getLogger("criv.sandbox.vmimage")


@dataclass(frozen=True)
class PendingExec:
    cmd: list[str]
    tty: bool
    stdin: bool


async def run_exec(
    open_stream: Callable[[], Awaitable[SSHStream]],
    ex: PendingExec,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    try:
        stream = await open_stream()
    except CrivError as e:
        msg = f"exec: {e}\r\n".encode()
        writer.write(fr.frame(fr.STDERR, msg[: fr.MAX_FRAME]))
        writer.write(fr.exit_frame(255))
        await writer.drain()
        return
    try:
        if not ex.stdin:
            await stream.close_stdin()
        pumps = [_out(stream.read_stdout, fr.STDOUT, writer)]
        if not ex.tty:
            pumps.append(_out(stream.read_stderr, fr.STDERR, writer))
        inbound = asyncio.ensure_future(_in(stream, reader, ex.stdin))
        try:
            await asyncio.gather(*pumps)
            code = await stream.wait()
        finally:
            inbound.cancel()
            with contextlib.suppress(BaseException):
                await inbound
        writer.write(fr.exit_frame(code))
        await writer.drain()
    except CrivError as e:
        log.info("exec stream ended: %s", e)
    finally:
        await stream.close()


async def _out(
    read: Callable[[], Awaitable[bytes]], kind: int, writer: asyncio.StreamWriter
) -> None:
    while data := await read():
        writer.write(fr.frame(kind, data))
        await writer.drain()
    writer.write(fr.close_frame(kind))
    await writer.drain()


async def _in(stream: SSHStream, reader: asyncio.StreamReader, stdin: bool) -> None:
    try:
        while True:
            kind, payload = await fr.read_frame(reader)
            if kind == fr.STDIN and stdin:
                await stream.write_stdin(payload)
            elif kind == fr.CLOSE and payload[:1] == bytes([fr.STDIN]):
                await stream.close_stdin()
            elif kind == fr.RESIZE:
                size = fr.parse_resize(payload)
                if size is not None and size[0] and size[1]:
                    await stream.resize(*size)
    except (asyncio.IncompleteReadError, ConnectionError, fr.FrameTooLarge):
        # the host went away (or sent garbage): end stdin; the output side decides
        with contextlib.suppress(CrivError):
            await stream.close_stdin()
