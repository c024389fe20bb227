"""The agent API for a vm-image pod, answered by criv itself (no process in the VM).

The sandbox layer talks to every pod through :class:`criv.agent.client.AgentClient`;
for a vm-image pod, :class:`VmImageAgent` is that client, implemented in-process: the
pod's one container is its VM.

- CreateContainer: the disk (found at the isolation's ``check_image`` step) gets a
  per-container qcow2 overlay, the pod a per-pod SSH key, the container a NoCloud seed
  (:mod:`.provision`).
- StartContainer: boots the domain (:mod:`.machine`), follows the console into the
  container's CRI log (:mod:`.console`), where the SSH host key is pinned at first boot.
- ExecSync / Exec: SSH (:mod:`criv.vmimage.ssh`) to the pod IP with the pod key,
  after waiting (bounded: ``vm.image_ssh_wait_seconds``) for the pin and the server
  (:mod:`.sshready`).
- StopContainer: ACPI power button, the timeout, then destroy. The container exits 0
  (``Completed``) when the guest powered off, 137 (``Killed``) when criv destroyed it,
  and as ``VMExited`` when the VM stopped any other way.

What it knows of its container is kept by a :class:`~.keeper.BoxKeeper`: in memory, in
the pod's agent record, so that a restarted criv takes the pod back (:meth:`VmImageAgent.
adopt`, :mod:`.adopt`); :meth:`VmImageAgent.suspend` lets go of it when criv stops.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

from criv.agent import convert
from criv.agent.client import AgentClient
from criv.agent.hostdata import AttachSession
from criv.agent.types import (
    AgentContainerInfo,
    AgentEvent,
    AgentEventKind,
    AgentHealth,
    AgentStats,
    CreateContainerArgs,
    ExecResult,
    GuestIdentity,
    GuestNetwork,
)
from criv.errors import FailedPrecondition, InvalidArgument, NotFound
from criv.sandbox.records import PodRecord
from criv.sandbox.vmimage import machine
from criv.sandbox.vmimage.adopt import Plan, restore
from criv.sandbox.vmimage.boxstate import BoxState
from criv.sandbox.vmimage.console import ConsoleLog
from criv.sandbox.vmimage.container import VmContainer
from criv.sandbox.vmimage.execstream import PendingExec, run_exec
from criv.sandbox.vmimage.keeper import BoxKeeper
from criv.sandbox.vmimage.provision import PodIdentity, key_comment, key_dir, pod_ip, provision
from criv.sandbox.vmimage.record import AgentRecord
from criv.sandbox.vmimage.serial import SerialConsole, run_attach
from criv.sandbox.vmimage.sshready import DEFAULT_WAIT, SshAccess, ssh_ready
from criv.vmimage.ssh import SSHClient
from criv.vmimage.sshstream import SSHStream
from criv_agent.datastream import FollowedLog

log = logging.getLogger("criv.sandbox.vmimage")

MAX_PENDING_EXECS = 64


class VmImageAgent(AgentClient):
    """One vm-image pod's agent, in criv's process (see the module docstring)."""

    def __init__(
        self,
        pod: PodRecord,
        state_dir: Path,
        root: Path,
        vms: machine.Machines,
        ssh_wait: float = DEFAULT_WAIT,
    ) -> None:
        # no gRPC channel: nothing of AgentClient's transport is used
        self.target = f"in-process:vm-image/{pod.id[:12]}"
        self._pod = pod
        self._state_dir = state_dir  # the pod's state dir (criv-private)
        self._root = root  # <state_dir>/vmimage: what QEMU may open
        self._vms = vms
        self._ssh_wait = ssh_wait
        self.keeper = BoxKeeper(pod, state_dir, vms)
        self._disks: dict[str, machine.BaseDisk] = {}  # cid -> disk, from prepare_container
        self._execs: dict[str, tuple[str, PendingExec]] = {}
        self.identity = PodIdentity(pod.name)

    @property
    def _box(self) -> VmContainer | None:
        return self.keeper.box

    # -- a criv restart ------------------------------------------------------------------

    async def adopt(self, rec: AgentRecord, owner: str) -> Plan:
        """A restarted criv's agent for a pod the last one served: its container as
        ``rec`` and libvirt say (:func:`.adopt.restore`; :class:`.adopt.Untrusted` where
        they disagree). SetupSandbox is not called again: the pod's DNS comes from its
        config."""
        self.identity = PodIdentity.of(self._pod, self._pod.config)
        return await restore(self.keeper, self._vms, rec, self._state_dir, self._root, owner)

    async def suspend(self) -> None:
        """criv stops; the VM (if any) runs on for the next criv."""
        await self.keeper.suspend()

    # -- the isolation's side ---------------------------------------------------------

    def reserve(self, cid: str, disk: machine.BaseDisk) -> None:
        """CreateContainer's image check passed: ``cid`` boots ``disk``. One container per
        pod: another one that has not exited is refused."""
        box = self._box
        if box is not None and box.state is not BoxState.EXITED:
            raise InvalidArgument(
                f"pod {self._pod.id[:12]} is a vm-image pod and already has container "
                f"{box.cid[:12]} (its VM); a vm-image pod runs one container"
            )
        self._disks = {cid: disk}

    def commit_source(self, cid: str) -> VmContainer:
        """The container whose disk `criv vm-image commit` flattens: it must have
        stopped (its VM, the overlay's writer, is gone)."""
        box = self._box
        if box is None or box.cid != cid:
            raise FailedPrecondition(
                f"container {cid[:12]}: its disk is gone (the pod's next container replaced "
                "it, or it was removed)"
            )
        if box.state is not BoxState.EXITED:
            raise FailedPrecondition(
                f"container {cid[:12]} is {box.state.value}: stop it first (crictl stop), "
                "a running VM's disk cannot be committed"
            )
        return box

    def log_source(self, cid: str) -> FollowedLog | None:
        box = self._box
        return box.console if box is not None and box.cid == cid else None

    def has_exec(self, exec_id: str) -> bool:
        return exec_id in self._execs

    async def run_exec(
        self, exec_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        cid, ex = self._execs.pop(exec_id)

        async def open_stream() -> SSHStream:
            ssh = await self._ssh_ready(self._running(cid))
            return await ssh.open_stream(ex.cmd or None, tty=ex.tty)

        await run_exec(open_stream, ex, reader, writer)

    async def attach(self, cid: str) -> AttachSession:
        """An attach session on the VM's serial console (:mod:`.serial`); the pty is opened
        when the session runs (a refused or abandoned stream leaves nothing open)."""
        box = self._running(cid)
        path = box.serial.path if box.serial is not None else ""
        if not path:
            path = await self._vms.console_pty(self._pod)

        async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if not box.running:
                serial = None  # it stopped meanwhile: the session ends at once
            elif box.serial is None or box.serial.closed:
                serial = SerialConsole(path)
                try:
                    serial.open()  # a pty: no wait
                except OSError as e:
                    log.warning("container %s: its console %s: %s", cid[:12], path, e)
                    serial = None
                else:
                    box.serial = serial
            else:
                serial = box.serial
            await run_attach(serial, reader, writer, lambda: box.exit_code)

        return session

    async def dial(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(pod_ip(self._pod), port)

    # -- AgentClient -----------------------------------------------------------------

    async def close(self) -> None:
        pass  # the pod's resources go with destroy()

    async def health(self, timeout: float = 0) -> AgentHealth:
        return AgentHealth("criv-vm-image", 1, "", "")

    async def setup_sandbox(
        self,
        sandbox_id: str,
        config: bytes,
        sandbox_dir: str,
        pod_ips: list[str],
        network: GuestNetwork | None = None,
        *,
        identity: GuestIdentity | None = None,
    ) -> None:
        self.identity = PodIdentity.of(self._pod, config)

    async def shutdown(self, timeout_seconds: int) -> None:
        box = self._box
        if box is not None and box.state is not BoxState.EXITED:
            await self.stop_container(box.cid, timeout_seconds)

    async def create_container(self, args: CreateContainerArgs) -> AgentContainerInfo:
        cid = args.container_id
        base = self._disks.pop(cid, None)
        if base is None:
            raise FailedPrecondition(f"container {cid[:12]}: no disk prepared for it")
        annotations = convert.container_annotations(args.config)
        firmware = await self._vms.firmware(base, annotations)
        box = await provision(
            self._pod,
            self.identity,
            self._state_dir,
            self._root,
            cid,
            base,
            annotations,
            firmware,
        )
        self.keeper.box = box
        await self.keeper.save()
        self.keeper.publish(AgentEventKind.CREATED, box)
        return box.info()

    async def start_container(self, cid: str) -> AgentContainerInfo:
        box = self._get(cid)
        if box.state is not BoxState.CREATED:
            raise FailedPrecondition(f"container {cid[:12]} is {box.state.value}")
        console = box.dir / "console.log"
        box.console = ConsoleLog(console, box.dir / "serial.log", self.keeper.save_quietly)
        box.console.start()
        try:
            uefi_vars = box.uefi_vars if box.firmware == "uefi" else None
            booted = await self._vms.boot(self._pod, box.overlay, box.seed, console, uefi_vars)
        except BaseException:
            await box.console.finish()
            raise
        box.started_at_ns, box.domain_uuid = time.time_ns(), booted.uuid
        box.move(BoxState.RUNNING)
        # a failed write leaves it CREATED on disk: a restarted criv destroys that VM
        await self.keeper.save_quietly()
        self.keeper.watch(box)
        self.keeper.publish(AgentEventKind.STARTED, box)
        return box.info()

    async def stop_container(self, cid: str, timeout_seconds: int) -> AgentContainerInfo:
        box = self._get(cid)
        if box.state is BoxState.CREATED:
            box.killed_unstarted()
            await self.keeper.save()
        if box.state is BoxState.EXITED:
            return box.info()
        if box.state is BoxState.RUNNING:
            box.move(BoxState.STOPPING)
            await self.keeper.save_quietly()
        how = await self._vms.shutdown(self._pod, max(timeout_seconds, 0))
        if box.state is BoxState.STOPPING:
            self.keeper.exited(box, "shutdown" if how == "shutdown" else "destroyed")
        return box.info()

    async def remove_container(self, cid: str) -> None:
        box = self._get(cid)
        if box.state is not BoxState.EXITED:
            raise FailedPrecondition(f"container {cid[:12]} is {box.state.value}")
        if box.watch is not None:
            box.watch.cancel()
        if box.console is not None:
            await box.console.finish()
        await asyncio.to_thread(box.remove_files)
        self.keeper.box = None
        await self.keeper.save()
        self.keeper.publish(AgentEventKind.REMOVED, box)

    async def container_status(self, cid: str) -> AgentContainerInfo:
        return self._get(cid).info()

    async def list_containers(self) -> list[AgentContainerInfo]:
        return [] if self._box is None else [self._box.info()]

    async def update_resources(self, cid: str, linux: bytes) -> None:
        self._get(cid)  # a VM's size is set at boot; nothing to change live

    async def exec_sync(self, cid: str, cmd: list[str], timeout_seconds: int) -> ExecResult:
        box = self._running(cid)
        ssh = await self._ssh_ready(box)
        r = await ssh.exec_sync(cmd, timeout=timeout_seconds or None)
        return ExecResult(r.stdout, r.stderr, r.exit_code or 0, r.timed_out, r.truncated)

    async def start_exec(self, cid: str, cmd: list[str], tty: bool, stdin: bool) -> str:
        self._running(cid)
        if len(self._execs) >= MAX_PENDING_EXECS:
            self._execs.pop(next(iter(self._execs)))
        exec_id = secrets.token_hex(16)
        self._execs[exec_id] = (cid, PendingExec(list(cmd), tty, stdin))
        return exec_id

    async def stats(self, cids: list[str]) -> list[AgentStats]:
        box = self._box
        if box is None or box.cid not in cids or not box.running:
            return []
        st = await self._vms.stats(self._pod)
        if st is None:
            return []
        # the container's writable layer is its overlay: what the guest wrote to its disk
        disk = await asyncio.to_thread(machine.allocated_bytes, box.overlay)
        return [
            AgentStats(
                box.cid, time.time_ns(), cpu_usage_core_nanoseconds=st.cpu_ns,
                memory_working_set_bytes=st.memory_bytes, memory_usage_bytes=st.memory_bytes,
                memory_rss_bytes=st.memory_bytes, writable_layer_bytes=disk,
            )
        ]  # fmt: skip

    async def events(self) -> AsyncIterator[AgentEvent]:
        q = self.keeper.subscribe()
        try:
            while (ev := await q.get()) is not None:
                yield ev
        finally:
            self.keeper.unsubscribe(q)

    # -- helpers ------------------------------------------------------------------------

    def end_events(self) -> None:
        self.keeper.end_events()

    def _get(self, cid: str) -> VmContainer:
        box = self._box
        if box is None or box.cid != cid:
            raise NotFound(f"container {cid[:12]} not found in vm-image pod {self._pod.id[:12]}")
        return box

    def _running(self, cid: str) -> VmContainer:
        box = self._get(cid)
        if not box.running:
            raise FailedPrecondition(f"container {cid[:12]} is {box.state.value}, not running")
        return box

    async def _ssh_ready(self, box: VmContainer) -> SSHClient:
        return await ssh_ready(box, SshAccess(
            pod_ip(self._pod), key_dir(self._state_dir), key_comment(self._pod), self._ssh_wait,
        ))  # fmt: skip
