"""Where a vm pod's pieces are: guest paths and vsock ports the guest image expects, and
the host paths of a pod's sockets and console log, all named from the sandbox id (so
teardown and the start-up sweep need nothing saved mid-boot)."""

from __future__ import annotations

from pathlib import Path

from criv.sandbox.isolation import PodPaths

# Where images/init mounts the 9p tag "criv" in the guest, and the agent's guest-local state.
GUEST_SHARED = "/run/criv/shared"
GUEST_AGENT_STATE = "/run/criv/agent"
CONTROL_PORT = 1024
DATA_PORT = 1025


def vsock_cid(sandbox_id: str) -> int:
    # The backend is per VM, so CIDs need not be unique host-wide; derived for debugging.
    return 3 + int(sandbox_id[:7], 16)


def vhost_socket(paths: PodPaths) -> Path:
    """The vhost-user socket QEMU connects to."""
    return paths.run / "v.sock"


def hybrid_socket(paths: PodPaths) -> Path:
    """The backend's hybrid-vsock socket; guest port P listens at ``<hybrid>.P``."""
    return paths.run / "vs"


def control_socket(paths: PodPaths) -> Path:
    return Path(f"{hybrid_socket(paths)}.{CONTROL_PORT}")


def data_socket(paths: PodPaths) -> Path:
    return Path(f"{hybrid_socket(paths)}.{DATA_PORT}")


def console_log(paths: PodPaths) -> Path:
    return paths.state / "console.log"
