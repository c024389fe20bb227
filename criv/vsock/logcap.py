"""Bounded logging for the backend: the guest can trigger log lines, so neither their rate nor
the log file's size may depend on it."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable

DEFAULT_LOG_MAX_BYTES = 4 << 20
TRUNCATED = b"criv-vsock: log over %d bytes, older lines dropped\n"


class CappedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to a stream (stderr); when that is a regular file grown past ``max_bytes``,
    keeps only its last quarter behind a marker line.  criv opens the file with O_APPEND, so
    truncating it under the writer is safe."""

    def __init__(self, stream: object, max_bytes: int) -> None:
        super().__init__(stream)
        self.max_bytes = max_bytes

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        # not a file we can cap (a pipe, a closed stream): nothing to bound
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self._cap()

    def _cap(self) -> None:
        fd = self.stream.fileno()
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size <= self.max_bytes:
            return
        keep = self.max_bytes // 4
        # the fd may be write-only: read the tail through a second open of the same file
        rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
        try:
            tail = os.pread(rfd, keep, st.st_size - keep)
        finally:
            os.close(rfd)
        tail = tail[tail.find(b"\n") + 1 :]  # whole lines only
        os.ftruncate(fd, 0)
        os.write(fd, TRUNCATED % self.max_bytes + tail)


class RateLimited:
    """At most ``burst`` warnings per key and ``interval``; the number held back is logged
    when the key's next window opens."""

    def __init__(
        self,
        log: logging.Logger,
        *,
        interval: float = 10.0,
        burst: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.interval = interval
        self.burst = burst
        self.clock = clock
        self._windows: dict[str, list[float]] = {}  # key -> [start, logged, held back]

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = self.clock()
        w = self._windows.get(key)
        if w is None or now - w[0] >= self.interval:
            if w is not None and w[2]:
                self.log.warning("%d more %r warnings were not logged", int(w[2]), key)
            w = self._windows[key] = [now, 0, 0]
        if w[1] < self.burst:
            w[1] += 1
            self.log.warning(msg, *args)
        else:
            w[2] += 1
