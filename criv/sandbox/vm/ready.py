"""Is a booting guest's agent answering yet? A cheap check, polled often.

The agent's gRPC port is reachable through the vsock backend's unix socket from the
moment the backend starts, long before the guest listens: a connection then is accepted
and closed. Polling with a gRPC channel would put that channel in reconnect backoff
(up to a second between tries), which a boot pays for at its end. So criv polls with a
bare HTTP/2 client preface instead and dials gRPC once a server answers it: an HTTP/2
server's first frame is its SETTINGS, so any byte back means one is listening.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

# the client connection preface, then an empty SETTINGS frame (RFC 9113, 3.4)
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


async def http2_answers(path: Path, timeout: float) -> bool:
    """True if a server on the unix socket ``path`` sends a byte within ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(path))
            try:
                writer.write(PREFACE)
                await writer.drain()
                return bool(await reader.read(1))
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return False
