"""criv's reaper (criv/hypervisor/reaper.py), run as the script host set-up runs: the
orphans of its daemon's tree are adopted and reaped by it, signals reach the daemon."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from criv.hypervisor.hostsetup import REAPER

# a daemon that does what libvirt does to a QEMU: fork a child that forks the long-lived
# process and exits (so the process is an orphan), then prints its pid and stays
DAEMON = """
import os, sys, time
r, w = os.pipe()
if os.fork() == 0:
    if os.fork() == 0:
        os.write(w, str(os.getpid()).encode())
        time.sleep(float(sys.argv[1]))
        os._exit(0)
    os._exit(0)
os.wait()
print(os.read(r, 32).decode(), flush=True)
time.sleep(60)
"""


def _ppid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError("no PPid")


def _gone(pid: int, within: float) -> bool:
    # gone: reaped (no /proc entry), not a zombie waiting for its adopter
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return True
        time.sleep(0.01)
    return False


def _reaper(*daemon: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(REAPER), *daemon], stdout=subprocess.PIPE, text=True
    )


def test_an_orphan_of_the_daemon_is_adopted_and_reaped_by_the_reaper() -> None:
    proc = _reaper(sys.executable, "-c", DAEMON, "1")
    try:
        assert proc.stdout is not None
        orphan = int(proc.stdout.readline())
        assert _ppid(orphan) == proc.pid  # adopted by the reaper, not by PID 1
        # it exits after 1 s; the reaper reaps it at once (PID 1 here takes 1-2 s)
        assert _gone(orphan, within=30)
        assert proc.poll() is None  # the daemon still runs, so does the reaper
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_sigterm_reaches_the_daemon_and_the_reaper_exits_with_its_status() -> None:
    code = "import signal, sys, time\n" \
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n" \
        "print('up', flush=True)\ntime.sleep(60)\n"  # fmt: skip
    proc = _reaper(sys.executable, "-c", code)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "up\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 7


def test_without_a_daemon_it_says_how_to_use_it() -> None:
    r = subprocess.run([sys.executable, str(REAPER)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "usage" in r.stderr
