"""The one pod an agent serves: set up on SetupSandbox (or on the first CreateContainer
if SetupSandbox never came), reloaded after an agent restart, released at shutdown."""

from __future__ import annotations

import asyncio
import os

from criv_agent.api.runtime.v1 import api_pb2
from criv_agent.errors import FailedPrecondition
from criv_agent.sandbox import Sandbox
from criv_agent.spare import SpareHolder, check_hostname

POD = api_pb2.NamespaceMode.POD


def userns_pod(config: api_pb2.PodSandboxConfig) -> bool:
    """The pod asks for a user namespace (``hostUsers: false``: mode POD)."""
    opts = config.linux.security_context.namespace_options
    return opts.HasField("userns_options") and opts.userns_options.mode == POD


def searchable(state_dir: str) -> None:
    """Let others search (not list) the agent's state dir (made 0700): the pod files
    kept under it (a vm guest's, guest-local) are bound into a container by crun as the
    mapped root of its user namespace, which gets no DAC override there."""
    mode = os.stat(state_dir).st_mode & 0o7777
    if mode & 0o011 != 0o011:
        os.chmod(state_dir, mode | 0o011)


class PodSandbox:
    def __init__(self, state_dir: str) -> None:
        self._state_dir = state_dir
        self.current: Sandbox | None = None
        self._lock = asyncio.Lock()
        # a holder started with the agent, for the pod's (spare.py); main.py sets it
        self.spare: SpareHolder | None = None

    def load(self) -> None:
        self.current = Sandbox.load(self._state_dir)

    async def setup(
        self,
        sandbox_id: str,
        config: api_pb2.PodSandboxConfig,
        sandbox_dir: str,
        pod_ips: list[str],
    ) -> Sandbox:
        async with self._lock:
            return await self._setup_locked(sandbox_id, config, sandbox_dir, pod_ips)

    async def _setup_locked(
        self,
        sandbox_id: str,
        config: api_pb2.PodSandboxConfig,
        sandbox_dir: str,
        pod_ips: list[str],
    ) -> Sandbox:
        sb = self.current
        if sb is not None and sb.sandbox_id != sandbox_id:
            raise FailedPrecondition(f"this agent serves sandbox {sb.sandbox_id}")
        check_hostname(config.hostname)  # before it is written into the pod's files
        if sb is None:
            sb = Sandbox(sandbox_id, sandbox_dir or os.path.join(self._state_dir, "sandbox"),
                         config)  # fmt: skip
        else:
            sb.config = config
        if not sandbox_dir and userns_pod(config):
            await asyncio.to_thread(searchable, self._state_dir)
        await asyncio.to_thread(sb.write_files, pod_ips)
        await asyncio.to_thread(sb.mount_shm)
        self.current = sb
        try:
            await sb.start_holder(self.spare)
        finally:
            await sb.save(self._state_dir)
        if not sb.needs_holder():
            await self.close_spare()  # nothing will want it: its memory back
        return sb

    async def ensure(self, sandbox_id: str, config: api_pb2.PodSandboxConfig) -> Sandbox:
        """The sandbox for CreateContainer: set up now if SetupSandbox never came."""
        async with self._lock:
            sb = self.current
            if sb is None:
                return await self._setup_locked(sandbox_id, config, "", [])
            if sb.sandbox_id != sandbox_id:
                raise FailedPrecondition(f"this agent serves sandbox {sb.sandbox_id}")
            if sb.needs_holder() and not sb.holder_alive():
                await sb.start_holder(self.spare)  # it died (or the node rebooted): a new one
                await sb.save(self._state_dir)
            return sb

    async def close_spare(self) -> None:
        if self.spare is not None:
            await self.spare.close()

    async def release(self) -> None:
        await self.close_spare()
        if self.current is not None:
            await asyncio.to_thread(self.current.release)
            await self.current.save(self._state_dir)
