"""Finding and killing host processes criv started: one /proc scan for every mode.

Agents (host pods) and vsock backends (vm pods) run in sessions of their own so they
outlive criv; a restarted criv finds them by pid plus start time (pids get reused),
or, for orphans, by their command line.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

PROC = Path("/proc")


_TICK_NS = 1_000_000_000 // (os.sysconf("SC_CLK_TCK") or 100)


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (the state first)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # comm may hold spaces and parens: the fields after the last ')' are fixed.
    return stat[stat.rfind(")") + 2 :].split()


def process_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of ``pid``, None if it is gone or a zombie."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def cpu_ns(pid: int) -> int | None:
    """User + system CPU time of ``pid``, all its threads, in nanoseconds (None: gone)."""
    fields = _stat_fields(pid)
    return None if fields is None else (int(fields[11]) + int(fields[12])) * _TICK_NS


def same_process(pid: int, start_time: int | None) -> bool:
    """Is ``pid`` still the process that had ``start_time`` when criv recorded it?"""
    return pid > 0 and bool(start_time) and process_start_time(pid) == start_time


def _other_pids() -> list[int]:
    me = os.getpid()
    return [int(d.name) for d in PROC.iterdir() if d.name.isdigit() and int(d.name) != me]


def find_processes(match: Callable[[list[bytes]], bool]) -> list[int]:
    """Pids whose argv (split on NUL) ``match`` accepts; never criv itself."""
    found = []
    for pid in _other_pids():
        with contextlib.suppress(OSError):
            if match((PROC / str(pid) / "cmdline").read_bytes().split(b"\0")):
                found.append(pid)
    return found


def processes_in_netns(netns: str) -> list[int]:
    """Pids whose network namespace is the one bound at ``netns``."""
    try:
        ino = os.stat(netns).st_ino
    except OSError:
        return []
    found = []
    for pid in _other_pids():
        with contextlib.suppress(OSError):
            if os.stat(PROC / str(pid) / "ns" / "net").st_ino == ino:
                found.append(pid)
    return found


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def kill_group(pid: int) -> None:
    """SIGKILL the process group ``pid`` leads (its helpers too), then ``pid`` itself."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    kill(pid)
