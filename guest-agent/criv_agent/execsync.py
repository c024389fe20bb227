"""ExecSync: ``crun exec`` bounded by a deadline and an output cap per stream.

The process runs as the container's own (execprocess.py). On timeout the exec'd process
itself is killed (its pid comes from ``--pid-file``; killing only crun would leave it
running in the container), then crun exits with it. Output beyond the cap is read and
dropped, so the process never blocks on a full pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
import time
from dataclasses import dataclass

from criv_agent.crun import Crun
from criv_agent.execprocess import write_exec_process

DEFAULT_LIMIT = 16 << 20
_DRAIN_AFTER_EXIT = 2.0  # background children may hold the pipes; don't wait for them
# How long a kill waits for crun to name the process it is starting. In a TCG guest
# crun exec takes seconds to get there; giving up sooner left the process running.
_PID_WAIT = 30.0
_CRUN_EXIT_WAIT = 5.0


@dataclass
class ExecResult:
    stdout: bytes
    stderr: bytes
    exit_code: int
    timed_out: bool
    truncated: bool


class _Capped:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buf = bytearray()
        self.truncated = False

    async def read(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(64 * 1024):
            room = self.limit - len(self.buf)
            if len(chunk) > room:
                self.truncated = True
                chunk = chunk[: max(room, 0)]
            self.buf += chunk


async def exec_sync(
    crun: Crun, cid: str, bundle: str, workdir: str, cmd: list[str], timeout: int, limit: int
) -> ExecResult:
    limit = limit if limit > 0 else DEFAULT_LIMIT
    procfile = await asyncio.to_thread(write_exec_process, bundle, workdir, cmd, False)
    try:
        return await _exec_sync(crun, cid, procfile, workdir, timeout, limit)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(procfile)


async def _exec_sync(
    crun: Crun, cid: str, procfile: str, workdir: str, timeout: int, limit: int
) -> ExecResult:
    fd, pidfile = tempfile.mkstemp(prefix="exec-", suffix=".pid", dir=workdir)
    os.close(fd)
    proc = await crun.spawn(["exec", "--process", procfile, "--pid-file", pidfile, cid])
    assert proc.stdout is not None and proc.stderr is not None
    out, err = _Capped(limit), _Capped(limit)
    readers = asyncio.gather(out.read(proc.stdout), err.read(proc.stderr))
    timed_out = False
    try:
        await asyncio.wait_for(proc.wait(), timeout if timeout > 0 else None)
    except TimeoutError:
        timed_out = True
        await kill_exec(pidfile, proc)
        try:
            # crun reaps the process it started and exits with it; killed first, it
            # would leave a zombie for the agent's reaper (reaper.py)
            await asyncio.wait_for(proc.wait(), _CRUN_EXIT_WAIT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    # on timeout wait_for cancels the readers; what they read is kept
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(readers, _DRAIN_AFTER_EXIT)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pidfile)
    code = proc.returncode if proc.returncode is not None else -1
    if code < 0:
        code = 128 - code  # killed by a signal: shell convention
    return ExecResult(
        bytes(out.buf), bytes(err.buf), code, timed_out, out.truncated or err.truncated
    )


async def kill_exec(pidfile: str, crun_exec: asyncio.subprocess.Process) -> None:
    """SIGKILL the process ``crun exec --pid-file`` started. crun writes the file only
    once that process exists, so an empty one is waited on while crun is still there
    (it exits if the exec fails), for at most _PID_WAIT."""
    deadline = time.monotonic() + _PID_WAIT
    while True:
        try:
            with open(pidfile, encoding="ascii") as f:
                text = f.read().strip()
        except OSError:
            text = ""
        if text.isdigit():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(text), signal.SIGKILL)
            return
        if crun_exec.returncode is not None or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.025)
