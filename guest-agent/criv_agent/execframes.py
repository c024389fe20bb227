"""Frames of a STDIO data stream (exec and attach), both directions.

``type:uint8 length:uint32-BE payload`` (payload <= 1 MiB): 0 STDIN, 1 STDOUT, 2 STDERR,
3 CLOSE (payload: the stream that ended), 4 RESIZE (width, height: uint16-BE), 5 EXIT
(int32-BE code, 128+N for signal N). docs/agent-api.md has what each side sends when.

Stdlib only and free of agent state: the agent (execstream.py, attach.py) and criv's
streaming backend (``criv.streaming.agent_backend``) both speak it, and criv may import
criv_agent, never the other way (as with vsock_splice.py).
"""

from __future__ import annotations

import asyncio
import struct

STDIN, STDOUT, STDERR, CLOSE, RESIZE, EXIT = range(6)
MAX_FRAME = 1 << 20

_HEADER = struct.Struct(">BI")
_SIZE = struct.Struct(">HH")
_CODE = struct.Struct(">i")


class FrameTooLarge(ValueError):
    """The peer announced a payload over MAX_FRAME (nothing of it was read)."""

    def __init__(self, size: int) -> None:
        super().__init__(f"a {size}-byte frame")
        self.size = size


def frame(kind: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack(kind, len(payload)) + payload


def close_frame(stream: int) -> bytes:
    return frame(CLOSE, bytes([stream]))


def resize_frame(width: int, height: int) -> bytes:
    return frame(RESIZE, _SIZE.pack(width, height))


def exit_frame(code: int) -> bytes:
    return frame(EXIT, _CODE.pack(code))


def parse_resize(payload: bytes) -> tuple[int, int] | None:
    """(width, height) from a RESIZE payload; None if it is too short (extra bytes pass)."""
    if len(payload) < _SIZE.size:
        return None
    width, height = _SIZE.unpack_from(payload)
    return width, height


def parse_exit(payload: bytes) -> int | None:
    """The code of an EXIT payload; None unless it is exactly 4 bytes."""
    if len(payload) != _CODE.size:
        return None
    (code,) = _CODE.unpack(payload)
    return int(code)


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next (type, payload); IncompleteReadError at EOF, FrameTooLarge over MAX_FRAME."""
    kind, n = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if n > MAX_FRAME:
        raise FrameTooLarge(n)
    return kind, await reader.readexactly(n) if n else b""
