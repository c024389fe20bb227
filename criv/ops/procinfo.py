"""Facts about one of criv's host processes (a pod's QEMU, agent or vsock backend) from
/proc: memory, uptime, an argument of its command line, the backend's status file.

Every caller names the process by the pid (and start time, where criv recorded one)
that criv's own records hold; nothing here looks a process up by name. Blocking.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from criv.procscan import process_start_time, same_process

PROC = Path("/proc")
# The backend's status file is a few hundred bytes; read no more than this of it.
MAX_STATUS_BYTES = 64 * 1024


@dataclass(frozen=True)
class Memory:
    rss_kib: int
    pss_kib: int


def memory(pid: int) -> Memory | None:
    """Resident and proportional set size of ``pid`` (None: gone or unreadable)."""
    if pid <= 0:
        return None
    fields: dict[str, int] = {}
    try:
        with open(PROC / str(pid) / "smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss"):
                    fields[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if "Rss" not in fields:
        return None
    return Memory(fields["Rss"], fields.get("Pss", fields["Rss"]))


def uptime_seconds(pid: int) -> float | None:
    """How long ``pid`` has run (None: gone)."""
    start = process_start_time(pid) if pid > 0 else None
    if start is None:
        return None
    try:
        since_boot = float((PROC / "uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, since_boot - start / os.sysconf("SC_CLK_TCK"))


def argv(pid: int) -> list[str]:
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def arg_after(args: list[str], flag: str) -> str | None:
    """The value of ``flag`` (``--flag VALUE`` or ``--flag=VALUE``) in ``args``."""
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a[len(flag) + 1 :]
    return None


def vsock_status(backend_pid: int, start_time: int) -> dict[str, Any]:
    """The status file of a vm pod's vsock backend ({} when the backend is gone or wrote
    none). The file's path is the one the backend was started with (``--status-file``),
    and the backend must still be the process criv recorded."""
    if not same_process(backend_pid, start_time):
        return {}
    path = arg_after(argv(backend_pid), "--status-file")
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(MAX_STATUS_BYTES))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
