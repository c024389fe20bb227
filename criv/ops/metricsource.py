"""The sandbox snapshot behind criv's scrape-time metrics (pods running per mode, each vm
pod's vsock backend counters), taken from the daemon's records.

The scrape runs on prometheus_client's server thread; the records belong to the event
loop. So the records are copied on the loop (a bounded wait) and the backends' status
files are read on the scrape thread, never on the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from criv.metrics import PodSample, Snapshot
from criv.ops.procinfo import vsock_status
from criv.sandbox.isostate import VmState
from criv.sandbox.manager import SandboxManager
from criv.sandbox.records import PodRecord
from criv.sandbox.states import PodState

SNAPSHOT_TIMEOUT = 5.0


def sandbox_snapshot(
    sandboxes: SandboxManager, loop: asyncio.AbstractEventLoop
) -> Callable[[], Snapshot]:
    """A callable for the scrape thread that returns the current :class:`Snapshot`."""
    modes = sorted(sandboxes.ctx.isolations)

    async def records() -> list[PodRecord]:
        return list(sandboxes.ctx.pods.all())

    def snapshot() -> Snapshot:
        pods = asyncio.run_coroutine_threadsafe(records(), loop).result(SNAPSHOT_TIMEOUT)
        samples = []
        for p in pods:
            ready = p.state is PodState.READY
            st = p.isolation_state
            vsock = {}
            if ready and isinstance(st, VmState) and st.backend_pid:
                vsock = vsock_status(st.backend_pid, st.backend_start_time)
            samples.append(PodSample(p.id[:12], p.name, p.namespace, p.isolation, ready, vsock))
        return Snapshot(modes, samples)

    return snapshot
