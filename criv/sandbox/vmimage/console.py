"""A vm-image container's log: its VM's serial console, in CRI log format.

libvirt's virtlogd writes the console to ``console.log`` (capped, rotated); a follower
task reads what is new every :data:`POLL` seconds, writes it as ``stdout`` records with
the agent's CRI log format (:mod:`.crilog`) to ``serial.log``, which the pod's data
endpoint serves as the container's LOG stream, and looks for the SSH host key line of
the first boot (:func:`criv.vmimage.sshkeys.pin_from_console`) in the first MiB.

Across a criv restart: the follower's **mark** (:class:`~.record.ConsoleMark`: console
bytes copied as whole records, and the CRI log's size then) is recorded every
:data:`MARK_INTERVAL` seconds (``on_mark``) and when criv stops (:meth:`ConsoleLog.suspend`,
which leaves a line's start unwritten); the next criv goes on from it
(:meth:`ConsoleLog.resume`): what was written after the mark is cut and written again
from the console (the same records, so no line is lost or repeated), the host key pin is
the recorded one. A console that virtlogd rotated while criv was down (it is capped)
is read from its new file's start: what the old file got after the mark is not copied.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from criv.errors import CrivError
from criv.sandbox.vmimage.crilog import CriConsoleFile, cut_to
from criv.sandbox.vmimage.record import ConsoleMark
from criv.vmimage.sshkeys import MAX_CONSOLE_SCAN, HostKeyPin, pin_from_console

log = logging.getLogger("criv.sandbox.vmimage")

POLL = 0.2
CHUNK = 256 * 1024
MARK_INTERVAL = 2.0  # seconds between recorded marks while the console grows
_ESCAPES = re.compile(rb"\x1b(\[[0-9;?]*[ -/]*[@-~]|[@-_c])")
_CONTROL = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")


class ConsoleLog:
    """Follows ``console`` into ``cri_path`` until :meth:`finish` (the VM stopped) or
    :meth:`suspend` (criv stops)."""

    def __init__(
        self,
        console: Path,
        cri_path: Path,
        on_mark: Callable[[], Awaitable[None]] | None = None,
        *,
        mark: ConsoleMark | None = None,
        pin: HostKeyPin | None = None,
        head: bytes = b"",
        ended: bool = False,
    ) -> None:
        self.console = console
        self.path = cri_path
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._on_mark = on_mark
        self._cri = None if ended else CriConsoleFile(cri_path, on_change=self._wake)
        self._offset = mark.offset if mark is not None else 0
        self.mark = ConsoleMark(self._offset, self._cri.size if self._cri else 0)
        self._marked = (self.mark, time.monotonic())
        self._head = bytearray(head[:MAX_CONSOLE_SCAN])
        self.pin = pin
        self.pinned = asyncio.Event()
        if pin is not None:
            self.pinned.set()
        elif self._head:
            self._look_for_pin()
        self._done = ended
        self._task: asyncio.Task[None] | None = None
        self._io = threading.Lock()

    @classmethod
    async def resume(
        cls,
        console: Path,
        cri_path: Path,
        mark: ConsoleMark,
        pin: HostKeyPin | None,
        on_mark: Callable[[], Awaitable[None]] | None = None,
    ) -> ConsoleLog:
        """Go on from a recorded ``mark`` (see the module docstring); not started."""

        def prepare() -> tuple[ConsoleMark, bytes]:
            cut_to(cri_path, mark.log_size)
            try:
                size = os.stat(console, follow_symlinks=False).st_size
            except FileNotFoundError:
                size = 0
            offset = mark.offset
            if size < offset:
                log.warning("console %s: rotated while criv was down; read from its start", console)
                offset = 0
            head = b""
            if pin is None and offset:  # the key may be in what was copied already
                with contextlib.suppress(OSError), _open_ro(console) as f:
                    head = f.read(min(offset, MAX_CONSOLE_SCAN))
            return ConsoleMark(offset, mark.log_size), head

        start, head = await asyncio.to_thread(prepare)
        return cls(console, cri_path, on_mark, mark=start, pin=pin, head=head)

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
        await self._stop_task()
        if not self._done:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self._read_new)
            if self._cri is not None:
                self._cri.close()
            self._done = True
            self._changed.set()

    async def suspend(self) -> ConsoleMark:
        """criv stops, the VM goes on: copy what is there, stop following, leave the log
        open-ended (its LOG streams do not end) and give the mark to go on from."""
        await self._stop_task()
        if not self._done and self._cri is not None and not self._cri.closed:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self._read_new)
            self._cri.detach()
        return self.mark

    async def _stop_task(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None

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
            await self._record_mark()
            await asyncio.sleep(POLL)

    async def _record_mark(self) -> None:
        mark, (last, at) = self.mark, self._marked
        if self._on_mark is None or mark == last or time.monotonic() - at < MARK_INTERVAL:
            return
        self._marked = (mark, time.monotonic())
        try:
            await self._on_mark()
        except (CrivError, OSError) as e:  # the next one may pass; a restart repeats more
            log.warning("console %s: recording its mark failed: %s", self.console, e)

    def _read_new(self) -> None:
        # a read whose awaiting task was cancelled goes on in its thread: the next waits
        with self._io:
            self._copy_new()

    def _copy_new(self) -> None:
        cri = self._cri
        if cri is None or cri.closed:
            return
        try:
            f = _open_ro(self.console)
        except FileNotFoundError:
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            if size < self._offset:  # virtlogd rotated it
                self._offset = 0
            f.seek(self._offset)
            while chunk := f.read(CHUNK):
                self._offset += len(chunk)
                cri.write(chunk)
                if self.pin is None and len(self._head) < MAX_CONSOLE_SCAN:
                    self._head += chunk[: MAX_CONSOLE_SCAN - len(self._head)]
                    self._look_for_pin()
        # whole records only: a line's start is read again after a restart
        self.mark = ConsoleMark(max(self._offset - cri.pending, 0), cri.size)

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


def _open_ro(path: Path) -> io.FileIO:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    return io.FileIO(fd, "rb")
