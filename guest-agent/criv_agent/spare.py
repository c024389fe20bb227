"""A spare namespace holder, started with the agent before there is a pod.

The holder (holder.py) is a Python process, and under TCG starting Python is most of
what it costs (0.5 to 0.9 s of a clone's SetupSandbox). The agent starts one holder in
``--spare`` mode as it starts, and reports serving only once the spare has started and
waits for orders: a VM template, snapshotted after that, holds it, and every clone's
pod takes it (``Sandbox.start_holder``) instead of starting Python.

A spare is in the agent's namespaces, and stays there until it has its orders; it is
used once (``take``), and a dead one is not used. No new spare is started after: one
agent serves one pod, and Python starting beside the pod's first container would slow
that; a later holder (the first one died) is started as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from asyncio.subprocess import Process

from criv_agent.errors import InvalidArgument
from criv_agent.hostname import hostname_problem

log = logging.getLogger(__name__)

HOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "holder.py")


def holder_argv(*args: str) -> list[str]:
    # by file path, without site: starts fastest and needs only the stdlib
    return [sys.executable, "-S", "-E", HOLDER, *args]


def check_hostname(name: str) -> str:
    """The pod hostname as the host validates it (:mod:`.hostname`). It goes to the
    holder as an argument or a line of its orders: nothing else gets through."""
    problem = hostname_problem(name)
    if problem:
        raise InvalidArgument(f"hostname {name[:80]!r} {problem}")
    return name


def order_line(hostname: str, share_pid: bool) -> bytes:
    """A spare's orders (holder.parse_order reads them); ``hostname`` already checked."""
    return (b"pid " if share_pid else b"- ") + hostname.encode() + b"\n"


class SpareHolder:
    def __init__(self) -> None:
        self._proc: Process | None = None
        self._ready = False

    async def start(self) -> None:
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *holder_argv("--spare"),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                # a failure's message comes back in place of "ready" (the pod's dir,
                # where a holder's log goes, is not known yet)
                stderr=asyncio.subprocess.STDOUT,
                # the agent's process group, as a holder's (sandbox.py)
            )
        except OSError as e:  # no spare: pods start their holders as before
            log.warning("spare namespace holder: %s", e)

    async def wait_ready(self, timeout: float) -> bool:
        """Until the spare waits for orders (its Python has started). A spare that does
        not get there is killed and forgotten: pods then start their holders anew."""
        proc = self._proc
        if proc is None:
            return False
        assert proc.stdout is not None
        line = b""
        with contextlib.suppress(TimeoutError):
            line = await asyncio.wait_for(proc.stdout.readline(), timeout)
        if line == b"spare\n":
            self._ready = True
            log.debug("spare namespace holder %d waits", proc.pid)
            return True
        log.warning("spare namespace holder did not start: %r", line[:200])
        await self.close()
        return False

    def take(self) -> Process | None:
        """The spare, if it waits for orders (once: then it is the caller's)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if not self._ready or proc.returncode is not None:
            _kill(proc)
            return None
        return proc

    async def close(self) -> None:
        """Kill an unused spare (the agent exits, or the pod wants no holder)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _kill(proc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5)


def _kill(proc: Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
