"""The pod's namespace holder: ``python -m criv_agent.holder HOSTNAME [--pid]``.

Unshares IPC and UTS (and with ``--pid`` a PID namespace, whose init it forks), sets the
pod hostname, prints ``ready`` and sleeps; containers join it through
``/proc/<pid>/ns/{ipc,uts,pid_for_children}``. The pid-namespace init reaps orphans and
dies with the holder (PR_SET_PDEATHSIG), taking the pod's shared pid namespace with it.
Kept import-light: it starts once per pod.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
PR_SET_PDEATHSIG = 1


def main() -> None:
    hostname = sys.argv[1].encode()
    share_pid = "--pid" in sys.argv[2:]
    libc = ctypes.CDLL(None, use_errno=True)
    flags = CLONE_NEWIPC | CLONE_NEWUTS | (CLONE_NEWPID if share_pid else 0)
    if libc.unshare(flags) != 0:
        sys.exit(f"unshare: {os.strerror(ctypes.get_errno())}")
    if hostname and libc.sethostname(hostname, len(hostname)) != 0:
        sys.exit(f"sethostname: {os.strerror(ctypes.get_errno())}")
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    # a terminal's ^C is meant for the agent; the pod's namespaces outlive agent restarts
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if share_pid:
        child = os.fork()
        if child == 0:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            _init_loop()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    os.close(1)
    while True:
        signal.pause()


def _init_loop() -> None:
    # pid 1 of the pod: ignore stray signals, reap whatever is reparented here
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # a handler (not SIG_DFL, which ignores SIGCHLD) so that pause() wakes to reap
    signal.signal(signal.SIGCHLD, lambda *_: None)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            signal.pause()
        except InterruptedError:
            continue


if __name__ == "__main__":
    main()
