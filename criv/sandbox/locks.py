"""Per-object locks of the sandbox layer, and the order they are taken in.

Lock order (a task holding one may only take those below it):

1. a pod's operation lock (run, stop, remove, create a container in it, start or
   remove one of its containers);
2. a container's operation lock (start, stop, remove);
3. a store's record lock (:class:`criv.sandbox.store.Store`, held only around one
   record's read-modify-write).

StopContainer takes only the container lock (its grace period may be long and must not
hold up the pod); RemoveContainer and StartContainer take the pod lock first, so they
never run beside StopPodSandbox/RemovePodSandbox of the same pod.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class KeyedLocks:
    """One asyncio.Lock per key, created on first use, dropped when released unused."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._users[key] -= 1
            if self._users[key] == 0:
                del self._users[key]
                if self._locks.get(key) is lock:
                    del self._locks[key]

    def __len__(self) -> int:  # locks alive now: tests check none outlive their users
        return len(self._locks)
