"""Every CRI request is checked here before a servicer sees it.

A request that breaks a rule is refused with INVALID_ARGUMENT and a message naming the
field (``config.port_mappings[0].container_port: ...``), so that a bad value never
travels on to CNI, the agent, crun or the kernel and comes back as an INTERNAL or
UNAVAILABLE error (or, worse, does something). Two kinds of rules:

- one for every string anywhere in every request: no NUL byte (it cannot reach a path,
  an argv or an environment intact);
- per request type (``_CHECKS``): what kubelet and containerd require (metadata names,
  an image, absolute paths, ports, a hostname ``sethostname`` takes, ...) and what
  the kernel takes (cgroup values, cpusets, sysctl names).

:func:`validate_rpcs` wraps a servicer class's RPCs so each runs after :func:`check`.
Rules that need state (does the pod exist, is the handler known) stay with the sandbox
and image layers.
"""

from __future__ import annotations

import functools
import ipaddress
import posixpath
import re
from collections.abc import Callable, Iterable
from typing import Any

from google.protobuf.message import Message

from criv.cri.imagevolume import check_image_mount
from criv.cri.validate_linux import (
    check_mount,
    check_pod_linux,
    check_resources,
    check_security,
    fail,
    show,
)
from criv_agent.api.runtime.v1 import api_pb2
from criv_agent.hostname import hostname_problem

# What CNI_ARGS (``K=V;K=V``), reserved names (``name_namespace_uid_attempt``) and log
# lines can carry: printable, no separator of theirs, kubelet's longest name.
_NAME_RE = re.compile(r"[^\s;=\x00-\x1f\x7f]{1,253}")
_PROTOCOLS = frozenset(api_pb2.Protocol.values())
_PROPAGATIONS = frozenset(api_pb2.MountPropagation.values())
# Kubernetes' rule: any printable character but "=" (a control character, a newline above
# all, would split the variable in every line-based env file downstream)
_ENV_KEY_RE = re.compile(r"[^=\x00-\x1f\x7f]+")
_DNS_WORD_RE = re.compile(r"\S{1,253}")


# -- every string --------------------------------------------------------------------


def check_strings(msg: Message, prefix: str = "") -> None:
    """No NUL in any string field, map key or map value, at any depth."""
    for f, value in msg.ListFields():
        path = f"{prefix}{f.name}"
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            val_is_msg = f.message_type.fields_by_name["value"].message_type is not None
            for k, v in value.items():
                item = f"{path}[{show(k, 40)}]"
                if isinstance(k, str) and "\x00" in k:
                    raise fail(path, f"key {show(k)} contains a NUL byte")
                if val_is_msg:
                    check_strings(v, f"{item}.")
                elif isinstance(v, str) and "\x00" in v:
                    raise fail(item, "contains a NUL byte")
        elif f.is_repeated:
            for i, v in enumerate(value):
                if isinstance(v, Message):
                    check_strings(v, f"{path}[{i}].")
                elif isinstance(v, str) and "\x00" in v:
                    raise fail(f"{path}[{i}]", "contains a NUL byte")
        elif isinstance(value, Message):
            check_strings(value, f"{path}.")
        elif isinstance(value, str) and "\x00" in value:
            raise fail(path, "contains a NUL byte")


# -- shared field rules ----------------------------------------------------------------


def require(value: str, path: str) -> None:
    if not value:
        raise fail(path, "is required")


def check_name(value: str, path: str) -> None:
    require(value, path)
    if not _NAME_RE.fullmatch(value):
        raise fail(
            path,
            f"{show(value)} is not a name: 1-253 printable characters, no whitespace, ';' or '='",
        )


def check_abs_path(value: str, path: str, required: bool = True) -> None:
    if not value:
        if required:
            raise fail(path, "is required (an absolute path)")
        return
    if not value.startswith("/"):
        raise fail(path, f"{show(value)} is not an absolute path")


def check_hostname(value: str, path: str) -> None:
    problem = hostname_problem(value)
    if problem:
        raise fail(path, f"{show(value)} {problem}")


def check_ip(value: str, path: str, required: bool) -> None:
    if not value and not required:
        return
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise fail(path, f"{show(value)} is not an IP address") from None


def check_enum(value: int, allowed: Iterable[int], path: str) -> None:
    if value not in allowed:
        raise fail(path, f"unknown value {value}")


def _check_log_path(value: str, path: str) -> None:
    """Joined under the pod's log directory (as containerd does): it may not climb out."""
    if not value:
        return
    rel = posixpath.normpath(value.lstrip("/") or ".")
    if rel == ".":
        raise fail(path, f"{show(value)} names no file")
    if rel == ".." or rel.startswith("../"):
        raise fail(path, f"{show(value)} escapes the log directory")


# -- per request -----------------------------------------------------------------------


def _run_pod_sandbox(req: api_pb2.RunPodSandboxRequest) -> None:
    if not req.HasField("config"):
        raise fail("config", "is required")
    check_pod_config(req.config, "config")


def check_pod_config(cfg: api_pb2.PodSandboxConfig, path: str) -> None:
    md = cfg.metadata
    check_name(md.name, f"{path}.metadata.name")
    check_name(md.namespace, f"{path}.metadata.namespace")
    check_name(md.uid, f"{path}.metadata.uid")
    check_hostname(cfg.hostname, f"{path}.hostname")
    check_abs_path(cfg.log_directory, f"{path}.log_directory", required=False)
    dns = cfg.dns_config
    for i, s in enumerate(dns.servers):
        check_ip(s, f"{path}.dns_config.servers[{i}]", required=True)
    for name, words in (("searches", dns.searches), ("options", dns.options)):
        for i, w in enumerate(words):
            if not _DNS_WORD_RE.fullmatch(w):
                raise fail(f"{path}.dns_config.{name}[{i}]", f"{show(w)} is not one word")
    for i, pm in enumerate(cfg.port_mappings):
        p = f"{path}.port_mappings[{i}]"
        check_enum(pm.protocol, _PROTOCOLS, f"{p}.protocol")
        if not 0 < pm.container_port <= 65535:
            raise fail(f"{p}.container_port", f"{pm.container_port} is not a port (1-65535)")
        if not 0 <= pm.host_port <= 65535:
            raise fail(f"{p}.host_port", f"{pm.host_port} is not a port (0-65535, 0: none)")
        check_ip(pm.host_ip, f"{p}.host_ip", required=False)
    check_pod_linux(cfg.linux, f"{path}.linux")


def _create_container(req: api_pb2.CreateContainerRequest) -> None:
    require(req.pod_sandbox_id, "pod_sandbox_id")
    if not req.HasField("config"):
        raise fail("config", "is required")
    cfg = req.config
    check_name(cfg.metadata.name, "config.metadata.name")
    require(cfg.image.image, "config.image.image")
    check_abs_path(cfg.working_dir, "config.working_dir", required=False)
    for i, kv in enumerate(cfg.envs):
        if not _ENV_KEY_RE.fullmatch(kv.key):
            raise fail(f"config.envs[{i}].key", f"{show(kv.key)} is not a variable name")
    for i, m in enumerate(cfg.mounts):
        p = f"config.mounts[{i}]"
        check_abs_path(m.container_path, f"{p}.container_path")
        if m.image.image:
            check_image_mount(m, p)
        else:
            check_abs_path(m.host_path, f"{p}.host_path")
        check_enum(m.propagation, _PROPAGATIONS, f"{p}.propagation")
        check_mount(m, p)
    for i, d in enumerate(cfg.devices):
        p = f"config.devices[{i}]"
        check_abs_path(d.container_path, f"{p}.container_path")
        check_abs_path(d.host_path, f"{p}.host_path")
        if set(d.permissions) - set("rwm"):
            raise fail(f"{p}.permissions", f"{show(d.permissions)} is not a subset of 'rwm'")
    _check_log_path(cfg.log_path, "config.log_path")
    check_enum(cfg.stop_signal, api_pb2.Signal.values(), "config.stop_signal")
    check_resources(cfg.linux.resources, "config.linux.resources")
    check_security(cfg.linux.security_context, "config.linux.security_context")


def _update_resources(req: api_pb2.UpdateContainerResourcesRequest) -> None:
    require(req.container_id, "container_id")
    check_resources(req.linux, "linux")


def _update_pod_resources(req: api_pb2.UpdatePodSandboxResourcesRequest) -> None:
    require(req.pod_sandbox_id, "pod_sandbox_id")
    check_resources(req.resources, "resources")
    check_resources(req.overhead, "overhead", memory_min=0)  # an addition


def _exec_sync(req: api_pb2.ExecSyncRequest) -> None:
    require(req.container_id, "container_id")
    if not req.cmd:
        raise fail("cmd", "is required (the command to run)")


def _update_runtime_config(req: api_pb2.UpdateRuntimeConfigRequest) -> None:
    cidr = req.runtime_config.network_config.pod_cidr
    for i, part in enumerate(cidr.split(",") if cidr else []):
        try:
            ipaddress.ip_network(part.strip(), strict=False)
        except ValueError:
            raise fail(
                "runtime_config.network_config.pod_cidr", f"{show(part)} (#{i}) is not a CIDR"
            ) from None


def _pull_image(req: api_pb2.PullImageRequest) -> None:
    require(req.image.image, "image.image")


_CHECKS: dict[type[Message], Callable[[Any], None]] = {
    api_pb2.RunPodSandboxRequest: _run_pod_sandbox,
    api_pb2.CreateContainerRequest: _create_container,
    api_pb2.UpdateContainerResourcesRequest: _update_resources,
    api_pb2.UpdatePodSandboxResourcesRequest: _update_pod_resources,
    api_pb2.ExecSyncRequest: _exec_sync,
    api_pb2.UpdateRuntimeConfigRequest: _update_runtime_config,
    api_pb2.PullImageRequest: _pull_image,
}


def check(request: Message) -> None:
    """Raise InvalidArgument naming the first field of ``request`` that breaks a rule."""
    check_strings(request)
    rule = _CHECKS.get(type(request))
    if rule is not None:
        rule(request)


def validate_rpcs(servicer_cls: type, service_name: str, skip: Iterable[str] = ()) -> None:
    """Make every RPC of ``service_name`` that ``servicer_cls`` implements (minus
    ``skip``) run :func:`check` on its request first."""
    service = api_pb2.DESCRIPTOR.services_by_name[service_name]
    skipped = set(skip)
    for method in service.methods:
        name = method.name
        fn = getattr(servicer_cls, name, None)
        if fn is None or name in skipped:
            continue
        if method.server_streaming:
            setattr(servicer_cls, name, _checked_stream(fn))
        else:
            setattr(servicer_cls, name, _checked_unary(fn))


def _checked_unary(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def rpc(self: Any, request: Message, context: Any) -> Any:
        check(request)
        return await fn(self, request, context)

    return rpc


def _checked_stream(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def rpc(self: Any, request: Message, context: Any) -> Any:
        check(request)
        async for item in fn(self, request, context):
            yield item

    return rpc
