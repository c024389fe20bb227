"""Fixtures: a streaming server on an ephemeral port with the local (test) backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from streaming_support import EchoServer, Stack

from criv.config import StreamingConfig
from criv.streaming.local import LocalProcessBackend
from criv.streaming.server import StreamingServer
from criv.streaming.service import StreamingService


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    backend = LocalProcessBackend()
    server = StreamingServer(StreamingConfig(), backend)
    await server.start()
    try:
        yield Stack(backend, server, StreamingService(server))
    finally:
        await server.stop()
        await backend.close()


@pytest.fixture
async def stack_with() -> AsyncIterator[Callable[..., Awaitable[Stack]]]:
    """A factory: a stack whose server has these StreamingConfig values (limits tests)."""
    made: list[Stack] = []

    async def make(**config: Any) -> Stack:
        backend = LocalProcessBackend()
        server = StreamingServer(StreamingConfig(**config), backend)
        await server.start()
        made.append(Stack(backend, server, StreamingService(server)))
        return made[-1]

    try:
        yield make
    finally:
        for s in made:
            await s.server.stop()
            await s.backend.close()


@pytest.fixture
async def echo_server() -> AsyncIterator[EchoServer]:
    """A TCP echo server; closes its side after the client's EOF."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield EchoServer(server.sockets[0].getsockname()[1], server)
    finally:
        server.close()
        await server.wait_closed()
