"""Container events (created, started, exited, oom, removed), fanned out to every
``Events`` stream open at the time; a stream sees only what happens after it opened."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from criv_agent.state import ContainerRecord


@dataclass
class Event:
    kind: str  # created, started, exited, oom, removed
    container_id: str
    timestamp_ns: int
    record: ContainerRecord


class EventHub:
    def __init__(self) -> None:
        self._subscribers: list[asyncio.Queue[Event]] = []

    def publish(self, kind: str, rec: ContainerRecord) -> None:
        ev = Event(kind, rec.id, time.time_ns(), rec)
        for q in self._subscribers:
            q.put_nowait(ev)

    async def subscribe(self) -> AsyncIterator[Event]:
        q: asyncio.Queue[Event] = asyncio.Queue()
        self._subscribers.append(q)
        try:
            while True:
                yield await q.get()
        finally:
            self._subscribers.remove(q)
