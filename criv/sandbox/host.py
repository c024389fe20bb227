"""``host`` isolation: one criv-agent per pod, a host process in the pod's netns.

The agent is started in a session of its own (``start_new_session``) with its output
in the pod's ``agent.log``, so it outlives criv: a restarted criv finds it again by
pid plus process start time (pids get reused) and reconnects to its socket. For
non-hostNetwork pods it runs under ``nsenter --net=<pod netns>``; the containers join
the agent's network namespace, so the pod's containers share localhost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from criv.agent.client import AgentClient
from criv.agent.types import GuestIdentity, GuestNetwork
from criv.commands import run_command, spawn_detached
from criv.config import Config
from criv.errors import AgentError, CrivError, Internal
from criv.procscan import (
    find_processes,
    kill,
    kill_group,
    process_start_time,
    processes_in_netns,
    same_process,
)
from criv.sandbox import propagation
from criv.sandbox.isolation import PodPaths
from criv.sandbox.isostate import HostState, IsolationState
from criv.sandbox.records import MountRecord, PodRecord
from criv.sandbox.states import PodState

log = logging.getLogger("criv.sandbox.host")

AGENT_READY_TIMEOUT = 20.0
AGENT_EXIT_TIMEOUT = 10.0
MAX_SOCKET_PATH = 107


def agent_binary() -> str:
    found = shutil.which("criv-agent")
    if found:
        return found
    return str(Path(sys.executable).parent / "criv-agent")


def _state(pod: PodRecord) -> HostState:
    st = pod.isolation_state
    return st if isinstance(st, HostState) else HostState()


class HostIsolation:
    mode = "host"
    # containers are crun processes on the host: an agent that died may have left them
    containers_die_with_agent = False

    def __init__(self, config: Config) -> None:
        self._config = config
        self._run_root = Path(config.run_dir) / "p"
        # Agents this criv started: kept so their exit status is reaped (no zombies).
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def argv(self, pod: PodRecord, paths: PodPaths) -> list[str]:
        argv = [
            agent_binary(),
            "--control",
            f"unix:{paths.control_socket}",
            "--data",
            f"unix:{paths.data_socket}",
            "--state-dir",
            str(paths.agent_state),
            "--crun",
            self._config.runtime.crun,
        ]
        if not pod.host_network:
            argv = ["nsenter", f"--net={pod.netns}", "--", *argv]
        return argv

    async def prepare(self, pod: PodRecord, paths: PodPaths) -> None:
        return None  # nothing to do before the pod's network exists

    async def boot(self, pod: PodRecord, paths: PodPaths) -> IsolationState:
        for p in (paths.control_socket, paths.data_socket):
            if len(str(p)) > MAX_SOCKET_PATH:
                raise Internal(f"agent socket path {p} is too long; use a shorter run_dir")
        argv = self.argv(pod, paths)

        def spawn() -> subprocess.Popen[bytes]:
            for d in (paths.run, paths.agent_state, paths.shared):
                d.mkdir(parents=True, exist_ok=True, mode=0o700)
            for s in (paths.control_socket, paths.data_socket):
                with contextlib.suppress(FileNotFoundError):
                    s.unlink()
            return spawn_detached(argv, paths.agent_log)

        proc = await asyncio.to_thread(spawn)
        self._procs[pod.id] = proc
        start = await asyncio.to_thread(process_start_time, proc.pid)
        return HostState(pid=proc.pid, start_time=start or 0)

    async def alive(self, pod: PodRecord) -> bool:
        return await asyncio.to_thread(self._alive, pod)

    def _alive(self, pod: PodRecord) -> bool:
        proc = self._procs.get(pod.id)
        if proc is not None:
            # ours, not yet reaped: its pid cannot be reused, and the record may not
            # have it yet (a failure right after boot)
            return proc.poll() is None
        st = _state(pod)
        return same_process(st.pid, st.start_time)

    async def connect(self, pod: PodRecord, paths: PodPaths, timeout: float) -> AgentClient:
        client = AgentClient(f"unix:{paths.control_socket}")
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not await self.alive(pod):
                await client.close()
                raise AgentError(f"agent of pod {pod.id[:12]} exited; see {paths.agent_log}")
            if paths.control_socket.exists():
                try:
                    await client.health(timeout=max(0.5, min(5.0, deadline - time.monotonic())))
                    return client
                except CrivError as e:
                    last = e
            await asyncio.sleep(0.02)
        await client.close()
        raise AgentError(f"agent of pod {pod.id[:12]} not ready in {timeout:.0f}s: {last}")

    async def stop(
        self, pod: PodRecord, paths: PodPaths, client: AgentClient | None, timeout: int
    ) -> None:
        if client is not None and await self.alive(pod):
            try:
                await client.shutdown(timeout)
            except CrivError as e:
                log.warning("pod %s: agent shutdown failed: %s", pod.id[:12], e)
        deadline = time.monotonic() + AGENT_EXIT_TIMEOUT
        while await self.alive(pod) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.destroy(pod, paths)

    async def forget(self, pod: PodRecord, paths: PodPaths) -> None:
        pass  # everything of a host pod is in its own directories

    async def destroy(self, pod: PodRecord, paths: PodPaths) -> None:
        proc = self._procs.get(pod.id)
        pid = proc.pid if proc is not None else _state(pod).pid
        if await self.alive(pod):
            log.warning("pod %s: killing agent pid %d", pod.id[:12], pid)
            kill_group(pid)  # the agent leads its own session; its group holds its helpers
        proc = self._procs.pop(pod.id, None)
        if proc is not None:
            await asyncio.to_thread(proc.wait)
        else:
            deadline = time.monotonic() + AGENT_EXIT_TIMEOUT
            while await self.alive(pod) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        await self._reap_containers(pod, paths)
        for s in (paths.control_socket, paths.data_socket):
            with contextlib.suppress(FileNotFoundError):
                s.unlink()
        with contextlib.suppress(OSError):
            paths.run.rmdir()

    async def _reap_containers(self, pod: PodRecord, paths: PodPaths) -> None:
        """What a dead agent left: its containers (crun state under the agent's state
        dir), its namespace holder, any process still in the pod's netns, and the pod's
        cgroup parent. A clean ShutdownSandbox leaves nothing here."""
        root = paths.agent_state / "crun"
        if root.is_dir():
            crun = self._config.runtime.crun
            rc, out = await run_command(crun, "--root", str(root), "list", "-q", merge_stderr=False)
            for cid in out.split() if rc == 0 else []:
                log.warning("pod %s: removing leftover container %s", pod.id[:12], cid[:12])
                await run_command(crun, "--root", str(root), "kill", "--all", cid, "KILL")
                await run_command(crun, "--root", str(root), "delete", "--force", cid)
        await asyncio.to_thread(_kill_pod_leftovers, pod, paths)
        await asyncio.to_thread(_remove_pod_cgroups, pod.id)

    def agent_path(self, paths: PodPaths, host_path: Path) -> str:
        return str(host_path)  # same machine, same mount namespace

    def data_endpoint(self, paths: PodPaths) -> str:
        return str(paths.data_socket)

    async def share(self, paths: PodPaths, cid: str, mount: MountRecord, name: str) -> str:
        # the agent sees the host's files (and binds them with their flags itself)
        await asyncio.to_thread(propagation.check_source, mount.host_path, mount.propagation)
        return mount.host_path

    def pod_files_dir(self, paths: PodPaths) -> str:
        return str(paths.shared)

    async def check_image(
        self, pod: PodRecord, paths: PodPaths, cid: str, image_id: str, layer_dirs: list[Path]
    ) -> None:
        pass  # any image runs

    async def unshare(self, paths: PodPaths, cid: str) -> None:
        pass  # nothing was shared

    def guest_network(self, pod: PodRecord) -> GuestNetwork | None:
        return None  # the agent runs in the pod netns CNI configured

    def guest_identity(self, pod: PodRecord) -> GuestIdentity | None:
        return None  # the agent runs on the host: its clock, RNG and machine-id are the host's

    async def sweep(self, pods: list[PodRecord]) -> None:
        """criv-agent processes serving sockets in this criv's run dir that no READY
        pod owns (found by command line)."""
        owned = {_state(p).pid for p in pods if p.state is PodState.READY}
        marker = f"unix:{self._run_root}/".encode()

        def orphan(argv: list[bytes]) -> bool:
            return any(b"criv-agent" in a for a in argv) and any(marker in a for a in argv)

        for pid in await asyncio.to_thread(find_processes, orphan):
            if pid not in owned:
                log.warning("killing orphan agent pid %d", pid)
                kill_group(pid)

    async def close(self) -> None:
        pass


def _remove_pod_cgroups(pod_id: str) -> None:
    """rmdir the agent's default cgroup parent (``/criv/<pod id>``) in every hierarchy,
    deepest first; non-empty or busy cgroups stay (and are logged)."""
    root = Path("/sys/fs/cgroup")
    candidates = [root / "criv" / pod_id]
    with contextlib.suppress(OSError):
        candidates += [d / "criv" / pod_id for d in root.iterdir() if d.is_dir()]
    for base in candidates:
        if not base.is_dir():
            continue
        dirs = sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for d in [*dirs, base]:
            try:
                d.rmdir()
            except OSError as e:
                log.warning("cannot remove cgroup %s: %s", d, e)


def _kill_pod_leftovers(pod: PodRecord, paths: PodPaths) -> None:
    """SIGKILL the agent's namespace holder (found in the agent's sandbox.json, checked
    by its command line) and every process left in the pod's network namespace.

    Only called once the agent is dead; criv itself is never in a pod netns."""
    with contextlib.suppress(OSError, ValueError):
        doc = json.loads((paths.agent_state / "sandbox.json").read_text())
        holder = int(doc.get("holder_pid", 0))
        if holder > 0:
            cmd = Path(f"/proc/{holder}/cmdline").read_bytes()
            if b"holder.py" in cmd:
                if os.getpgid(holder) == holder:  # a group of its own: take it whole
                    kill_group(holder)
                kill(holder)
    if pod.host_network or not pod.netns:
        return
    for pid in processes_in_netns(pod.netns):
        log.warning("pod %s: killing leftover pid %d", pod.id[:12], pid)
        kill(pid)
