"""Follow a container's log from the agent into the host log file kubelet reads.

The agent keeps its own copy of the log, already in CRI format; criv opens a data
connection (``StreamOpen{kind: LOG, offset}``) and appends what arrives to
``log_directory/log_path`` on the host. The agent offset reached is persisted next
to the container record after every write, so a follower restarted by a new criv
resumes where the old one stopped (no loss, no duplicates beyond the last chunk if
criv died between write and persist). The agent closes the stream once the container
has exited and everything was sent: that is when :attr:`LogFollower.done` is set.

ReopenContainerLog (after kubelet rotated the file) switches to a fresh file at a
line boundary, so no CRI record is split across two files.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import struct
from pathlib import Path

from criv_agent.api.agent.v1 import agent_pb2

log = logging.getLogger("criv.agent.log")

MAX_HEADER = 64 * 1024
CHUNK = 64 * 1024
CONNECT_TIMEOUT = 10.0
# A dead agent (pod gone) is not retried forever.
MAX_CONNECT_FAILURES = 20
STOP_TIMEOUT = 5.0


def open_log(path: str | os.PathLike[str]) -> int:
    """Open a container's CRI log for appending, creating it 0640. A link or a FIFO put
    where the log goes is refused (ELOOP/ENXIO), never followed or waited on."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    fd = os.open(path, flags, 0o640)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


class StreamRefused(Exception):
    pass


async def open_stream(
    data_path: str, req: agent_pb2.StreamOpen, timeout: float = CONNECT_TIMEOUT
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a data connection and do the StreamOpen/StreamAccept handshake."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(data_path), timeout)
    try:
        payload = req.SerializeToString()
        writer.write(struct.pack(">I", len(payload)) + payload)
        await writer.drain()
        head = await asyncio.wait_for(reader.readexactly(4), timeout)
        (n,) = struct.unpack(">I", head)
        if n > MAX_HEADER:
            raise StreamRefused(f"agent sent a {n}-byte stream header")
        accept = agent_pb2.StreamAccept.FromString(
            await asyncio.wait_for(reader.readexactly(n), timeout)
        )
        if not accept.ok:
            raise StreamRefused(accept.error[:2000] or "refused")
    except BaseException:
        writer.close()
        raise
    return reader, writer


def read_offset(path: Path) -> int:
    try:
        return max(int(path.read_text().strip() or "0"), 0)
    except (OSError, ValueError):
        return 0


def _write_offset(path: Path, offset: int) -> None:
    # Not fsynced: a crash loses at most the last chunk's offset, re-sent once.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(str(offset))
    os.replace(tmp, path)


class LogFollower:
    def __init__(
        self, data_path: str, container_id: str, log_path: Path, offset_path: Path
    ) -> None:
        self.data_path = data_path
        self.container_id = container_id
        self.log_path = log_path
        self.offset_path = offset_path
        self.done = asyncio.Event()
        self._fd: int | None = None
        self._reopen = False
        self._at_line_start = True
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"log-{self.container_id[:12]}")

    async def stop(self) -> None:
        """Stop following (criv is stopping or the container goes); never hangs."""
        self._stopping = True
        if self._writer is not None:
            self._writer.close()  # wakes a pending read even if a cancel got lost
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=STOP_TIMEOUT)
        self._close()

    async def wait(self, timeout: float) -> bool:
        """Wait for the whole log to be on the host; False on timeout."""
        try:
            await asyncio.wait_for(self.done.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def reopen(self) -> None:
        if self.done.is_set():
            return  # all written and closed: the next reader opens what it likes
        self._reopen = True
        if self._at_line_start:
            self._switch()

    def _open(self) -> int:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        return open_log(self.log_path)

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _switch(self) -> None:
        self._close()
        self._reopen = False
        self._fd = self._open()

    def _append(self, data: bytes, offset: int) -> None:
        if self._fd is None:
            self._fd = self._open()
        if self._reopen:
            cut = 0 if self._at_line_start else data.find(b"\n") + 1
            if cut > 0 or self._at_line_start:
                os.write(self._fd, data[:cut])
                self._switch()
                data = data[cut:]
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        if data:
            self._at_line_start = data.endswith(b"\n")
        _write_offset(self.offset_path, offset)

    async def _run(self) -> None:
        failures = 0
        offset = await asyncio.to_thread(read_offset, self.offset_path)
        try:
            await self._follow(offset, failures)
        except asyncio.CancelledError:
            raise  # criv is stopping: not done, a later criv resumes from the offset
        except Exception:
            log.exception("log of %s: follower failed", self.container_id[:12])
        if self._stopping:
            return  # stopped, not finished: a later criv resumes from the offset
        # Reached only when the stream ended for good (or cannot be had).
        self._close()
        self.done.set()

    async def _follow(self, offset: int, failures: int) -> None:
        while not self._stopping:
            req = agent_pb2.StreamOpen(
                kind=agent_pb2.StreamOpen.LOG, container_id=self.container_id, offset=offset
            )
            try:
                reader, writer = await open_stream(self.data_path, req)
            except StreamRefused as e:
                log.warning("log of %s: agent refused: %s", self.container_id[:12], e)
                return
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
                failures += 1
                if failures >= MAX_CONNECT_FAILURES:
                    log.warning("log of %s: giving up: %s", self.container_id[:12], e)
                    return
                await asyncio.sleep(min(0.1 * failures, 1.0))
                continue
            failures = 0
            self._writer = writer
            try:
                while not self._stopping:
                    chunk = await reader.read(CHUNK)
                    if not chunk:
                        return  # the agent sent everything and closed
                    offset += len(chunk)
                    await asyncio.to_thread(self._append, chunk, offset)
            except (OSError, asyncio.IncompleteReadError):
                continue  # connection broke mid-stream: resume from offset
            finally:
                self._writer = None
                writer.close()
