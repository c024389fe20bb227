"""Container logs in the CRI format, as containerd's CRI plugin writes them.

Each record is ``<RFC3339Nano> <stdout|stderr> <P|F> <content>\\n``. A line longer than
16 KiB is cut into ``P`` (partial) records of 16 KiB followed by the rest; the newline
ends a line with an ``F`` record. A trailing ``\\r`` before the newline is dropped (Go's
bufio.ReadLine). At EOF, content without a newline is written as a ``P`` record: that is
what containerd does (``redirectLogs``: "readLine only returns error when the message
doesn't end with a newline, in that case it should be treated as a partial line").
Timestamps are UTC with nine fractional digits, so records sort as text.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

MAX_LINE = 16 * 1024
PARTIAL = b"P"
FULL = b"F"


def rfc3339nano(ns: int) -> bytes:
    secs, frac = divmod(ns, 1_000_000_000)
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z").encode()


class LineSplitter:
    """Bytes of one stream in, (tag, content) records out."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        self._buf += data
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                break
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            while len(line) > self.max_line:
                out.append((PARTIAL, line[: self.max_line]))
                line = line[self.max_line :]
            out.append((FULL, line))
        while len(self._buf) > self.max_line:
            out.append((PARTIAL, bytes(self._buf[: self.max_line])))
            del self._buf[: self.max_line]
        return out

    def finish(self) -> list[tuple[bytes, bytes]]:
        """EOF: what is left (no newline) becomes one partial record."""
        if not self._buf:
            return []
        rest = bytes(self._buf)
        self._buf.clear()
        return [(PARTIAL, rest)]


def format_record(ts_ns: int, stream: str, tag: bytes, content: bytes) -> bytes:
    return b"%s %s %s %s\n" % (rfc3339nano(ts_ns), stream.encode(), tag, content)


class CriLogFile:
    """The agent's copy of one container's log: appends records, tracks open streams.

    ``on_change`` is called after every write and when the last stream closes, so that
    LOG data streams following the file wake up.
    """

    def __init__(
        self,
        path: str,
        streams: tuple[str, ...] = ("stdout", "stderr"),
        clock: Callable[[], int] = time.time_ns,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.path = path
        self.clock = clock
        self.on_change = on_change
        self._splitters = {s: LineSplitter() for s in streams}
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    @property
    def open_streams(self) -> int:
        return len(self._splitters)

    def _write(self, stream: str, records: list[tuple[bytes, bytes]]) -> None:
        if not records:
            return
        now = self.clock()
        data = b"".join(format_record(now, stream, tag, c) for tag, c in records)
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        if self.on_change:
            self.on_change()

    def write(self, stream: str, data: bytes) -> None:
        splitter = self._splitters.get(stream)
        if splitter is not None:
            self._write(stream, splitter.feed(data))

    def close_stream(self, stream: str) -> None:
        splitter = self._splitters.pop(stream, None)
        if splitter is not None:
            self._write(stream, splitter.finish())
        if not self._splitters:
            os.close(self._fd)
            self._fd = -1
            if self.on_change:
                self.on_change()

    def close(self) -> None:
        for s in list(self._splitters):
            self.close_stream(s)
