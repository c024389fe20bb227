"""Teardown checks: what a test started (VMs, agents, netns, mounts, links) must be gone."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

# Processes criv starts on behalf of pods; none may survive the test that made them.
WATCHED_PROCESSES = (
    "criv-agent", "criv_agent", "crun", "qemu-system", "criv.vsock", "virtiofsd", "cni",
    "sshd",
)  # fmt: skip


def _processes(scope: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if scope in cmd and any(w in cmd for w in WATCHED_PROCESSES):
            out[int(d.name)] = cmd.strip()
    out.pop(os.getpid(), None)
    return out


def _netns() -> set[str]:
    d = Path("/run/netns")
    return {p.name for p in d.iterdir()} if d.is_dir() else set()


def _mounts(scope: str) -> set[str]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return {m for m in (line.split()[4] for line in lines) if m.startswith(scope)}


def _links() -> set[str]:
    r = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True)
    names = set()
    for line in r.stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(("veth", "tap", "criv")):
            names.add(name)
    return names


@dataclass
class Snapshot:
    processes: dict[int, str]
    netns: set[str]
    mounts: set[str]
    links: set[str]

    @classmethod
    def take(cls, scope: str) -> Snapshot:
        """``scope``: the test session's temp root. Processes and mounts count only when
        they name it, so test runs of other checkouts on the same machine don't trip
        this one; netns and links are machine-wide."""
        return cls(_processes(scope), _netns(), _mounts(scope), _links())

    def leaks_since(self, before: Snapshot) -> list[str]:
        out = []
        for pid, cmd in self.processes.items():
            if pid not in before.processes:
                out.append(f"process {pid}: {cmd}")
        out += [f"netns {n}" for n in sorted(self.netns - before.netns)]
        out += [f"mount {m}" for m in sorted(self.mounts - before.mounts)]
        out += [f"link {n}" for n in sorted(self.links - before.links)]
        return out


def check_no_leaks(before: Snapshot, scope: str, settle: float = 5.0) -> list[str]:
    """Leaks after the test; waits briefly for processes that are already exiting."""
    deadline = time.monotonic() + settle
    while True:
        leaks = Snapshot.take(scope).leaks_since(before)
        if not leaks or time.monotonic() > deadline:
            return leaks
        time.sleep(0.1)
