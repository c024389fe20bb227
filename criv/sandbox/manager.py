"""SandboxManager: the sandbox layer's one entry point for the CRI servicers.

Construct with ``SandboxManager(config, images, runtime_state)``; ``await start()``
runs recovery (re-adopting agents that outlived the previous criv); ``await close()``
stops criv's watchers, log followers and agent connections but leaves pods running,
so the next criv picks them up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from criv.config import Config
from criv.sandbox.core import ImageSource
from criv.sandbox.recovery import RecoveryOps
from criv.state.runtime_state import RuntimeState

log = logging.getLogger("criv.sandbox")


class SandboxManager(RecoveryOps):
    def __init__(self, config: Config, images: ImageSource, runtime_state: RuntimeState) -> None:
        super().__init__(config, images, runtime_state)
        self._init_pods()

    async def start(self) -> None:
        await self.recover()
        self.runtime_state.publish(
            "isolation_modes", sorted(set(self.config.runtime.handlers.values()))
        )

    def end_event_streams(self) -> None:
        """End GetContainerEvents streams, so a stopping server need not wait them out."""
        self.bus.close()

    async def close(self) -> None:
        self.bus.close()
        for pod_id, rt in list(self.rt.items()):
            if rt.watcher is not None:
                rt.watcher.cancel()
            for cid in list(rt.followers):
                await self.stop_follower(pod_id, cid)
            if rt.client is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(rt.client.close(), 5.0)
                rt.client = None
        await self.cancel_tasks()
        for iso in self.isolations.values():
            with contextlib.suppress(Exception):
                await iso.close()
