"""CRI requests are checked at the edge (criv/cri/validate.py): what kubelet sends
passes; each bad field is refused with INVALID_ARGUMENT naming it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from criv.cri import validate
from criv.cri.runtime_service import RuntimeService
from criv.errors import MAX_MESSAGE_BYTES, InvalidArgument, NotFound
from criv_agent.api.runtime.v1 import api_pb2

UID = "6f1a9d4e-3b7c-4f0e-9a51-2c8d7e6b5a40"


def kubelet_pod() -> api_pb2.RunPodSandboxRequest:
    """A RunPodSandbox as kubelet sends it (both cgroup drivers' parents occur)."""
    cfg = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name="web-7d4b9c-x2x", namespace="default", uid=UID),
        hostname="web-7d4b9c-x2x",
        log_directory=f"/var/log/pods/default_web-7d4b9c-x2x_{UID}",
        dns_config=api_pb2.DNSConfig(
            servers=["10.96.0.10", "fd00::a"],
            searches=["default.svc.cluster.local", "svc.cluster.local"],
            options=["ndots:5"],
        ),
        port_mappings=[
            api_pb2.PortMapping(protocol=api_pb2.TCP, container_port=80, host_port=8080),
            api_pb2.PortMapping(protocol=api_pb2.UDP, container_port=53, host_ip="127.0.0.1"),
        ],
        labels={"io.kubernetes.pod.name": "web"},
        annotations={"kubernetes.io/config.seen": "2024-01-01T00:00:00Z"},
    )
    linux = cfg.linux
    linux.cgroup_parent = "/kubepods/burstable/pod" + UID
    linux.sysctls["net.ipv4.ip_unprivileged_port_start"] = "0"
    linux.sysctls["net/ipv4/ping_group_range"] = "0 2147483647"
    linux.security_context.run_as_user.value = 1000
    linux.security_context.supplemental_groups.extend([1000, 2000])
    linux.security_context.seccomp.profile_type = api_pb2.SecurityProfile.RuntimeDefault
    linux.resources.cpu_period = 100000
    linux.resources.cpu_quota = 50000
    linux.resources.memory_limit_in_bytes = 256 << 20
    linux.overhead.cpu_shares = 25
    linux.overhead.memory_limit_in_bytes = 1 << 20  # an addition: no minimum
    return api_pb2.RunPodSandboxRequest(config=cfg)


def kubelet_container() -> api_pb2.CreateContainerRequest:
    cfg = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="app", attempt=2),
        image=api_pb2.ImageSpec(image="docker.io/library/nginx:1.25"),
        command=["nginx"],
        args=["-g", "daemon off;"],
        working_dir="/srv",
        envs=[api_pb2.KeyValue(key="KUBERNETES_PORT", value=b"tcp://10.96.0.1:443")],
        mounts=[
            api_pb2.Mount(
                container_path="/var/run/secrets/kubernetes.io/serviceaccount",
                host_path="/var/lib/kubelet/pods/x/volumes/kubernetes.io~projected/kube-api",
                readonly=True,
                propagation=api_pb2.PROPAGATION_PRIVATE,
            )
        ],
        devices=[
            api_pb2.Device(container_path="/dev/fuse", host_path="/dev/fuse", permissions="rw")
        ],
        log_path="app/2.log",
    )
    r = cfg.linux.resources
    r.cpu_shares, r.cpu_quota, r.cpu_period = 102, -1, 100000
    r.memory_limit_in_bytes = r.memory_swap_limit_in_bytes = 128 << 20
    r.oom_score_adj = 999
    r.cpuset_cpus, r.cpuset_mems = "0-3,6", "0"
    r.hugepage_limits.add(page_size="2MB", limit=0)
    r.unified["memory.high"] = "100000000"
    sc = cfg.linux.security_context
    sc.capabilities.add_capabilities.append("NET_ADMIN")
    sc.capabilities.drop_capabilities.append("ALL")
    sc.run_as_group.value = 0
    sc.masked_paths.append("/proc/kcore")
    sc.seccomp.profile_type = api_pb2.SecurityProfile.Localhost
    sc.seccomp.localhost_ref = "/var/lib/kubelet/seccomp/audit.json"
    sc.apparmor.profile_type = api_pb2.SecurityProfile.Localhost
    sc.apparmor.localhost_ref = "k8s-apparmor-example-deny-write"
    sc.namespace_options.pid = api_pb2.CONTAINER
    return api_pb2.CreateContainerRequest(
        pod_sandbox_id="a" * 64, config=cfg, sandbox_config=kubelet_pod().config
    )


def test_what_kubelet_sends_passes() -> None:
    validate.check(kubelet_pod())
    validate.check(kubelet_container())
    # hostUsers: false, as kubelet sends it (the same mappings to the pod and each container)
    pod, ctr = kubelet_pod(), kubelet_container()
    _userns(pod.config.linux.security_context)
    _userns(ctr.config.linux.security_context)
    validate.check(pod)
    validate.check(ctr)


def _userns(
    sc: api_pb2.LinuxSandboxSecurityContext | api_pb2.LinuxContainerSecurityContext,
    mode: int = api_pb2.POD,
    gids: list[api_pb2.IDMapping] | None = None,
    length: int = 65536,
    host: int = 65536 * 10,
    overlap: str = "",
) -> None:
    u = sc.namespace_options.userns_options
    u.mode = mode  # type: ignore[assignment]
    u.uids.add(container_id=0, host_id=host, length=length)
    if overlap:  # a second range overlapping the first on one side
        cid = 100 if overlap == "container" else 70000
        u.uids.add(container_id=cid, host_id=host + 100 if overlap == "host" else 1, length=10)
    u.gids.extend(
        [api_pb2.IDMapping(container_id=0, host_id=host, length=length)] if gids is None else gids
    )
    slice_pod = kubelet_pod()
    slice_pod.config.linux.cgroup_parent = "kubepods-burstable-pod1234.slice"
    slice_pod.config.hostname = "Node-1.example.com"  # host network: the node's name
    validate.check(slice_pod)
    validate.check(api_pb2.ExecSyncRequest(container_id="c", cmd=["sh"], timeout=0))
    validate.check(
        api_pb2.UpdateRuntimeConfigRequest(
            runtime_config=api_pb2.RuntimeConfig(
                network_config=api_pb2.NetworkConfig(pod_cidr="10.244.0.0/24,fd00:10::/64")
            )
        )
    )


def _set(msg: Any, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        msg = msg[int(part)] if part.isdigit() else getattr(msg, part)
    if last.isdigit():
        msg[int(last)] = value
    else:
        setattr(msg, last, value)


def _pod(edit: Callable[[api_pb2.PodSandboxConfig], Any]) -> api_pb2.RunPodSandboxRequest:
    req = kubelet_pod()
    edit(req.config)
    return req


def _ctr(edit: Callable[[api_pb2.ContainerConfig], Any]) -> api_pb2.CreateContainerRequest:
    req = kubelet_container()
    edit(req.config)
    return req


def pod(dotted: str, value: Any) -> api_pb2.RunPodSandboxRequest:
    """kubelet's pod with the field at ``dotted`` (under config) set to ``value``."""
    return _pod(lambda c: _set(c, dotted, value))


def ctr(dotted: str, value: Any) -> api_pb2.CreateContainerRequest:
    return _ctr(lambda c: _set(c, dotted, value))


SC = "linux.security_context"
RES = "linux.resources"
NS = f"{SC}.namespace_options"

BAD = [
    # RunPodSandbox
    (api_pb2.RunPodSandboxRequest(), "config:"),
    (pod("metadata.name", ""), "config.metadata.name:"),
    (pod("metadata.namespace", ""), "config.metadata.namespace:"),
    (pod("metadata.uid", ""), "config.metadata.uid:"),
    (pod("metadata.name", "a;b=c"), "config.metadata.name:"),
    (pod("metadata.namespace", "a b"), "config.metadata.namespace:"),
    (pod("hostname", "a/b"), "config.hostname:"),
    (pod("hostname", "-a"), "config.hostname:"),
    (pod("hostname", "a." * 33), "config.hostname:"),
    (pod("hostname", "x\nhost"), "config.hostname:"),
    (pod("hostname", "host\n"), "config.hostname:"),  # a trailing newline too
    (pod("log_directory", "logs"), "config.log_directory:"),
    (_pod(lambda c: c.dns_config.servers.append("dns")), "config.dns_config.servers[2]:"),
    (_pod(lambda c: c.dns_config.searches.append("a\nb")), "config.dns_config.searches[2]:"),
    (_pod(lambda c: c.dns_config.options.append("")), "config.dns_config.options[1]:"),
    (pod("port_mappings.0.container_port", 0), "port_mappings[0].container_port"),
    (pod("port_mappings.1.container_port", -1), "port_mappings[1].container_port"),
    (pod("port_mappings.0.container_port", 65536), "port_mappings[0].container_port"),
    (pod("port_mappings.0.host_port", -1), "port_mappings[0].host_port"),
    (pod("port_mappings.0.host_port", 65536), "port_mappings[0].host_port"),
    (pod("port_mappings.0.protocol", 7), "port_mappings[0].protocol"),
    (pod("port_mappings.0.host_ip", "x"), "port_mappings[0].host_ip"),
    (pod("linux.cgroup_parent", "kubepods"), "config.linux.cgroup_parent:"),
    (pod("linux.cgroup_parent", "/a/../../b"), "config.linux.cgroup_parent:"),
    (pod("linux.cgroup_parent", "/kubepods\n/pod1"), "config.linux.cgroup_parent:"),
    (pod("linux.cgroup_parent", "kube\tpods.slice"), "config.linux.cgroup_parent:"),
    (_pod(lambda c: c.linux.sysctls.update({"../../x": "1"})), "config.linux.sysctls:"),
    (_pod(lambda c: c.linux.sysctls.update({"kernel.x": "1\n2"})), "config.linux.sysctls["),
    (pod(f"{SC}.run_as_user.value", -1), "security_context.run_as_user:"),
    (_pod(lambda c: c.linux.security_context.supplemental_groups.append(2**32)), "groups[2]:"),
    (pod(f"{NS}.network", 9), "namespace_options.network:"),
    (pod(f"{NS}.pid", api_pb2.TARGET), "namespace_options.target_id:"),
    (pod(f"{NS}.userns_options.mode", api_pb2.POD), "userns_options.uids:"),
    (_pod(lambda c: _userns(c.linux.security_context, mode=api_pb2.CONTAINER)), "ns.mode:"),
    (_pod(lambda c: _userns(c.linux.security_context, gids=[])), "userns_options.gids:"),
    (_pod(lambda c: _userns(c.linux.security_context, length=0)), "uids[0].length:"),
    (_pod(lambda c: _userns(c.linux.security_context, host=2**32 - 10)), "userns_options.uids[0]:"),
    (_ctr(lambda c: _userns(c.linux.security_context, overlap="container")), "uids[1]: container"),
    (_ctr(lambda c: _userns(c.linux.security_context, overlap="host")), "uids[1]: host_id"),
    (pod(f"{SC}.seccomp.profile_type", 5), "seccomp.profile_type:"),
    (pod(f"{RES}.cpu_quota", 10), "config.linux.resources.cpu_quota:"),
    (pod("linux.overhead.cpu_period", 10**7), "config.linux.overhead.cpu_period:"),
    # NUL anywhere
    (_pod(lambda c: c.labels.update({"a": "b\x00"})), "config.labels['a']: contains a NUL"),
    (_pod(lambda c: c.annotations.update({"a\x00": "b"})), "config.annotations: key"),
    (pod("metadata.uid", "u\x00"), "config.metadata.uid: contains a NUL"),
    (_ctr(lambda c: c.args.append("\x00")), "config.args[2]: contains a NUL"),
    (api_pb2.ExecSyncRequest(container_id="c", cmd=["a", "b\x00"]), "cmd[1]: contains a NUL"),
    (api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image="\x00")), "image.image: contains"),
    (api_pb2.ContainerStatusRequest(container_id="\x00" * 5), "container_id: contains a NUL"),
    # CreateContainer
    (api_pb2.CreateContainerRequest(config=kubelet_container().config), "pod_sandbox_id:"),
    (ctr("metadata.name", ""), "config.metadata.name:"),
    (ctr("image.image", ""), "config.image.image:"),
    (ctr("working_dir", "srv"), "config.working_dir:"),
    (_ctr(lambda c: c.envs.add(key="A=B", value=b"c")), "config.envs[1].key:"),
    (_ctr(lambda c: c.envs.add(key="", value=b"c")), "config.envs[1].key:"),
    (_ctr(lambda c: c.envs.add(key="A\nB", value=b"c")), "config.envs[1].key:"),
    (ctr("mounts.0.host_path", ""), "config.mounts[0].host_path:"),
    (ctr("mounts.0.host_path", "rel"), "config.mounts[0].host_path:"),
    (ctr("mounts.0.container_path", ""), "config.mounts[0].container_path:"),
    (ctr("mounts.0.container_path", "x"), "config.mounts[0].container_path:"),
    (ctr("mounts.0.propagation", 9), "config.mounts[0].propagation:"),
    (ctr("mounts.0.image.image", "i"), "config.mounts[0].host_path:"),  # image: no host path
    (ctr("devices.0.host_path", "fuse"), "config.devices[0].host_path:"),
    (ctr("devices.0.permissions", "rwx"), "config.devices[0].permissions:"),
    (ctr("log_path", "../../x.log"), "config.log_path:"),
    (ctr("log_path", "/a/../../x.log"), "config.log_path:"),
    (ctr("log_path", "/"), "config.log_path:"),
    (ctr("stop_signal", 1000), "config.stop_signal:"),
    (ctr(f"{RES}.cpu_shares", 1), "resources.cpu_shares:"),
    (ctr(f"{RES}.oom_score_adj", 1001), "resources.oom_score_adj:"),
    (ctr(f"{RES}.memory_limit_in_bytes", -1), "resources.memory_limit_in_bytes:"),
    (ctr(f"{RES}.memory_limit_in_bytes", 1), "resources.memory_limit_in_bytes:"),
    (pod(f"{RES}.memory_limit_in_bytes", 4096), "config.linux.resources.memory_limit_in_bytes:"),
    (pod("linux.overhead.memory_limit_in_bytes", -1), "overhead.memory_limit_in_bytes:"),
    (ctr(f"{RES}.memory_swap_limit_in_bytes", 1), "resources.memory_swap_limit_in_bytes:"),
    (ctr(f"{RES}.cpuset_cpus", "日本"), "resources.cpuset_cpus:"),
    (ctr(f"{RES}.cpuset_mems", "0,"), "resources.cpuset_mems:"),
    (ctr(f"{RES}.hugepage_limits.0.page_size", "huge"), "hugepage_limits[0].page_size:"),
    (_ctr(lambda c: c.linux.resources.unified.update({"../cgroup.procs": "1"})), "unified:"),
    (_ctr(lambda c: c.linux.security_context.masked_paths.append("proc")), "masked_paths[1]:"),
    (ctr(f"{SC}.capabilities.add_capabilities.0", "A B"), "add_capabilities[0]:"),
    (ctr(f"{SC}.seccomp.localhost_ref", "audit.json"), "seccomp.localhost_ref:"),
    (ctr(f"{SC}.apparmor.localhost_ref", ""), "apparmor.localhost_ref:"),
    (ctr(f"{SC}.run_as_group.value", 2**32 - 1), "run_as_group:"),
    (ctr(f"{SC}.supplemental_groups_policy", 7), "supplemental_groups_policy:"),
    (pod(f"{SC}.supplemental_groups_policy", 2), "supplemental_groups_policy:"),
    # others
    (api_pb2.ExecSyncRequest(container_id="c"), "cmd:"),
    (api_pb2.ExecSyncRequest(cmd=["ls"]), "container_id:"),
    (
        api_pb2.UpdateContainerResourcesRequest(
            container_id="c", linux=api_pb2.LinuxContainerResources(cpu_period=1)
        ),
        "linux.cpu_period:",
    ),
    (
        api_pb2.UpdateRuntimeConfigRequest(
            runtime_config=api_pb2.RuntimeConfig(
                network_config=api_pb2.NetworkConfig(pod_cidr="10.0.0.0/8,x")
            )
        ),
        "pod_cidr:",
    ),
    (api_pb2.PullImageRequest(), "image.image:"),
]


@pytest.mark.parametrize(("request_", "field"), BAD, ids=[f for _, f in BAD])
def test_bad_field_is_refused_by_name(request_: Any, field: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        validate.check(request_)
    assert field in exc.value.message, exc.value.message


# Checks whose regex once ended in ``$`` under ``.match``: ``$`` also matches before a
# final "\n", so "web\n" passed as a name. Each takes a good value and refuses it with a
# trailing newline, naming the field.
TRAILING_NEWLINE = [
    (lambda v: pod("metadata.name", v), "web", "config.metadata.name:"),
    (lambda v: pod("metadata.namespace", v), "default", "config.metadata.namespace:"),
    (lambda v: pod("metadata.uid", v), UID, "config.metadata.uid:"),
    (lambda v: ctr("metadata.name", v), "app", "config.metadata.name:"),
    (lambda v: pod("dns_config.searches.0", v), "cluster.local", "dns_config.searches[0]:"),
    (lambda v: pod("dns_config.options.0", v), "ndots:5", "dns_config.options[0]:"),
    # validate_linux
    (lambda v: pod("linux.cgroup_parent", v), "kubepods.slice", "config.linux.cgroup_parent:"),
    (lambda v: pod("linux.cgroup_parent", v), "/kubepods/pod1", "config.linux.cgroup_parent:"),
    (lambda v: _ctr(lambda c: c.envs.add(key=v, value=b"1")), "HOME", "config.envs[1].key:"),
    (
        lambda v: _pod(lambda c: c.linux.sysctls.update({v: "1"})),
        "kernel.shm_rmid_forced",
        "config.linux.sysctls:",
    ),
    (lambda v: ctr(f"{RES}.cpuset_cpus", v), "0-3,6", "resources.cpuset_cpus:"),
    (lambda v: ctr(f"{RES}.cpuset_mems", v), "0", "resources.cpuset_mems:"),
    (
        lambda v: ctr(f"{RES}.hugepage_limits.0.page_size", v),
        "1GB",
        "hugepage_limits[0].page_size:",
    ),
    (
        lambda v: _ctr(lambda c: c.linux.resources.unified.update({v: "1"})),
        "memory.max",
        "resources.unified:",
    ),
    (
        lambda v: ctr(f"{SC}.capabilities.add_capabilities.0", v),
        "NET_ADMIN",
        "capabilities.add_capabilities[0]:",
    ),
    (
        lambda v: ctr(f"{SC}.capabilities.drop_capabilities.0", v),
        "ALL",
        "capabilities.drop_capabilities[0]:",
    ),
    (
        lambda v: _ctr(
            lambda c: c.linux.security_context.capabilities.add_ambient_capabilities.append(v)
        ),
        "NET_BIND_SERVICE",
        "capabilities.add_ambient_capabilities[0]:",
    ),
]


@pytest.mark.parametrize(
    ("make", "good", "field"),
    TRAILING_NEWLINE,
    ids=[f"{f}{g}" for _, g, f in TRAILING_NEWLINE],
)
def test_a_trailing_newline_is_refused(make: Callable[[str], Any], good: str, field: str) -> None:
    validate.check(make(good))
    with pytest.raises(InvalidArgument) as exc:
        validate.check(make(good + "\n"))
    assert field in exc.value.message, exc.value.message


def test_huge_values_are_clipped_in_the_message() -> None:
    req = _pod(lambda c: setattr(c, "hostname", "-" * 1_000_000))
    with pytest.raises(InvalidArgument) as exc:
        validate.check(req)
    assert "config.hostname" in exc.value.message
    assert len(exc.value.message) < 300
    # and whatever an error quotes, its message stays small enough for a gRPC trailer
    assert len(NotFound("x" * 10**6).message.encode()) < MAX_MESSAGE_BYTES + 100
    assert len(NotFound("é" * 10**6).message.encode()) < MAX_MESSAGE_BYTES + 100


class _Sandboxes:
    def __init__(self) -> None:
        self.ran: list[Any] = []

    async def run_pod(self, spec: Any) -> str:
        self.ran.append(spec)
        return "p" * 64


class _Self:
    def __init__(self) -> None:
        self._sandboxes = _Sandboxes()


async def test_servicer_rpcs_check_before_they_run() -> None:
    me = _Self()
    bad = pod("metadata.name", "")
    with pytest.raises(InvalidArgument, match=r"config\.metadata\.name"):
        await RuntimeService.RunPodSandbox(me, bad, None)  # type: ignore[arg-type]
    assert me._sandboxes.ran == []
    resp = await RuntimeService.RunPodSandbox(me, kubelet_pod(), None)  # type: ignore[arg-type]
    assert resp.pod_sandbox_id == "p" * 64
    assert [s.name for s in me._sandboxes.ran] == ["web-7d4b9c-x2x"]
