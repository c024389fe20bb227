"""Shared helpers of the streaming integration tests (a unique module name on purpose:
these directories have no __init__.py, so plain names would collide across the tree)."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

from criv.streaming.local import LocalProcessBackend
from criv.streaming.server import StreamingServer
from criv.streaming.service import StreamingService


@dataclass
class Stack:
    backend: LocalProcessBackend
    server: StreamingServer
    service: StreamingService


@dataclass
class EchoServer:
    port: int
    server: asyncio.Server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
