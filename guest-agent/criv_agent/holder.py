"""The pod's namespace holder.

    python -S -E holder.py HOSTNAME [--pid]    a holder for the pod, now
    python -S -E holder.py --spare             a spare: the same, on orders from stdin

Unshares IPC and UTS (and with ``--pid`` a PID namespace, whose init it forks), sets the
pod hostname, prints ``ready`` and sleeps; containers join it through
``/proc/<pid>/ns/{ipc,uts,pid_for_children}``. The pid-namespace init reaps orphans and
dies with the holder (PR_SET_PDEATHSIG), taking the pod's shared pid namespace with it.

A spare is started by the agent before there is a pod (so that a VM template holds one
with Python already started, spare.py): it prints ``spare`` and waits, in the agent's
namespaces, for one line on stdin, ``pid HOSTNAME`` or ``- HOSTNAME``, and then does what
a holder does. At EOF (the agent went away, or closed it unused) it exits. Its stderr
is its stdout, so a failure's message reaches the agent in place of ``ready``.

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
HOSTNAME_MAX = 64  # what sethostname takes
ORDER_MAX = 4 + HOSTNAME_MAX + 1  # "pid " + hostname + "\n"


def parse_order(line: bytes) -> tuple[bytes, bool]:
    """A spare's orders: ``pid HOSTNAME\\n`` or ``- HOSTNAME\\n`` (the hostname may be
    empty: keep the agent's). The agent checked the hostname (RFC 1123); this only
    refuses what could not have come from it."""
    if not line.endswith(b"\n") or len(line) > ORDER_MAX:
        raise ValueError("orders: not one line")
    mode, sep, hostname = line[:-1].partition(b" ")
    if not sep or mode not in (b"pid", b"-"):
        raise ValueError("orders: no pid mode")
    if len(hostname) > HOSTNAME_MAX or any(c <= 0x20 or c >= 0x7F for c in hostname):
        raise ValueError("orders: bad hostname")
    return hostname, mode == b"pid"


def main() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    spare = sys.argv[1:] == ["--spare"]
    if spare:
        orders = _await_orders()
        if orders is None:
            return
        hostname, share_pid = orders
    else:
        hostname, share_pid = sys.argv[1].encode(), "--pid" in sys.argv[2:]
    flags = CLONE_NEWIPC | CLONE_NEWUTS | (CLONE_NEWPID if share_pid else 0)
    if libc.unshare(flags) != 0:
        sys.exit(f"unshare: {os.strerror(ctypes.get_errno())}")
    if hostname and libc.sethostname(hostname, len(hostname)) != 0:
        sys.exit(f"sethostname: {os.strerror(ctypes.get_errno())}")
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    # a terminal's ^C is meant for the agent; the pod's namespaces outlive agent restarts
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if spare:
        # the failures that have a message are behind; stderr was the agent's pipe
        _to_devnull(2)
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


def _await_orders() -> tuple[bytes, bool] | None:
    # ^C at a terminal is the agent's, as for a holder
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdout.write("spare\n")
    sys.stdout.flush()
    line = sys.stdin.buffer.readline(ORDER_MAX + 1)
    if not line:
        return None
    try:
        orders = parse_order(line)
    except ValueError as e:
        sys.exit(str(e))
    _to_devnull(0)  # the orders are in: nothing more from the agent
    return orders


def _to_devnull(fd: int) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, fd)
    os.close(null)


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
