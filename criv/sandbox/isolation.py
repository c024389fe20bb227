"""Isolation modes: what runs a pod's agent, behind one protocol.

``host`` (:mod:`.host`) runs criv-agent as a host process inside the pod's network
namespace; ``vm`` (:mod:`.vm`) boots a libvirt domain whose guest runs the same agent. The
sandbox layer only ever calls the :class:`Isolation` methods, so a mode is one class:

- ``boot``: start the agent for a new pod; returns the mode's typed state, the facts
  needed to find it again (:mod:`.isostate`, persisted as ``isolation_state``);
- ``connect``: an :class:`AgentClient` for a booted pod (fresh or re-adopted after a
  criv restart), once the agent answers Health;
- ``alive``: is the pod's agent (process / domain) still there?
- ``stop``: ask the agent to shut down, wait for it to go;
- ``destroy``: force: kill whatever is left and release the mode's resources;
- ``agent_path`` / ``data_endpoint``: how the agent sees a host path, and where criv
  opens data connections (log streams);
- ``share``: make a container's host path (rootfs, volume) reachable by the agent,
  read-only if asked, and return the agent's path for it (vm: a bind mount into the
  pod's share, :mod:`criv.sandbox.vm.share`); ``unshare`` undoes a container's shares;
- ``pod_files_dir``: where the agent keeps the pod's hostname/hosts/resolv.conf/shm
  ("": a place of its own, guest-local for vm pods);
- ``check_image``: CreateContainer's check of the image (vm-image: it must carry a disk;
  one container per pod);
- ``guest_network``: the network SetupSandbox hands the agent (vm: from the CNI result);
- ``guest_identity``: what the guest takes on at SetupSandbox (vm: clock, entropy,
  machine-id, and the wait for a hot-plugged share and NIC of a VM cloned from a template);
- ``containers_die_with_agent``: a lost agent means lost containers (vm: the VM is gone);
- ``sweep`` / ``close``: start-up garbage collection, and letting go at criv stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from criv.agent.client import AgentClient
from criv.agent.types import GuestIdentity, GuestNetwork
from criv.sandbox.isostate import IsolationState
from criv.sandbox.records import MountRecord, PodRecord


@dataclass(frozen=True)
class PodPaths:
    """Where a pod's files live on the host.

    ``state`` (under the state dir) holds the record, containers and agent state;
    ``run`` (under the run dir, short: unix socket paths are limited to 107 bytes)
    holds the agent's sockets.
    """

    state: Path
    run: Path

    @property
    def record(self) -> Path:
        return self.state / "sandbox.json"

    @property
    def agent_state(self) -> Path:
        return self.state / "agent"

    @property
    def shared(self) -> Path:
        """What a vm pod's guest sees (9p export): a read-only view of ``share_tree``."""
        return self.state / "shared"

    @property
    def share_tree(self) -> Path:
        """Host-only: where criv builds the per-container entries the guest sees."""
        return self.state / "mounts"

    @property
    def share_stage(self) -> Path:
        """Host-only: where a bind gets its flags before it enters ``share_tree``."""
        return self.state / "stage"

    @property
    def agent_log(self) -> Path:
        return self.state / "agent.log"

    @property
    def containers(self) -> Path:
        return self.state / "containers"

    @property
    def control_socket(self) -> Path:
        return self.run / "c.sock"

    @property
    def data_socket(self) -> Path:
        return self.run / "d.sock"


class Isolation(Protocol):
    mode: str
    containers_die_with_agent: bool

    async def prepare(self, pod: PodRecord, paths: PodPaths) -> None:
        """Boot work that needs no pod network; runs alongside CNI ADD, before ``boot``.
        What it leaves after a failure, ``destroy`` undoes."""
        ...

    async def boot(self, pod: PodRecord, paths: PodPaths) -> IsolationState: ...

    async def connect(self, pod: PodRecord, paths: PodPaths, timeout: float) -> AgentClient: ...

    async def alive(self, pod: PodRecord) -> bool: ...

    async def stop(
        self, pod: PodRecord, paths: PodPaths, client: AgentClient | None, timeout: int
    ) -> None: ...

    async def destroy(self, pod: PodRecord, paths: PodPaths) -> None: ...

    async def forget(self, pod: PodRecord, paths: PodPaths) -> None:
        """RemovePodSandbox, after the pod is stopped and before its record goes: drop what
        a stopped pod keeps for inspection outside its own directories."""
        ...

    def agent_path(self, paths: PodPaths, host_path: Path) -> str: ...

    def data_endpoint(self, paths: PodPaths) -> str: ...

    async def share(self, paths: PodPaths, cid: str, mount: MountRecord, name: str) -> str: ...

    def pod_files_dir(self, paths: PodPaths) -> str: ...

    async def check_image(
        self, pod: PodRecord, paths: PodPaths, cid: str, image_id: str, layer_dirs: list[Path]
    ) -> None:
        """CreateContainer, once the image is leased and before anything is made: refuse
        an image the mode cannot run (vm-image: no disk; a second container)."""
        ...

    async def unshare(self, paths: PodPaths, cid: str) -> None: ...

    def guest_network(self, pod: PodRecord) -> GuestNetwork | None: ...

    def guest_identity(self, pod: PodRecord) -> GuestIdentity | None: ...

    async def sweep(self, pods: list[PodRecord]) -> None: ...

    async def close(self) -> None: ...
