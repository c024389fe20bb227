"""Reaping orphans that the subreaper agent inherits from containers.

A process in a container's pid namespace whose parent outside it dies (typically the
process of a ``crun exec`` killed at its deadline) is reparented to the agent. Left a
zombie, it would keep the container's pid namespace alive: the container's init could
then never finish exiting. So on SIGCHLD (and periodically) the agent reaps zombie
children that live in another pid namespace than its own. Its own children (crun, the
holder) share its namespace and stay with asyncio's child watcher; container inits are
reaped through their pidfd (runtime.py) and excluded here.
"""

from __future__ import annotations

import os
from collections.abc import Callable


def _own_pidns() -> int:
    return os.stat("/proc/self/ns/pid").st_ino


def _children() -> set[int]:
    """The agent's children: from /proc/self/task/*/children where the kernel has it
    (CONFIG_PROC_CHILDREN; criv's guest kernel does not), else by a /proc scan."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return set()
    if not os.path.exists(f"/proc/self/task/{tids[0]}/children"):
        return _children_by_scan(os.getpid())
    out: set[int] = set()
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/children", encoding="ascii") as f:
                out.update(int(p) for p in f.read().split())
        except (OSError, ValueError):
            continue
    return out


def _children_by_scan(parent: int) -> set[int]:
    out: set[int] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        stat = _stat(int(name))
        # after "(comm) ": state, then ppid
        fields = stat[stat.rfind(")") + 2 :].split(" ", 2) if stat else []
        if len(fields) >= 2 and fields[1] == str(parent):
            out.add(int(name))
    return out


def _stat(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _is_zombie(pid: int) -> bool:
    stat = _stat(pid)
    return bool(stat) and stat[stat.rfind(")") + 2 :].startswith("Z")


def _pidns(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None  # zombies keep /proc/<pid>/ns readable on recent kernels; else unknown


class Reaper:
    def __init__(self, excluded: Callable[[], set[int]]) -> None:
        self.excluded = excluded
        self.own_ns = _own_pidns()

    def reap(self) -> list[int]:
        """Reap foreign-namespace zombie children; returns their pids."""
        done: list[int] = []
        skip = self.excluded()
        for pid in _children() - skip:
            if not _is_zombie(pid):
                continue
            ns = _pidns(pid)
            if ns == self.own_ns:
                continue  # one of the agent's own subprocesses: asyncio reaps it
            try:
                got, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if got:
                done.append(pid)
        return done
