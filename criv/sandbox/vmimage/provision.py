"""CreateContainer's work for a vm-image pod: the container's qcow2 overlay of its base
disk, the pod's SSH key and the container's NoCloud seed (the pod IP, gateway and routes
from the CNI result, DNS from the pod config, the hostname, the key, the user of the
``criv.dev/ssh-user`` annotation, default root)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from criv.agent import convert
from criv.errors import Unavailable
from criv.network.tap import guest_addressing
from criv.sandbox.records import PodRecord
from criv.sandbox.vmimage import machine
from criv.sandbox.vmimage.container import VmContainer, box_paths
from criv.vmimage.firmware import Firmware
from criv.vmimage.seed import Route, SeedConfig, build_seed
from criv.vmimage.sshkeys import ensure_pod_key

SSH_USER_ANNOTATION = "criv.dev/ssh-user"


@dataclass(frozen=True)
class PodIdentity:
    """What the guest is told of the pod: from its config (SetupSandbox, or the pod
    record after a criv restart)."""

    hostname: str
    dns: tuple[str, ...] = ()
    searches: tuple[str, ...] = ()

    @classmethod
    def of(cls, pod: PodRecord, config: bytes) -> PodIdentity:
        if not config:
            return cls(pod.name)
        hostname, dns, searches = convert.pod_identity(config)
        return cls(hostname or pod.name, tuple(dns), tuple(searches))


def key_dir(pod_state: Path) -> Path:
    return pod_state / "vmimage" / "ssh"


def key_comment(pod: PodRecord) -> str:
    return f"criv-{pod.id[:12]}"


def seed_config(
    pod: PodRecord, who: PodIdentity, cid: str, public_key: str, user: str
) -> SeedConfig:
    addresses, routes = guest_addressing(pod.cni_result)
    gateway = next((gw for dst, gw in routes if gw and dst.endswith("/0")), "")
    return SeedConfig(
        instance_id=f"criv-{cid[:32]}",
        hostname=who.hostname,
        addresses=tuple(addresses),
        ssh_public_key=public_key,
        user=user,
        gateway=gateway,
        routes=tuple(Route(dst, gw) for dst, gw in routes if gw and not dst.endswith("/0")),
        dns_servers=who.dns,
        dns_searches=who.searches,
    )


def pod_ip(pod: PodRecord) -> str:
    """Where the VM is reached: the pod's IPv4 address, else its IPv6 one."""
    addresses, _ = guest_addressing(pod.cni_result)
    for a in sorted(addresses, key=lambda a: ":" in a):  # IPv4 first
        return a.split("/")[0]
    raise Unavailable(f"pod {pod.id[:12]} has no IP address to reach its VM at")


async def provision(
    pod: PodRecord,
    who: PodIdentity,
    pod_state: Path,
    root: Path,
    cid: str,
    base: machine.BaseDisk,
    annotations: dict[str, str],
    firmware: Firmware,
) -> VmContainer:
    """The container, its files made (overlay, key, seed); CREATED. ``annotations``: the
    container's."""
    user = annotations.get(SSH_USER_ANNOTATION, "root")
    await asyncio.to_thread(machine.make_pod_dir, root, pod.id)
    paths = box_paths(pod_state, root, pod.id, cid)
    box = VmContainer(
        cid=cid, base=base, dir=paths.dir, overlay=paths.overlay, seed=paths.seed,
        uefi_vars=paths.uefi_vars, user=user, created_at_ns=time.time_ns(), firmware=firmware,
    )  # fmt: skip
    await asyncio.to_thread(box.dir.mkdir, mode=0o700, parents=True, exist_ok=True)
    key = await asyncio.to_thread(ensure_pod_key, key_dir(pod_state), key_comment(pod))
    await machine.make_overlay(base, box.overlay)
    await asyncio.to_thread(build_seed, seed_config(pod, who, cid, key.public_line, user), box.seed)
    await asyncio.to_thread(machine.seed_readable, box.seed)
    return box
