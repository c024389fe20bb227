"""What keeps the fuzz's requests harmless to the machine it runs on (gen.py).

A request that could succeed must not touch anything but the test's own: never the VM
handler, no low host ports, host paths only inside a scratch directory, short harmless
commands, only the test registry asked for images, and the sentinel pod and the busybox
image out of reach of every RPC that changes something.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from criv.errors import CrivError
from criv.image.reference import parse_reference
from criv_agent.api.runtime.v1 import api_pb2

# What a container or exec may run: harmless whatever the arguments' order.
SAFE_COMMANDS = [
    ["true"], ["echo", "fuzz"], ["sh", "-c", "exit 3"], ["cat", "/etc/hostname"],
    ["ls", "/"], ["id"], ["/nonexistent"], ["sleep", "0"], [""], ["\x00"], ["a\x00b"],
    ["日本語"], ["x" * 5000],
]  # fmt: skip
# A container that exits promptly on SIGTERM (as PID 1 it ignores a signal it does not
# trap): every long-running container the fuzz makes runs this, so a StopContainer with a
# huge grace period still returns at once.
TERM_TRAP = ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]

ID_FIELDS = {"pod_sandbox_id", "container_id", "id", "target_id"}
# RPCs that change nothing (or refuse a running container): the sentinel's ids may go there.
READ_ONLY = {
    "Version", "Status", "RuntimeConfig", "PodSandboxStatus", "ListPodSandbox",
    "ContainerStatus", "ListContainers", "ContainerStats", "ListContainerStats",
    "PodSandboxStats", "ListPodSandboxStats", "ExecSync", "Exec", "Attach", "PortForward",
    "ReopenContainerLog", "StartContainer", "ListImages", "ImageStatus", "ImageFsInfo",
    "ListMetricDescriptors", "ListPodSandboxMetrics",
}  # fmt: skip


@dataclass
class Pools:
    """Real ids and names the generator mixes in (kept current by the test)."""

    sentinel_pod: str
    sentinel_ctr: str
    victim_pods: list[str] = field(default_factory=list)
    victim_ctrs: list[str] = field(default_factory=list)
    image: str = ""  # the busybox reference (pullable, never removed)
    image_id: str = ""
    image_digests: list[str] = field(default_factory=list)
    registry_host: str = ""
    scratch: str = ""  # the only host directory a fuzzed mount may name
    log_dir: str = ""  # where fuzzed pods keep their logs

    def protected(self, value: str) -> bool:
        """Would ``value``, as an id or id prefix, reach the sentinel pod or container?"""
        return bool(value) and (
            self.sentinel_pod.startswith(value) or self.sentinel_ctr.startswith(value)
        )


class Harmless:
    def __init__(self, pools: Pools) -> None:
        self.pools = pools

    def sanitize(self, rpc: str, msg: Message, rng: random.Random) -> None:
        if rpc not in READ_ONLY:
            self._unprotect(msg, rng)
        if isinstance(msg, api_pb2.RunPodSandboxRequest):
            if msg.runtime_handler not in ("", "host") and rng.random() < 0.5:
                msg.runtime_handler = "host"
            if msg.runtime_handler == "vm":  # never boot a VM here
                msg.runtime_handler = "no-such-handler"
            self._pod_config(msg.config)
        elif isinstance(msg, api_pb2.CreateContainerRequest):
            self._container_config(msg.config, rng)
            self._pod_config(msg.sandbox_config)
        elif isinstance(msg, api_pb2.ExecSyncRequest | api_pb2.ExecRequest):
            if msg.cmd and list(msg.cmd) not in SAFE_COMMANDS:
                del msg.cmd[:]
                msg.cmd.extend(rng.choice(SAFE_COMMANDS))
        elif isinstance(msg, api_pb2.PullImageRequest | api_pb2.RemoveImageRequest):
            msg.image.image = self._image_ref(msg.image.image, remove=rpc == "RemoveImage")
            if isinstance(msg, api_pb2.PullImageRequest):
                self._pod_config(msg.sandbox_config)

    def _unprotect(self, msg: Message, rng: random.Random, depth: int = 0) -> None:
        for f in msg.DESCRIPTOR.fields:
            if f.is_repeated:
                continue
            if f.type == FieldDescriptor.TYPE_STRING and f.name in ID_FIELDS:
                if self.pools.protected(getattr(msg, f.name)):
                    setattr(msg, f.name, rng.choice(self.pools.victim_ctrs or ["gone"]))
            elif f.type == FieldDescriptor.TYPE_MESSAGE and depth < 3 and msg.HasField(f.name):
                self._unprotect(getattr(msg, f.name), rng, depth + 1)

    def _pod_config(self, cfg: api_pb2.PodSandboxConfig) -> None:
        if cfg.log_directory.startswith("/") and "\x00" not in cfg.log_directory:
            cfg.log_directory = f"{self.pools.log_dir}/{cfg.log_directory.strip('/')[:100]}"
        for pm in cfg.port_mappings:
            if 0 < pm.host_port < 40000:  # no rule may take a real service's port
                pm.host_port = 40000 + pm.host_port % 1000
        cfg.linux.ClearField("sysctls")  # host-network pods would change the host's
        if cfg.linux.cgroup_parent.startswith("/") or cfg.linux.cgroup_parent.endswith(".slice"):
            cfg.linux.cgroup_parent = ""

    def _container_config(self, cfg: api_pb2.ContainerConfig, rng: random.Random) -> None:
        if cfg.command or cfg.args:
            cmd = list(cfg.command) + list(cfg.args)
            if cmd not in SAFE_COMMANDS and cmd != TERM_TRAP:
                del cfg.command[:], cfg.args[:]
                cfg.command.extend(rng.choice([*SAFE_COMMANDS, TERM_TRAP]))
        for m in cfg.mounts:
            if m.host_path.startswith("/") and "\x00" not in m.host_path:
                m.host_path = self.pools.scratch
        for d in cfg.devices:
            if d.host_path.startswith("/") and "\x00" not in d.host_path:
                d.host_path = "/dev/null"
        sc = cfg.linux.security_context
        # a profile is read from the host: never a device or a FIFO
        if sc.seccomp.localhost_ref.startswith("/"):
            sc.seccomp.localhost_ref = f"{self.pools.scratch}/no-such-profile.json"
        cfg.linux.resources.ClearField("unified")

    def _image_ref(self, ref: str, remove: bool) -> str:
        p = self.pools
        if remove and self._is_busybox(ref):
            return "no-such-image-to-remove"
        try:
            named = parse_reference(ref)
        except CrivError:
            return ref  # refused before any registry is asked
        except Exception:
            return ref
        if named.domain != p.registry_host:
            # only the test's registry may be asked; a name elsewhere goes there instead
            return f"{p.registry_host}/{named.path}:{named.tag or 'latest'}"
        return ref

    def _is_busybox(self, ref: str) -> bool:
        p = self.pools
        s = ref.strip()
        if not s:
            return False
        hexpart = s.removeprefix("sha256:")
        if hexpart and p.image_id.removeprefix("sha256:").startswith(hexpart):
            return True
        if any(d.split("@")[-1] in s for d in p.image_digests):
            return True
        try:
            return str(parse_reference(s)) == str(parse_reference(p.image))
        except Exception:
            return False
