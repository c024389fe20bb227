"""Exec and attach sessions (the remotecommand protocol), independent of the transport.

A transport (SPDY streams, or WebSocket channels) hands :func:`run_session` a
:class:`SessionIO` of channels; this module starts the process through the backend,
pumps bytes both ways, applies resizes and reports the end of the session on the error
channel in the form the negotiated protocol version expects (facts sheet sections 5-7).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Protocol

from criv.errors import CrivError
from criv.streaming.backend import ByteReader, ByteWriter, ProcessStreams, StreamingBackend
from criv.streaming.requests import AttachRequest, ExecRequest

log = logging.getLogger("criv.streaming.remotecommand")

V1 = "channel.k8s.io"
V2 = "v2.channel.k8s.io"
V3 = "v3.channel.k8s.io"
V4 = "v4.channel.k8s.io"
V5 = "v5.channel.k8s.io"
SPDY_PROTOCOLS = (V5, V4, V3, V2, V1)

READ_CHUNK = 32 * 1024
# How much resize JSON we hold while waiting for the rest of an object.
MAX_RESIZE_BUFFER = 4096


class InChannel(Protocol):
    async def read(self) -> bytes:
        """Next chunk from the client; b"" at EOF."""
        ...


class OutChannel(Protocol):
    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


@dataclass
class SessionIO:
    """The client side of a session; a None channel does not exist on the wire."""

    version: str
    error: OutChannel
    stdin: InChannel | None = None
    stdout: OutChannel | None = None
    stderr: OutChannel | None = None
    resize: InChannel | None = None


def structured_status(version: str) -> bool:
    """v4 and v5 report a JSON metav1.Status; older versions plain text on failure only."""
    return version in (V4, V5)


def _dumps(doc: dict[str, object]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def success_status(version: str) -> bytes:
    return _dumps({"metadata": {}, "status": "Success"}) if structured_status(version) else b""


def exit_status(version: str, cmd: list[str], code: int) -> bytes:
    if code == 0:
        return success_status(version)
    text = f"error executing command {_go_list(cmd)}, exit code {code}"
    message = f"command terminated with non-zero exit code: {text}"
    if not structured_status(version):
        return message.encode()
    return _dumps(
        {
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
        }
    )


def internal_error_status(version: str, err: str) -> bytes:
    if not structured_status(version):
        return err.encode()
    return _dumps(
        {
            "metadata": {},
            "status": "Failure",
            "message": f"Internal error occurred: {err}",
            "reason": "InternalError",
            "details": {"causes": [{"message": err}]},
            "code": 500,
        }
    )


def _go_list(items: list[str]) -> str:
    return "[" + " ".join(items) + "]"  # how Go's %v prints a []string


class ResizeParser:
    """A stream of JSON objects {"Width":W,"Height":H}, split or packed arbitrarily."""

    def __init__(self) -> None:
        self._buf = ""
        self._decoder = json.JSONDecoder()

    def feed(self, data: bytes) -> list[tuple[int, int]]:
        """Sizes complete so far; raises ValueError on garbage (ends resize handling)."""
        self._buf += data.decode("utf-8", "replace")
        out: list[tuple[int, int]] = []
        while True:
            self._buf = self._buf.lstrip()
            if not self._buf:
                return out
            try:
                obj, end = self._decoder.raw_decode(self._buf)
            except json.JSONDecodeError:
                if len(self._buf) > MAX_RESIZE_BUFFER:
                    raise ValueError("resize stream is not JSON") from None
                return out  # most likely an object split across messages
            self._buf = self._buf[end:]
            if not isinstance(obj, dict):
                raise ValueError("resize message is not an object")
            keys = {str(k).lower(): v for k, v in obj.items()}  # Go matches keys loosely
            w, h = keys.get("width", 0), keys.get("height", 0)
            if not all(isinstance(v, int) and 0 <= v <= 0xFFFF for v in (w, h)):
                raise ValueError("resize values out of range")
            out.append((w, h))


async def _copy_out(src: ByteReader, dst: OutChannel | None) -> None:
    while data := await src.read(READ_CHUNK):
        if dst is not None:
            await dst.write(data)


async def _copy_in(src: InChannel, dst: ByteWriter | None) -> None:
    while data := await src.read():
        if dst is not None:
            await dst.write(data)
    if dst is not None:  # the client's half-close (FIN, or v5 [255,0]) closes stdin
        await dst.close()


async def _apply_resizes(src: InChannel, proc: ProcessStreams) -> None:
    parser = ResizeParser()
    try:
        while data := await src.read():
            for w, h in parser.feed(data):
                await proc.resize(w, h)
    except ValueError as e:
        # The session goes on without resizes; what else arrives is read and dropped, so
        # the connection's reader never waits on a channel nobody empties.
        log.debug("resize stream ended: %s", e)
        while await src.read():
            pass


async def run_session(
    backend: StreamingBackend,
    request: ExecRequest | AttachRequest,
    io: SessionIO,
    client_gone: asyncio.Event,
) -> bool:
    """Run one exec/attach to its end. Returns True if a status went out, False if the
    client went away first (then nothing more is sent)."""
    is_exec = isinstance(request, ExecRequest)
    try:
        if isinstance(request, ExecRequest):
            proc = await backend.exec(request.container_id, request.cmd, request.tty, request.stdin)
        else:
            proc = await backend.attach(request.container_id, request.tty, request.stdin)
    except (CrivError, OSError) as e:
        what = "executing command in" if is_exec else "attaching to"
        err = f"error {what} container: {getattr(e, 'message', None) or e}"
        await _finish(io, internal_error_status(io.version, err))
        return True

    tasks: list[asyncio.Task[None]] = []
    outputs: list[asyncio.Task[None]] = []
    if proc.stdout is not None:
        outputs.append(asyncio.create_task(_copy_out(proc.stdout, io.stdout)))
    if proc.stderr is not None:
        outputs.append(asyncio.create_task(_copy_out(proc.stderr, io.stderr)))
    # Resizes first: tasks start in creation order, so a size the client sent before its
    # first input (client-go sends the initial size at once) reaches the terminal first.
    if io.resize is not None:
        tasks.append(asyncio.create_task(_apply_resizes(io.resize, proc)))
    if io.stdin is not None:
        tasks.append(asyncio.create_task(_copy_in(io.stdin, proc.stdin)))

    async def finished() -> int:
        # All output first (so nothing is lost), then the exit code.
        await asyncio.gather(*outputs)
        return await proc.wait()

    done_task = asyncio.create_task(finished())
    gone_task = asyncio.create_task(client_gone.wait())
    try:
        await asyncio.wait({done_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
        if not done_task.done():
            log.debug("client left during %s; closing its streams", type(request).__name__)
            return False
        try:
            code = done_task.result()
        except (CrivError, OSError) as e:
            await _finish(io, internal_error_status(io.version, f"error streaming: {e}"))
            return True
        if isinstance(request, ExecRequest):
            await _finish(io, exit_status(io.version, request.cmd, code))
        else:  # an attach that ended normally
            await _finish(io, success_status(io.version))
        return True
    finally:
        for t in [*tasks, *outputs, done_task, gone_task]:
            t.cancel()
        await asyncio.gather(*tasks, *outputs, done_task, gone_task, return_exceptions=True)
        with contextlib.suppress(CrivError, OSError):
            await proc.close()


async def _finish(io: SessionIO, status: bytes) -> None:
    """The ending the clients rely on: output EOF, then one status, then error EOF."""
    for ch in (io.stdout, io.stderr):
        if ch is not None:
            await ch.close()
    if status:
        await io.error.write(status)
    await io.error.close()
