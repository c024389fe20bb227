"""criv's configuration: typed dataclasses loaded from YAML, strictly.

Every key has a default, so a missing default file means all defaults. An unknown key,
a value of the wrong type or a bad value makes criv refuse to start with a
:class:`~criv.errors.ConfigError` naming the dotted key. Each key is documented in
docs/configuration.md; keep the two in step.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from criv.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/criv/config.yaml")

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
CgroupDriver = Literal["cgroupfs", "systemd"]
IsolationMode = Literal["vm", "host", "vm-image"]
HostPodPolicy = Literal["allow", "reject"]
HostNamespacePolicy = Literal["host", "reject"]
Accel = Literal["auto", "kvm", "tcg"]
VsockTransport = Literal["auto", "kernel", "backend"]
MachineType = Literal["q35", "microvm"]
GuestKernel = Literal["criv", "debian"]
TemplateMode = Literal["auto", "off"]


@dataclass(frozen=True)
class LogConfig:
    level: LogLevel = "info"
    format: LogFormat = "text"


@dataclass(frozen=True)
class RegistriesConfig:
    # registry host -> endpoints ("http://127.0.0.1:5000"), tried in order, then the host
    mirrors: dict[str, list[str]] = field(default_factory=dict)
    # hosts (host[:port]) where plain HTTP and unverified TLS are allowed
    insecure: list[str] = field(default_factory=list)
    # docker-style config.json with "auths"; empty means none
    auth_file: str = ""

    def validate(self, key: str) -> None:
        for host, endpoints in self.mirrors.items():
            for i, ep in enumerate(endpoints):
                if not (ep.startswith("http://") or ep.startswith("https://")):
                    raise ConfigError(
                        f"{key}.mirrors.{host}[{i}]",
                        f"{ep!r} must start with http:// or https://",
                    )


@dataclass(frozen=True)
class ImageLimitsConfig:
    """Bounds on what a registry or an image may make criv hold, download or write.

    Untrusted registries and layers must not exhaust the daemon's memory or the host's
    disk; the defaults are far above any real image (see docs/configuration.md).
    """

    # layers in one manifest (overlayfs stacks at most ~500 lowerdirs; Docker caps at 127)
    max_layers: int = 128
    # bytes of one layer once decompressed (tar stream plus sparse-file holes), MiB
    max_layer_size_mib: int = 65536
    # the same, summed over every layer of one image, MiB
    max_image_size_mib: int = 131072
    # the size a descriptor may declare for any blob (a compressed layer), MiB
    max_blob_size_mib: int = 65536
    # tar entries in one layer
    max_entries_per_layer: int = 2_000_000
    # one tar header body (GNU long name / long link, pax, global pax), KiB
    max_header_kib: int = 1024
    # a manifest or an index, KiB
    max_manifest_kib: int = 4096
    # an image config, KiB
    max_config_kib: int = 16384

    def validate(self, key: str) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 1:
                raise ConfigError(f"{key}.{f.name}", "must be >= 1")
        if self.max_image_size_mib < self.max_layer_size_mib:
            raise ConfigError(
                f"{key}.max_image_size_mib", "must be >= image_limits.max_layer_size_mib"
            )

    @property
    def max_layer_bytes(self) -> int:
        return self.max_layer_size_mib << 20

    @property
    def max_image_bytes(self) -> int:
        return self.max_image_size_mib << 20

    @property
    def max_blob_bytes(self) -> int:
        return self.max_blob_size_mib << 20

    @property
    def max_header_bytes(self) -> int:
        return self.max_header_kib << 10

    @property
    def max_manifest_bytes(self) -> int:
        return self.max_manifest_kib << 10

    @property
    def max_config_bytes(self) -> int:
        return self.max_config_kib << 10


@dataclass(frozen=True)
class CniConfig:
    conf_dir: str = "/etc/cni/net.d"
    bin_dirs: list[str] = field(default_factory=lambda: ["/usr/lib/cni", "/opt/cni/bin"])
    # a plugin (ADD, DEL, CHECK) that runs longer is killed and the step fails
    plugin_timeout_seconds: int = 60

    def validate(self, key: str) -> None:
        if self.plugin_timeout_seconds < 1:
            raise ConfigError(f"{key}.plugin_timeout_seconds", "must be >= 1")


# runtime.host_namespace_pods left unset: a value the YAML cannot give (not in the Literal)
_FOLLOWS_HOST_PODS = typing.cast(HostNamespacePolicy, "")


@dataclass(frozen=True)
class RuntimeConfig:
    # CRI runtime handler name -> isolation mode; "" is the default handler
    handlers: dict[str, IsolationMode] = field(
        default_factory=lambda: {"": "vm", "vm": "vm", "host": "host"}
    )
    # whether pods may run in `host` isolation at all
    host_pods: HostPodPolicy = "allow"
    # a pod asking for host namespaces (network/pid/ipc NODE) under the default handler
    # "" mapped to `vm`: run it in `host` isolation or refuse it. Unset: `host` when
    # host_pods is allow, else `reject` (resolved in __post_init__)
    host_namespace_pods: HostNamespacePolicy = _FOLLOWS_HOST_PODS
    crun: str = "crun"
    # each pod's container writable layers live in a filesystem of this size (MiB), so
    # a pod cannot fill the host's state filesystem; 0 = off (layers on the state fs)
    pod_scratch_limit_mib: int = 10240

    def __post_init__(self) -> None:
        if self.host_namespace_pods not in ("host", "reject"):
            default = "host" if self.host_pods == "allow" else "reject"
            object.__setattr__(self, "host_namespace_pods", default)

    def validate(self, key: str) -> None:
        if "" not in self.handlers:
            raise ConfigError(f"{key}.handlers", 'must map the default handler ""')
        if self.host_namespace_pods == "host" and self.host_pods == "reject":
            raise ConfigError(
                f"{key}.host_namespace_pods",
                "host runs pods in host isolation, which host_pods: reject forbids; "
                "set host_namespace_pods: reject or host_pods: allow",
            )
        if self.pod_scratch_limit_mib != 0 and self.pod_scratch_limit_mib < 64:
            raise ConfigError(f"{key}.pod_scratch_limit_mib", "must be 0 (off) or >= 64")


@dataclass(frozen=True)
class VmConfig:
    vcpus: int = 1
    memory_mib: int = 256
    # most vCPUs a pod VM may get live (UpdatePodSandboxResources): 0 = the host's CPU
    # count, at most 16; up to 64 (the guest kernel's NR_CPUS)
    max_vcpus: int = 0
    # most memory a pod VM may get live (UpdatePodSandboxResources, the balloon): 0 = the
    # memory it boots with (it can shrink and grow back); above that the VM boots with this
    # much and the balloon holds the rest back (the guest sizes its page tables for it)
    max_memory_mib: int = 0
    # the balloon's free page reporting: pages the guest frees go back to the host
    free_page_reporting: bool = True
    accel: Accel = "auto"
    vsock: VsockTransport = "auto"
    machine: MachineType = "q35"
    libvirt_uri: str = "qemu:///system"
    # which kernel `criv image build` puts in the guest image
    guest_kernel: GuestKernel = "criv"
    # "" means <state_dir>/cache/guest-image
    guest_image_cache: str = ""
    # explicit kernel/initramfs instead of the built guest image (both or neither)
    kernel: str = ""
    initrd: str = ""
    # with them: the guest root's read-only disk image (a built image's root.erofs, mounted
    # by its initramfs); "" means the root is in the initramfs
    root_disk: str = ""
    # the root disk as a read-only virtio-pmem device mapped with DAX: every VM maps its
    # pages from the host's page cache (one copy for all) instead of copying what it reads
    # into its own RAM; false: a read-only virtio disk (no page mapped into two VMs)
    root_dax: bool = True
    # under TCG only: the agent's helpers (crun, ip) run without ASLR, so QEMU translates
    # their code once per VM, not once per run; containers keep ASLR (docs/security.md)
    fixed_helper_layout: bool = True
    # a libvirt call that does not answer within this releases its caller (UNAVAILABLE)
    libvirt_call_timeout_seconds: int = 60
    # vm-image pods: how long after a VM's start the first exec waits for its SSH host
    # key on the console and its SSH server (then UNAVAILABLE with the console tail)
    image_ssh_wait_seconds: int = 120
    # vm-image pods whose disk needs UEFI boot with OVMF (Debian's ovmf package): its
    # code (mapped read-only) and the variable store each VM gets a copy of
    uefi_code: str = "/usr/share/OVMF/OVMF_CODE_4M.fd"
    uefi_vars: str = "/usr/share/OVMF/OVMF_VARS_4M.fd"
    # templates (docs/vm.md): "auto" starts each pod VM as a clone of a saved VM of its
    # guest image and shape, built in the background after the first cold boot; "off"
    # boots every pod VM cold
    template: TemplateMode = "auto"
    # where templates are kept (guest RAM + device state, ~100 MiB each): "" means
    # <run_dir>/templates (tmpfs on most hosts)
    template_dir: str = ""
    # clones of the last templated pod's shape kept started, loaded and running idle for the
    # next pods (docs/vm.md, Spare VMs): each holds its guest RAM (~100 MiB); 0: none
    spare_vms: int = 1

    def validate(self, key: str) -> None:
        if self.libvirt_call_timeout_seconds < 1:
            raise ConfigError(f"{key}.libvirt_call_timeout_seconds", "must be >= 1")
        if self.image_ssh_wait_seconds < 1:
            raise ConfigError(f"{key}.image_ssh_wait_seconds", "must be >= 1")
        for k in ("uefi_code", "uefi_vars"):
            if not getattr(self, k).startswith("/"):
                raise ConfigError(f"{key}.{k}", "must be an absolute path")
        if bool(self.kernel) != bool(self.initrd):
            raise ConfigError(f"{key}.kernel", "kernel and initrd go together")
        if self.root_disk and not self.kernel:
            raise ConfigError(f"{key}.root_disk", "goes with kernel and initrd")
        if self.root_disk and not self.root_disk.startswith("/"):
            raise ConfigError(f"{key}.root_disk", "must be an absolute path")
        if self.vcpus < 1:
            raise ConfigError(f"{key}.vcpus", "must be >= 1")
        if self.memory_mib < 64:
            raise ConfigError(f"{key}.memory_mib", "must be >= 64")
        if self.max_memory_mib != 0 and not 64 <= self.max_memory_mib <= 64 * 1024:
            raise ConfigError(f"{key}.max_memory_mib", "must be 0 (the boot size) or 64..65536")
        if not 0 <= self.max_vcpus <= 64:
            raise ConfigError(f"{key}.max_vcpus", "must be 0 (host CPUs, at most 16) .. 64")
        if not 0 <= self.spare_vms <= 8:
            raise ConfigError(f"{key}.spare_vms", "must be 0..8")


@dataclass(frozen=True)
class StreamingConfig:
    address: str = "127.0.0.1"
    port: int = 0
    tls_cert: str = ""
    tls_key: str = ""
    # How long an exec/attach/port-forward URL stays valid. Lowering it is allowed (tests
    # use 1 s to see expiry); raising it beyond kubelet's one minute is not.
    token_ttl_seconds: int = 60
    # The port is on the node network and reachable before any token is checked, so
    # every resource a peer can make the server hold is capped (docs/streaming.md).
    max_connections: int = 256
    max_connections_per_peer: int = 64  # kubelet is one peer: this caps the node's sessions
    header_timeout_seconds: int = 10  # request line + headers must arrive within this
    idle_timeout_seconds: int = 4 * 3600  # kubelet's default; no stream data that long: closed
    max_streams_per_connection: int = 512
    max_port_forward_pairs: int = 128  # concurrent forwarded connections per session
    stream_buffer_kib: int = 1024  # client data held per stream before reading pauses
    connection_buffer_kib: int = 8192  # the same, all streams of a connection together

    def validate(self, key: str) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"{key}.port", "must be 0..65535")
        if not 1 <= self.token_ttl_seconds <= 60:
            raise ConfigError(f"{key}.token_ttl_seconds", "must be 1..60")
        if self.max_connections < 1:
            raise ConfigError(f"{key}.max_connections", "must be at least 1")
        if not 1 <= self.max_connections_per_peer <= self.max_connections:
            raise ConfigError(f"{key}.max_connections_per_peer", "must be 1..max_connections")
        if not 1 <= self.header_timeout_seconds <= 300:
            raise ConfigError(f"{key}.header_timeout_seconds", "must be 1..300")
        if self.idle_timeout_seconds < 0:
            raise ConfigError(f"{key}.idle_timeout_seconds", "must be 0 (off) or more")
        if self.max_streams_per_connection < 5:  # exec/attach open up to 5 streams
            raise ConfigError(f"{key}.max_streams_per_connection", "must be at least 5")
        if self.max_port_forward_pairs < 1:
            raise ConfigError(f"{key}.max_port_forward_pairs", "must be at least 1")
        if self.stream_buffer_kib < 64:
            raise ConfigError(f"{key}.stream_buffer_kib", "must be at least 64")
        if self.connection_buffer_kib < self.stream_buffer_kib:
            raise ConfigError(f"{key}.connection_buffer_kib", "must be at least stream_buffer_kib")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError(f"{key}.tls_cert", "tls_cert and tls_key go together")


@dataclass(frozen=True)
class MetricsConfig:
    # HOST:PORT of the Prometheus endpoint (/metrics); "" means off
    address: str = ""

    def validate(self, key: str) -> None:
        if self.address:
            from criv.metrics import parse_address  # only when metrics are asked for

            try:
                parse_address(self.address)
            except ValueError as e:
                raise ConfigError(f"{key}.address", str(e)) from None


@dataclass(frozen=True)
class TimeoutsConfig:
    # host command deadlines in seconds by program name ("umount", "crun", ...; "default"
    # for the rest), over criv.commands.DEFAULT_TIMEOUTS
    commands: dict[str, int] = field(default_factory=dict)

    def validate(self, key: str) -> None:
        for name, seconds in self.commands.items():
            if seconds < 1:
                raise ConfigError(f"{key}.commands.{name}", "must be >= 1")


@dataclass(frozen=True)
class Config:
    socket: str = "/run/criv/criv.sock"
    state_dir: str = "/var/lib/criv"
    run_dir: str = "/run/criv"
    cgroup_driver: CgroupDriver = "cgroupfs"
    log: LogConfig = field(default_factory=LogConfig)
    registries: RegistriesConfig = field(default_factory=RegistriesConfig)
    image_limits: ImageLimitsConfig = field(default_factory=ImageLimitsConfig)
    cni: CniConfig = field(default_factory=CniConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    vm: VmConfig = field(default_factory=VmConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)

    def validate(self, key: str) -> None:
        paths = {"socket": self.socket_path, "state_dir": Path(self.state_dir)}
        paths["run_dir"] = Path(self.run_dir)
        for name, path in paths.items():
            if not path.is_absolute():
                raise ConfigError(name, "must be an absolute path")

    def public_dict(self) -> dict[str, Any]:
        """The effective configuration, for Status verbose info and `criv config`."""
        return dataclasses.asdict(self)

    @property
    def socket_path(self) -> Path:
        return Path(self.socket.removeprefix("unix://"))


T = TypeVar("T")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; recurse into dataclasses."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(key or "<root>", f"must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(key, f"{value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a list, got {type(value).__name__}")
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a mapping, got {type(value).__name__}")
        return {
            _convert(k, key_tp, f"{key}.{k}"): _convert(v, val_tp, f"{key}.{k}")
            for k, v in value.items()
        }
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported union annotation at {key}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {key}")


def _build(cls: type[T], data: dict[str, Any], prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise ConfigError(where, "unknown key")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(prefix)
    return obj


def parse_config(text: str) -> Config:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError("<file>", f"not valid YAML: {e}") from e
    if data is None:
        data = {}
    result: Config = _convert(data, Config, "")
    return result


def load_config(path: Path | None) -> Config:
    """Load ``path``; ``None`` means the default file, which may be missing."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return Config()
        path = DEFAULT_CONFIG_PATH
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError("<file>", f"cannot read {path}: {e.strerror}") from e
    return parse_config(text)
