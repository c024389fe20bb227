"""Container exits, seen through a pidfd on each container's init.

The agent is a child subreaper (main.py), so once ``crun create`` has exited the init is
the agent's child: its pidfd becomes readable at exit and ``waitid(P_PIDFD)`` yields the
status (signals as 128+N). An init the agent did not start (it was running when the agent
restarted) is not its child: its exit is still seen, but the status is lost (None).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

OnExit = Callable[[str, "int | None"], Awaitable[None]]


class ExitWatcher:
    def __init__(self, on_exit: OnExit) -> None:
        self._on_exit = on_exit
        self._pidfds: dict[str, int] = {}
        self._bg: set[asyncio.Future[None]] = set()

    def watch(self, cid: str, pid: int) -> None:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._exited(cid, None)
            return
        self._pidfds[cid] = fd
        asyncio.get_running_loop().add_reader(fd, self._ready, cid, fd)

    def _ready(self, cid: str, fd: int) -> None:
        asyncio.get_running_loop().remove_reader(fd)
        status: int | None = None
        try:
            res = os.waitid(os.P_PIDFD, fd, os.WEXITED)
            if res is not None:
                code, st = res.si_code, res.si_status
                status = st if code == os.CLD_EXITED else 128 + st
        except ChildProcessError:
            status = None  # not our child any more (agent restarted): status lost
        os.close(fd)
        self._pidfds.pop(cid, None)
        self._exited(cid, status)

    def _exited(self, cid: str, status: int | None) -> None:
        task = asyncio.ensure_future(self._on_exit(cid, status))
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def forget(self, cid: str) -> None:
        """Stop watching a container that is being removed."""
        fd = self._pidfds.pop(cid, None)
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    def close(self) -> None:
        """Agent exit without shutdown: the containers go on, nobody watches them."""
        for fd in self._pidfds.values():
            os.close(fd)
        self._pidfds.clear()
