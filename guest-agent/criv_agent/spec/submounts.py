"""The mounts below a bind mount's source, so that ``rbind`` means recursive.

crun 1.8 (Debian 12's, on hosts and in the guest) clones a bind source with
``open_tree`` without ``AT_RECURSIVE`` whatever the options say: a volume's sub-mounts
(a tmpfs under a hostPath, kubelet's secret mounts under a pod dir) would be missing in
the container, where containerd + runc show them. The agent lists them from its mount
table and adds one bind per sub-mount, parents first, each with its own ``ro``/``rw``
as on the host (a non-recursive read-only volume keeps writable sub-mounts, as in
containerd), or read-only when the volume is ``recursive_read_only``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

# a hostPath of "/" would list the whole mount table; beyond this many the rest is left
# out (logged by the caller) rather than making config.json and crun's work unbounded
MAX_SUBMOUNTS = 256

_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Submount:
    path: str  # the mount point, in the agent's mount namespace
    readonly: bool  # the mount's own (per-mount) flag


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Submount]:
    """Mount points in table order (a later mount on the same point covers an earlier)."""
    out = []
    for line in text.splitlines():
        f = line.split()
        if len(f) < 6:
            continue
        opts = f[5].split(",")
        out.append(Submount(_unescape(f[4]), "ro" in opts))
    return out


def under(source: str, table: list[Submount]) -> list[Submount]:
    """The mounts strictly below ``source`` (resolved), the top one per mount point,
    shallowest first; at most :data:`MAX_SUBMOUNTS`."""
    real = os.path.realpath(source)
    base = real.rstrip("/") + "/"
    top: dict[str, Submount] = {}
    for m in table:
        if m.path != real and m.path.startswith(base):  # not the source's own mount
            top.pop(m.path, None)  # keep table order for what covers what
            top[m.path] = m
    found = sorted(top.values(), key=lambda m: m.path.count("/"))
    return found[:MAX_SUBMOUNTS]


def read_mountinfo() -> str:
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except OSError:
        return ""
