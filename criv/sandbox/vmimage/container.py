"""A vm-image pod's one container: its VM, as :class:`~.agent.VmImageAgent` keeps it, and
how it ended: 0 (``Completed``) when the guest powered off, 137 (``Killed``) when criv
stopped it by destroying it, 255 ``BootFailed`` when the VM reset before its SSH host
key appeared (the firmware found nothing to boot on the disk and says so on the console,
or the boot loader or kernel reset it: the reset ends the domain), 0 ``Rebooted`` when
the guest rebooted after that, ``VMExited`` when the VM stopped any other way. A VM that
stopped before its SSH host key appeared on the console carries the console's tail in its
message. A VM that stopped while criv was not running exits 255 ``VMGone``: how it ended
is not known.

Its states (:mod:`.boxstate`) change through :meth:`VmContainer.move` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from criv.agent.types import AgentContainerInfo
from criv.sandbox.vmimage import machine
from criv.sandbox.vmimage.boxstate import AGENT_STATES, VM_STATES, BoxState, check_box
from criv.sandbox.vmimage.console import ConsoleLog
from criv.sandbox.vmimage.serial import SerialConsole
from criv.vmimage.firmware import Firmware
from criv.vmimage.ssh import SSHClient

# SeaBIOS on the serial console (FirmwareBoot) when no disk holds a boot loader
BOOT_FAILED_MARKS = ("No bootable device", "Boot failed: not a bootable disk")


@dataclass(frozen=True)
class BoxPaths:
    """Where a container's files are, from the pod and container ids alone (never from a
    record: :func:`box_paths`)."""

    dir: Path  # criv-private: console, CRI log
    overlay: Path
    seed: Path
    uefi_vars: Path  # its VM's UEFI variable store (UEFI firmware only)


def box_paths(state_dir: Path, root: Path, pod_id: str, cid: str) -> BoxPaths:
    """``state_dir``: the pod's state dir; ``root``: ``<state_dir>/vmimage`` of criv, what
    QEMU may open; ``cid`` an id criv made (hex)."""
    qdir = machine.pod_dir(root, pod_id)
    return BoxPaths(
        state_dir / "vmimage" / cid[:12],
        qdir / f"overlay-{cid[:12]}.qcow2",
        qdir / f"seed-{cid[:12]}.iso",
        qdir / f"vars-{cid[:12]}.fd",
    )


@dataclass
class VmContainer:
    """The pod's container: its VM."""

    cid: str
    base: machine.BaseDisk
    dir: Path  # criv-private: console, CRI log
    overlay: Path
    seed: Path
    uefi_vars: Path
    user: str
    created_at_ns: int
    firmware: Firmware = "bios"
    state: BoxState = BoxState.CREATED
    started_at_ns: int = 0
    finished_at_ns: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    console: ConsoleLog | None = None
    ssh: SSHClient | None = None
    serial: SerialConsole | None = None  # open while attach sessions run
    watch: asyncio.Task[None] | None = None
    after: asyncio.Task[None] | None = None  # held: the loop keeps only weak references
    ready: asyncio.Lock = field(default_factory=asyncio.Lock)
    domain_uuid: str = ""  # the running VM's libvirt domain (re-adoption checks it)

    def move(self, new: BoxState) -> None:
        """The one way the state changes (:data:`~.boxstate.BOX_TRANSITIONS`)."""
        check_box(self.state, new, f"vm-image container {self.cid[:12]}")
        self.state = new

    @property
    def running(self) -> bool:
        """A VM runs: RUNNING, or STOPPING (its stop under way)."""
        return self.state in VM_STATES

    def info(self) -> AgentContainerInfo:
        return AgentContainerInfo(
            container_id=self.cid, state=AGENT_STATES[self.state],
            created_at_ns=self.created_at_ns,
            started_at_ns=self.started_at_ns, finished_at_ns=self.finished_at_ns,
            exit_code=self.exit_code, reason=self.reason, message=self.message,
        )  # fmt: skip

    def exited(self, why: str, console_tail: str = "", booted: bool = True) -> None:
        """The VM stopped (``why``: the driver's stop reason, or how criv stopped it):
        the container's exit code, reason and message say how."""
        self.finished_at_ns = time.time_ns()
        if not booted and (why == "reset" or any(m in console_tail for m in BOOT_FAILED_MARKS)):
            self.exit_code, self.reason = 255, "BootFailed"
            self.message = f"the VM's disk did not boot; console tail:\n{console_tail}"
        elif why == "shutdown":
            self.exit_code, self.reason, self.message = 0, "Completed", "the VM powered off"
        elif why == "reset":
            self.exit_code, self.reason = 0, "Rebooted"
            self.message = "the guest rebooted (a vm-image VM ends when its guest reboots)"
        elif self.state is BoxState.STOPPING and why == "destroyed":
            self.exit_code, self.reason = 137, "Killed"
            self.message = "the VM did not power off in time and was destroyed"
        else:
            self.exit_code, self.reason = 137 if why == "destroyed" else 255, "VMExited"
            self.message = f"the VM stopped: {why}"
        if not booted and console_tail and self.reason != "BootFailed":
            self.message += f" before its SSH host key appeared; console tail:\n{console_tail}"
        self.move(BoxState.EXITED)

    def gone(self, console_tail: str = "") -> None:
        """Its VM stopped while criv was not running: nobody saw how."""
        was = "during its StopContainer " if self.state is BoxState.STOPPING else ""
        self.finished_at_ns = time.time_ns()
        self.exit_code, self.reason = 255, "VMGone"
        self.message = f"the VM stopped {was}while criv was not running; how it ended is not known"
        if console_tail:
            self.message += f"; console tail:\n{console_tail}"
        self.move(BoxState.EXITED)

    def killed_unstarted(self) -> None:
        """Stopped (or its pod went) before it ever ran."""
        self.finished_at_ns, self.exit_code, self.reason = time.time_ns(), 137, "Killed"
        self.move(BoxState.EXITED)

    def remove_files(self) -> None:
        """Its overlay (and the overlay's pin of its base), seed, UEFI variables and
        private directory (blocking)."""
        for p in (self.overlay, machine.pin_path(self.overlay), self.seed, self.uefi_vars):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        shutil.rmtree(self.dir, ignore_errors=True)
