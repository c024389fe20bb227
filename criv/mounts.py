"""What is mounted where, read from /proc/self/mountinfo (blocking: call off the loop)."""

from __future__ import annotations

from pathlib import Path


def mount_points() -> list[str]:
    """Every mount point of this mount namespace ([] if mountinfo cannot be read)."""
    try:
        with open("/proc/self/mountinfo") as f:
            return [line.split()[4] for line in f]
    except OSError:
        return []


def is_mounted(path: Path) -> bool:
    return str(path) in mount_points()


def mounts_under(prefix: Path) -> list[Path]:
    """Mount points below ``prefix`` (deepest first), for orphan sweeps."""
    p = str(prefix).rstrip("/") + "/"
    found = [Path(m) for m in mount_points() if m.startswith(p)]
    return sorted(found, key=lambda x: len(x.parts), reverse=True)
