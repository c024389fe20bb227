"""The console's CRI log file, written as the agent writes container logs
(:mod:`criv_agent.logs`: ``stdout`` records, lines cut at 16 KiB into ``P`` records) plus
what a criv restart needs to go on with it without losing or repeating a line:

- ``pending``: bytes fed that are not in a record yet (the start of a line);
- ``size``: the file's size, so a mark (console offset, log size) names a record boundary;
- :meth:`CriConsoleFile.detach`: close without writing the pending bytes (criv stops, the
  VM goes on: the next criv reads them again from the console);
- :func:`cut_to`: drop what was written after a mark (criv died between writing records
  and recording the mark: the next criv writes them again from the console).

Records written again from the same console bytes have the same lengths (the timestamp
has a fixed width, the split depends only on the bytes): the LOG stream's reader, resuming
from its own offset, lands on the same boundary.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from criv_agent.logs import LineSplitter, format_record

STREAM = "stdout"


class _Splitter(LineSplitter):
    @property
    def pending(self) -> int:
        return len(self._buf)


def _open(path: Path) -> int:
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    return os.open(path, flags, 0o640)


class CriConsoleFile:
    """Appends the console's bytes to ``path`` as CRI records (blocking calls)."""

    def __init__(
        self,
        path: Path,
        on_change: Callable[[], None] | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.path = path
        self._on_change = on_change
        self._clock = clock
        self._splitter = _Splitter()
        self._fd = _open(path)
        self.size = os.fstat(self._fd).st_size

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def pending(self) -> int:
        return self._splitter.pending

    def write(self, data: bytes) -> None:
        self._records(self._splitter.feed(data))

    def close(self) -> None:
        """The console ended: what is left of a line becomes a ``P`` record."""
        if self._fd >= 0:
            self._records(self._splitter.finish())
            self.detach()

    def detach(self) -> None:
        """Close, leaving pending bytes unwritten."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            if self._on_change:
                self._on_change()

    def _records(self, records: list[tuple[bytes, bytes]]) -> None:
        if not records or self._fd < 0:
            return
        now = self._clock()
        view = memoryview(b"".join(format_record(now, STREAM, tag, c) for tag, c in records))
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
            self.size += n
        if self._on_change:
            self._on_change()


def cut_to(path: Path, size: int) -> int:
    """Drop what ``path`` holds past ``size`` (blocking); returns its size after."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return 0
    try:
        now = os.fstat(fd).st_size
        if now > size:
            os.ftruncate(fd, size)
            return size
        return now
    finally:
        os.close(fd)
