"""Container lifecycle events for CRI GetContainerEvents: a small fan-out bus.

Each subscriber gets its own bounded queue; a subscriber too slow to keep up loses
the oldest events rather than growing criv's memory (kubelet relists anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum

QUEUE_SIZE = 1000


class EventKind(StrEnum):
    CREATED = "created"
    STARTED = "started"
    STOPPED = "stopped"
    DELETED = "deleted"


@dataclass(frozen=True)
class ContainerEvent:
    kind: EventKind
    container_id: str
    sandbox_id: str
    timestamp_ns: int


class EventBus:
    def __init__(self) -> None:
        self._subs: set[asyncio.Queue[ContainerEvent | None]] = set()
        self._closed = False

    def publish(self, kind: EventKind, container_id: str, sandbox_id: str) -> None:
        ev = ContainerEvent(kind, container_id, sandbox_id, time.time_ns())
        for q in self._subs:
            if q.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
            q.put_nowait(ev)

    async def subscribe(self) -> AsyncIterator[ContainerEvent]:
        if self._closed:
            return
        q: asyncio.Queue[ContainerEvent | None] = asyncio.Queue(QUEUE_SIZE)
        self._subs.add(q)
        try:
            while True:
                ev = await q.get()
                if ev is None:
                    return
                yield ev
        finally:
            self._subs.discard(q)

    def close(self) -> None:
        self._closed = True
        for q in self._subs:
            if q.full():  # the end marker must get in
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
            q.put_nowait(None)
