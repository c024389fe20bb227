"""The agent API for a vm-image pod, answered by criv itself (no process in the VM).

The sandbox layer talks to every pod through :class:`criv.agent.client.AgentClient`;
for a vm-image pod, :class:`VmImageAgent` is that client, implemented in-process: the
pod's one container is its VM.

- CreateContainer: the disk (found at the isolation's ``prepare_container`` step) gets a
  per-container qcow2 overlay, the pod a per-pod SSH key, the container a NoCloud seed
  (pod IP, gateway, routes and DNS from the CNI result and the pod config, hostname,
  the key; the user from the ``criv.dev/ssh-user`` annotation, default root).
- StartContainer: boots the domain (:mod:`.machine`), follows the console into the
  container's CRI log (:mod:`.console`), where the SSH host key is pinned at first boot.
- ExecSync / Exec: SSH (:mod:`criv.vmimage.ssh`) to the pod IP with the pod key,
  after waiting (bounded: ``vm.image_ssh_wait_seconds``) for the pin and the server
  (:mod:`.sshready`).
- StopContainer: ACPI power button, the timeout, then destroy. The container exits 0
  (``Completed``) when the guest powered off, 137 (``Killed``) when criv destroyed it,
  and as ``VMExited`` when the VM stopped any other way.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    AgentContainerState,
    AgentEvent,
    AgentEventKind,
    AgentHealth,
    AgentStats,
    CreateContainerArgs,
    ExecResult,
    GuestIdentity,
    GuestNetwork,
)
from criv.errors import CrivError, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from criv.network.tap import guest_addressing
from criv.sandbox.records import PodRecord
from criv.sandbox.vmimage import machine
from criv.sandbox.vmimage.console import ConsoleLog
from criv.sandbox.vmimage.container import VmContainer
from criv.sandbox.vmimage.execstream import PendingExec, run_exec
from criv.sandbox.vmimage.serial import SerialConsole, run_attach
from criv.sandbox.vmimage.sshready import DEFAULT_WAIT, SshAccess, ssh_ready
from criv.vmimage.seed import Route, SeedConfig, build_seed
from criv.vmimage.ssh import SSHClient
from criv.vmimage.sshkeys import ensure_pod_key
from criv.vmimage.sshstream import SSHStream
from criv_agent.datastream import FollowedLog

log = logging.getLogger("criv.sandbox.vmimage")

SSH_USER_ANNOTATION = "criv.dev/ssh-user"
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
        self._box: VmContainer | None = None
        self._disks: dict[str, machine.BaseDisk] = {}  # cid -> disk, from prepare_container
        self._execs: dict[str, tuple[str, PendingExec]] = {}
        self._subscribers: set[asyncio.Queue[AgentEvent | None]] = set()
        self._hostname = pod.name
        self._dns: tuple[str, ...] = ()
        self._searches: tuple[str, ...] = ()

    # -- the isolation's side ---------------------------------------------------------

    def reserve(self, cid: str, disk: machine.BaseDisk) -> None:
        """CreateContainer's image check passed: ``cid`` boots ``disk``. One container per
        pod: another one that has not exited is refused."""
        box = self._box
        if box is not None and box.state is not AgentContainerState.EXITED:
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
                "it, or criv restarted since it ran)"
            )
        if box.state is not AgentContainerState.EXITED:
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
            if box.state is not AgentContainerState.RUNNING:
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
        return await asyncio.open_connection(self._pod_ip(), port)

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
        hostname, self._dns, self._searches = convert.pod_identity(config)
        self._hostname = hostname or self._pod.name

    async def shutdown(self, timeout_seconds: int) -> None:
        box = self._box
        if box is not None and box.state is not AgentContainerState.EXITED:
            await self.stop_container(box.cid, timeout_seconds)

    async def create_container(self, args: CreateContainerArgs) -> AgentContainerInfo:
        cid = args.container_id
        base = self._disks.pop(cid, None)
        if base is None:
            raise FailedPrecondition(f"container {cid[:12]}: no disk prepared for it")
        user = convert.container_annotations(args.config).get(SSH_USER_ANNOTATION, "root")
        d = self._state_dir / "vmimage" / cid[:12]
        qdir = await asyncio.to_thread(machine.make_pod_dir, self._root, self._pod.id)
        box = VmContainer(
            cid=cid, base=base, dir=d, overlay=qdir / f"overlay-{cid[:12]}.qcow2",
            seed=qdir / f"seed-{cid[:12]}.iso", user=user, created_at_ns=time.time_ns(),
        )  # fmt: skip
        await asyncio.to_thread(d.mkdir, mode=0o700, parents=True, exist_ok=True)
        key = await asyncio.to_thread(
            ensure_pod_key, self._state_dir / "vmimage" / "ssh", f"criv-{self._pod.id[:12]}"
        )
        await machine.make_overlay(base, box.overlay)
        await asyncio.to_thread(build_seed, self._seed_config(cid, key.public_line, user), box.seed)
        await asyncio.to_thread(machine.seed_readable, box.seed)
        self._box = box
        self._publish(AgentEventKind.CREATED, box)
        return box.info()

    def _seed_config(self, cid: str, public_key: str, user: str) -> SeedConfig:
        addresses, routes = guest_addressing(self._pod.cni_result)
        gateway = next((gw for dst, gw in routes if gw and dst.endswith("/0")), "")
        return SeedConfig(
            instance_id=f"criv-{cid[:32]}",
            hostname=self._hostname,
            addresses=tuple(addresses),
            ssh_public_key=public_key,
            user=user,
            gateway=gateway,
            routes=tuple(Route(dst, gw) for dst, gw in routes if gw and not dst.endswith("/0")),
            dns_servers=self._dns,
            dns_searches=self._searches,
        )

    async def start_container(self, cid: str) -> AgentContainerInfo:
        box = self._get(cid)
        if box.state is not AgentContainerState.CREATED:
            raise FailedPrecondition(f"container {cid[:12]} is {box.state.value}")
        console = box.dir / "console.log"
        box.console = ConsoleLog(console, box.dir / "serial.log")
        box.console.start()
        try:
            await self._vms.boot(self._pod, box.overlay, box.seed, console)
        except BaseException:
            await box.console.finish()
            raise
        box.state, box.started_at_ns = AgentContainerState.RUNNING, time.time_ns()
        box.watch = asyncio.get_running_loop().create_task(self._watch(box))
        self._publish(AgentEventKind.STARTED, box)
        return box.info()

    async def _watch(self, box: VmContainer) -> None:
        why = await self._vms.wait_stopped(self._pod)
        if box.state is AgentContainerState.RUNNING and not box.stopping:
            tail = "" if box.console is None else await asyncio.to_thread(box.console.tail)
            if box.state is AgentContainerState.RUNNING and not box.stopping:
                self._exited(box, why, tail)

    def _exited(self, box: VmContainer, why: str, console_tail: str = "") -> None:
        booted = box.console is not None and box.console.pin is not None
        box.exited(why, console_tail, booted)
        box.after = asyncio.get_running_loop().create_task(self._after_exit(box))

    async def _after_exit(self, box: VmContainer) -> None:
        if box.console is not None:
            await box.console.finish()
        if box.serial is not None:
            box.serial.close()  # attach sessions end with the container's exit code
        if box.ssh is not None:
            with contextlib.suppress(CrivError):
                await box.ssh.close()
            box.ssh = None
        self._publish(AgentEventKind.EXITED, box)

    async def stop_container(self, cid: str, timeout_seconds: int) -> AgentContainerInfo:
        box = self._get(cid)
        if box.state is AgentContainerState.CREATED:
            box.state, box.reason, box.finished_at_ns = (
                AgentContainerState.EXITED, "Killed", time.time_ns())  # fmt: skip
            box.exit_code = 137
        if box.state is AgentContainerState.EXITED:
            return box.info()
        box.stopping = True
        how = await self._vms.shutdown(self._pod, max(timeout_seconds, 0))
        if box.state is AgentContainerState.RUNNING:
            self._exited(box, "shutdown" if how == "shutdown" else "destroyed")
        return box.info()

    async def remove_container(self, cid: str) -> None:
        box = self._get(cid)
        if box.state is not AgentContainerState.EXITED:
            raise FailedPrecondition(f"container {cid[:12]} is {box.state.value}")
        if box.watch is not None:
            box.watch.cancel()
        if box.console is not None:
            await box.console.finish()
        await asyncio.to_thread(box.remove_files)
        self._box = None
        self._publish(AgentEventKind.REMOVED, box)

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
        if box is None or box.cid not in cids or box.state is not AgentContainerState.RUNNING:
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
        q: asyncio.Queue[AgentEvent | None] = asyncio.Queue()
        self._subscribers.add(q)
        try:
            while (ev := await q.get()) is not None:
                yield ev
        finally:
            self._subscribers.discard(q)

    # -- helpers ------------------------------------------------------------------------

    def _publish(self, kind: AgentEventKind, box: VmContainer) -> None:
        ev = AgentEvent(kind, box.cid, time.time_ns(), box.info())
        for q in self._subscribers:
            q.put_nowait(ev)

    def end_events(self) -> None:
        for q in self._subscribers:
            q.put_nowait(None)

    def _get(self, cid: str) -> VmContainer:
        box = self._box
        if box is None or box.cid != cid:
            raise NotFound(f"container {cid[:12]} not found in vm-image pod {self._pod.id[:12]}")
        return box

    def _running(self, cid: str) -> VmContainer:
        box = self._get(cid)
        if box.state is not AgentContainerState.RUNNING:
            raise FailedPrecondition(f"container {cid[:12]} is {box.state.value}, not running")
        return box

    def _pod_ip(self) -> str:
        addresses, _ = guest_addressing(self._pod.cni_result)
        for a in sorted(addresses, key=lambda a: ":" in a):  # IPv4 first
            return a.split("/")[0]
        raise Unavailable(f"pod {self._pod.id[:12]} has no IP address to reach its VM at")

    async def _ssh_ready(self, box: VmContainer) -> SSHClient:
        return await ssh_ready(box, SshAccess(
            self._pod_ip(), self._state_dir / "vmimage" / "ssh", f"criv-{self._pod.id[:12]}",
            self._ssh_wait,
        ))  # fmt: skip
