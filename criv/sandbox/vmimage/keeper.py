"""A vm-image pod's one container as its in-process agent keeps it: in memory, in the
pod's agent record (:mod:`.record`), watched while its VM runs, and told to whoever
follows the agent's events.

Every state change (:meth:`VmContainer.move <.container.VmContainer.move>`) is followed
by :meth:`BoxKeeper.save`, which writes the whole record from memory under one lock (so
the last write holds the last state); the console's follower saves its mark through the
same path. When criv stops, :meth:`BoxKeeper.suspend` lets go of the VM without ending
the container: the watch is cancelled, the console's mark recorded, SSH closed; the VM
runs on for the next criv to take back (:mod:`.adopt`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from pathlib import Path

from criv.agent.types import AgentEvent, AgentEventKind
from criv.errors import CrivError
from criv.sandbox.records import PodRecord
from criv.sandbox.vmimage import machine, record
from criv.sandbox.vmimage.boxstate import BoxState
from criv.sandbox.vmimage.container import VmContainer

log = logging.getLogger("criv.sandbox.vmimage")

SUSPEND_WAIT = 5.0


class BoxKeeper:
    def __init__(self, pod: PodRecord, state_dir: Path, vms: machine.Machines) -> None:
        self.pod = pod
        self.record_path = record.record_path(state_dir)
        self._vms = vms
        self.box: VmContainer | None = None
        self._save_lock = asyncio.Lock()
        self._write_lock = threading.Lock()
        self._seq = self._written = 0
        self._dropped = False
        self._subscribers: set[asyncio.Queue[AgentEvent | None]] = set()

    # -- the record ----------------------------------------------------------------------

    def snapshot(self) -> record.AgentRecord:
        b = self.box
        if b is None:
            return record.AgentRecord(self.pod.id)
        console = b.console
        return record.AgentRecord(
            self.pod.id,
            record.BoxRecord(
                cid=b.cid, state=b.state, base=b.base.path.name, disk_name=b.base.name,
                user=b.user, firmware=b.firmware, created_at_ns=b.created_at_ns,
                started_at_ns=b.started_at_ns,
                finished_at_ns=b.finished_at_ns, exit_code=b.exit_code, reason=b.reason,
                message=b.message, domain_uuid=b.domain_uuid,
                pin=console.pin if console is not None else None,
                mark=console.mark if console is not None else record.ConsoleMark(),
            ),
        )  # fmt: skip

    async def save(self) -> None:
        """Write the record as memory holds it now (atomically, in a thread). A write
        whose caller was cancelled still runs in its thread: each snapshot has a number,
        and one older than the last written is not written, so the newest always wins."""
        async with self._save_lock:
            self._seq += 1
            await asyncio.to_thread(self._write, self._seq, self.snapshot())

    def _write(self, seq: int, rec: record.AgentRecord) -> None:
        with self._write_lock:
            if seq > self._written and not self._dropped:
                record.write(self.record_path, rec)
                self._written = seq

    async def drop(self) -> None:
        """The pod's VM is destroyed: the record goes, and nothing writes it again."""

        def remove() -> None:
            with self._write_lock:
                self._dropped = True
                record.remove(self.record_path)

        await asyncio.to_thread(remove)

    # -- events --------------------------------------------------------------------------

    def publish(self, kind: AgentEventKind, box: VmContainer) -> None:
        ev = AgentEvent(kind, box.cid, time.time_ns(), box.info())
        for q in self._subscribers:
            q.put_nowait(ev)

    def subscribe(self) -> asyncio.Queue[AgentEvent | None]:
        q: asyncio.Queue[AgentEvent | None] = asyncio.Queue()
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[AgentEvent | None]) -> None:
        self._subscribers.discard(q)

    def end_events(self) -> None:
        for q in self._subscribers:
            q.put_nowait(None)

    # -- the running VM ------------------------------------------------------------------

    def watch(self, box: VmContainer) -> None:
        """Follow the VM until it stops (a fresh start, or one taken back after a restart)."""
        box.watch = asyncio.get_running_loop().create_task(self._watch(box))

    async def _watch(self, box: VmContainer) -> None:
        why = await self._vms.wait_stopped(self.pod)
        if box.state is BoxState.RUNNING:
            tail = "" if box.console is None else await asyncio.to_thread(box.console.tail)
            if box.state is BoxState.RUNNING:
                self.exited(box, why, tail)

    def exited(self, box: VmContainer, why: str, console_tail: str = "") -> None:
        booted = box.console is not None and box.console.pin is not None
        box.exited(why, console_tail, booted)
        box.after = asyncio.get_running_loop().create_task(self._after_exit(box))

    async def _after_exit(self, box: VmContainer) -> None:
        if box.console is not None:
            await box.console.finish()
        if box.serial is not None:
            box.serial.close()  # attach sessions end with the container's exit code
        await self.close_ssh(box)
        await self.save_quietly()
        self.publish(AgentEventKind.EXITED, box)

    async def save_quietly(self) -> None:
        """:meth:`save` where a failure must not stop what goes on (logged)."""
        try:
            await self.save()
        except (CrivError, OSError) as e:
            log.error("pod %s: writing its vm-image record failed: %s", self.pod.id[:12], e)

    @staticmethod
    async def close_ssh(box: VmContainer) -> None:
        if box.ssh is not None:
            with contextlib.suppress(CrivError):
                await box.ssh.close()
            box.ssh = None

    async def suspend(self) -> None:
        """criv stops: let go of the VM, which runs on (see the module docstring)."""
        box = self.box
        if box is None:
            return
        if box.watch is not None and not box.watch.done():
            box.watch.cancel()
            with contextlib.suppress(BaseException):
                await box.watch
        box.watch = None
        if box.after is not None:  # an exit being recorded: let it finish
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(box.after), SUSPEND_WAIT)
        if box.console is not None and box.running:
            await box.console.suspend()
        await self.close_ssh(box)
        await self.save_quietly()
