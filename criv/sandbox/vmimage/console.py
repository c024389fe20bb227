"""A vm-image container's log: its VM's serial console, in CRI log format.

libvirt's virtlogd writes the console to ``console.log`` (capped, rotated); a follower
task reads what is new every :data:`POLL` seconds, writes it as ``stdout`` records with
the agent's CRI log writer (``criv_agent.logs``) to ``serial.log``, which the pod's data
endpoint serves as the container's LOG stream, and looks for the SSH host key line of
the first boot (:func:`criv.vmimage.sshkeys.pin_from_console`) in the first MiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from pathlib import Path

from criv.errors import CrivError
from criv.vmimage.sshkeys import MAX_CONSOLE_SCAN, HostKeyPin, pin_from_console
from criv_agent.logs import CriLogFile

log = logging.getLogger("criv.sandbox.vmimage")

POLL = 0.2
CHUNK = 256 * 1024
_ESCAPES = re.compile(rb"\x1b(\[[0-9;?]*[ -/]*[@-~]|[@-_c])")
_CONTROL = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")


class ConsoleLog:
    """Follows ``console`` into ``cri_path`` until :meth:`finish`."""

    def __init__(self, console: Path, cri_path: Path) -> None:
        self.console = console
        self.path = cri_path
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._cri = CriLogFile(str(cri_path), streams=("stdout",), on_change=self._wake)
        self._offset = 0
        self._head = bytearray()
        self.pin: HostKeyPin | None = None
        self.pinned = asyncio.Event()
        self._done = False
        self._task: asyncio.Task[None] | None = None

    def _wake(self) -> None:  # called on the reader's thread
        with contextlib.suppress(RuntimeError):  # the loop is closed
            self._loop.call_soon_threadsafe(self._changed.set)

    @property
    def complete(self) -> bool:
        return self._done

    async def wait_change(self, timeout: float) -> None:
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def start(self) -> None:
        if self._task is None:
            self._task = self._loop.create_task(self._follow())

    async def finish(self) -> None:
        """The VM stopped: copy what is left, then end the log (LOG streams close)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
        if not self._done:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self._read_new)
            self._cri.close()
            self._done = True
            self._changed.set()

    def tail(self, n: int = 2000) -> str:
        """The console's last ``n`` bytes, for error messages: terminal escapes dropped,
        other control bytes but newline and tab shown as ``\\xNN`` (the guest wrote it)."""
        try:
            with open(self.console, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - n))
                data = f.read(n)
        except OSError:
            return ""
        data = _ESCAPES.sub(b"", data.replace(b"\r", b""))
        data = _CONTROL.sub(lambda m: b"\\x%02x" % m.group()[0], data)
        return data.decode(errors="replace")

    async def _follow(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self._read_new)
            except OSError as e:
                log.debug("console %s: %s", self.console, e)
            await asyncio.sleep(POLL)

    def _read_new(self) -> None:
        try:
            fd = os.open(self.console, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return
        with os.fdopen(fd, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size < self._offset:  # virtlogd rotated it
                self._offset = 0
            f.seek(self._offset)
            while chunk := f.read(CHUNK):
                self._offset += len(chunk)
                self._cri.write("stdout", chunk)
                if self.pin is None and len(self._head) < MAX_CONSOLE_SCAN:
                    self._head += chunk[: MAX_CONSOLE_SCAN - len(self._head)]
                    self._look_for_pin()

    def _look_for_pin(self) -> None:
        # the test disk and cloud-init print the key block, then more: wait for a whole
        # line after a key line so a half-written line is never taken
        try:
            pin = pin_from_console(bytes(self._head[: self._head.rfind(b"\n") + 1]))
        except CrivError as e:
            log.warning("console %s: no host key pin: %s", self.console, e)
            self._head = bytearray(MAX_CONSOLE_SCAN)  # stop looking
            return
        if pin is not None:
            self.pin = pin
            log.info("console %s: host key pinned %s", self.console, pin)
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self.pinned.set)
