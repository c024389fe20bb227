"""Failpoints: named places in criv's operations where a test makes criv crash or fail.

``CRIV_FAILPOINTS`` (read once, at import) names points and what happens there::

    CRIV_FAILPOINTS="run_pod.after_cni_add=kill,create_container.after_rootfs=error"

- ``kill``: criv SIGKILLs itself, as a crash or an OOM kill would (no cleanup, no
  ``finally``), so a test can check what a restarted criv makes of the leftovers;
- ``error``: the step fails with ``Internal`` every time it is reached;
- ``error-once``: the step fails the first time only (the caller's retry then passes),
  so a test can check criv's own undo without restarting it.

Unset (production), :func:`hit` returns at its first test: no parsing, no lookups. An
unknown point or action in the variable stops criv at start: a typo must not make a
fault test pass without its fault. The points are listed in docs/operations.md.
"""

from __future__ import annotations

import logging
import os
import signal

from criv.errors import Internal

log = logging.getLogger("criv.failpoints")

ENV = "CRIV_FAILPOINTS"
ACTIONS = ("kill", "error", "error-once")

# Every point, in the order its operation reaches it.
POINTS = (
    # RunPodSandbox (criv/sandbox/pods.py)
    "run_pod.after_record",  # PENDING record written, nothing else
    "run_pod.after_cni_add",  # netns and CNI ADD done, not yet in the record
    "run_pod.after_network",  # ADD result recorded
    "run_pod.after_boot",  # agent process / VM started, not yet in the record
    "run_pod.after_boot_recorded",  # its pid / domain recorded
    "run_pod.after_connect",  # agent answered
    "run_pod.after_setup",  # SetupSandbox done, record still PENDING
    "run_pod.after_ready",  # record READY, event watcher not started
    # the vm mode's boot (criv/sandbox/vm/isolation.py), inside run_pod.after_network..boot
    "vm_boot.after_tap",
    "vm_boot.after_backend",  # vsock backend running
    "vm_boot.after_virtiofsd",
    "vm_boot.after_domain",  # libvirt domain created, tap not yet moved to the pod netns
    # CreateContainer (criv/sandbox/containers.py)
    "create_container.after_lease",  # image lease taken, no record
    "create_container.after_record",  # CREATED record written
    "create_container.after_scratch",  # pod scratch filesystem ready
    "create_container.after_rootfs",  # overlay mounted
    "create_container.after_share",  # mounts shared with the agent, agent not asked
    "create_container.after_agent",  # the agent created it, record not refreshed
    # StartContainer
    "start_container.after_agent",  # running in the agent, record still CREATED
    "start_container.after_record",  # record RUNNING, log follower not started
    # StopPodSandbox
    "stop_pod.after_containers",  # containers stopped, agent up
    "stop_pod.after_agent",  # agent (VM) stopped, record still READY
    "stop_pod.after_record",  # record NOTREADY, network not released
    # RemovePodSandbox
    "remove_pod.after_stop",
    "remove_pod.after_containers",  # container records and files gone
    "remove_pod.after_unmount",  # pod mounts gone, record still there
    "remove_pod.after_record",  # record and state dir gone, name still reserved
)


def parse(spec: str) -> dict[str, str]:
    """``name=action,...`` -> {name: action}; ValueError names what is wrong."""
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, action = item.partition("=")
        name, action = name.strip(), action.strip()
        if not sep or name not in POINTS or action not in ACTIONS:
            raise ValueError(
                f"{ENV}: {item!r} is not POINT=ACTION with a known point "
                f"(docs/operations.md) and an action in {', '.join(ACTIONS)}"
            )
        out[name] = action
    return out


_armed: dict[str, str] = parse(os.environ.get(ENV, ""))


def hit(name: str) -> None:
    """Criv reached point ``name``: do what ``CRIV_FAILPOINTS`` says there, if anything."""
    if not _armed:
        return
    action = _armed.get(name)
    if action is None:
        return
    if action == "kill":
        log.warning("failpoint %s: killing criv (SIGKILL)", name)
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "error-once":
        del _armed[name]
    log.warning("failpoint %s: failing the step", name)
    raise Internal(f"failpoint {name}")
