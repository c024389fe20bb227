"""A vm pod's vsock backend process (criv.vsock, one per VM, in a session of its own so
it outlives criv like the domain): start, find again by pid + start time, stop."""

from __future__ import annotations

import asyncio
from pathlib import Path

from criv.errors import Internal
from criv.procscan import find_processes, kill_group, process_start_time, same_process
from criv.sandbox.isolation import PodPaths
from criv.sandbox.isostate import VmState
from criv.sandbox.vm.layout import CONTROL_PORT, DATA_PORT, hybrid_socket, vhost_socket
from criv.vsock.process import BackendError, VsockBackendProcess

BACKEND_READY_TIMEOUT = 10.0


def backend_pids(socket_prefix: str) -> list[int]:
    """Backend processes whose ``--socket`` starts with ``socket_prefix``."""
    want = socket_prefix.encode()

    def match(argv: list[bytes]) -> bool:
        if b"criv.vsock" not in argv or b"--socket" not in argv:
            return False
        i = argv.index(b"--socket") + 1
        return i < len(argv) and argv[i].startswith(want)

    return find_processes(match)


class VsockBackends:
    def __init__(self) -> None:
        self._procs: dict[str, VsockBackendProcess] = {}  # started by this criv

    async def start(self, pod_id: str, paths: PodPaths, cid: int) -> tuple[int, int]:
        """Start the pod's backend and wait until it listens; (pid, start time)."""
        backend = VsockBackendProcess(
            str(vhost_socket(paths)),
            str(hybrid_socket(paths)),
            cid,
            listen_ports=[CONTROL_PORT, DATA_PORT],
            status_file=str(paths.run / "vsock.json"),
            log_path=str(paths.state / "vsock.log"),
        )
        try:
            await asyncio.to_thread(backend.start)
            self._procs[pod_id] = backend
            await asyncio.to_thread(backend.wait_ready, BACKEND_READY_TIMEOUT)
        except (BackendError, OSError) as e:
            raise Internal(f"pod {pod_id[:12]}: vsock backend did not start: {e}") from e
        assert backend.pid is not None
        start = await asyncio.to_thread(process_start_time, backend.pid)
        return backend.pid, start or 0

    def pid(self, pod_id: str, state: VmState | None) -> int:
        """The live backend's pid (0: gone). Blocking (reads /proc)."""
        b = self._procs.get(pod_id)
        if b is not None:
            return (b.pid or 0) if b.alive() else 0
        if state is not None and same_process(state.backend_pid, state.backend_start_time):
            return state.backend_pid
        return 0

    async def stop(self, pod_id: str, paths: PodPaths) -> None:
        b = self._procs.pop(pod_id, None)
        if b is not None:
            await asyncio.to_thread(b.stop)
        # after a criv restart (or a crash mid-boot): find it by its socket path
        for pid in await asyncio.to_thread(backend_pids, str(vhost_socket(paths))):
            kill_group(pid)

    async def sweep(self, run_root: Path, keep: set[int]) -> list[int]:
        """Kill backends under ``run_root`` whose pid is not in ``keep``; their pids."""
        killed = []
        for pid in await asyncio.to_thread(backend_pids, f"{run_root}/"):
            if pid not in keep:
                kill_group(pid)
                killed.append(pid)
        return killed

    def forget_all(self) -> None:
        """criv stops: backends keep running; the next criv finds each by pid."""
        self._procs.clear()
