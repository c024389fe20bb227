"""Pod taps moved into their netns beside the agent's first answer.

Once QEMU holds a pod's tap (the domain started, or a clone's NIC was hot-plugged),
the tap goes into the pod netns and is mirrored with eth0 (:func:`attach_tap`). Nothing
of the guest waits for that, so it runs while criv waits for the agent: the boot starts
it, criv awaits it once the agent's server first answers, before it calls the agent (a
pod is READY only with its network attached), and a pod torn down before then cancels
it. One move per pod at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from criv.network.tap import attach_tap
from criv.sandbox.vm.coldpath import StepClock

log = logging.getLogger("criv.sandbox.vm")


Mover = Callable[[Path, str], Awaitable[None]]


class TapMoves:
    def __init__(self, move: Mover = attach_tap) -> None:
        self._move_tap = move
        self._moving: dict[str, asyncio.Task[None]] = {}  # pod id -> its move

    def start(self, pod_id: str, netns: Path, tap: str) -> None:
        """Move ``tap`` into ``netns`` in the background."""
        self._moving[pod_id] = asyncio.create_task(self._move(pod_id, netns, tap))

    async def wait(self, pod_id: str) -> None:
        """The pod's move has finished (it raises what the move raised); no-op without one."""
        task = self._moving.pop(pod_id, None)
        if task is not None:
            await task

    async def cancel(self, pod_id: str) -> None:
        """Stop the pod's move, if one runs, and wait until it has stopped."""
        task = self._moving.pop(pod_id, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _move(self, pod_id: str, netns: Path, tap: str) -> None:
        clock = StepClock()
        await clock.timed("[attach tap]", self._move_tap(netns, tap))
        # a "cold path" line of its own (bench/podstart.py reads them): it ends after the
        # boot's line, beside the agent's wait
        log.info("pod %s cold path: %s", pod_id[:12], clock.line())
