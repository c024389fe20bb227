"""CNI invocation, per the CNI spec (v1.0, with the 0.3/0.4 result formats parsed too).

A network config list runs plugin by plugin: ADD in order, each plugin getting the
previous plugin's result as ``prevResult``; DEL in reverse order with the cached ADD
result as ``prevResult`` (so DEL works after a criv restart: the caller persists
:attr:`CniResult.raw`); CHECK in order, also with the cached result. Plugins get
``runtimeConfig`` only for the capabilities they declare (``portMappings`` for
portmap). Every plugin runs as an asyncio subprocess in a process group of its own with
a deadline (``cni.plugin_timeout_seconds``; the group is killed past it, or when the
caller is cancelled) and a bounded output, so a stuck or chatty plugin cannot stall
the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from criv.commands import reap
from criv.config import CniConfig
from criv.errors import CommandTimeout, FailedPrecondition, Internal
from criv.network.readiness import find_plugin, load_default_network

log = logging.getLogger("criv.network.cni")

IFNAME = "eth0"
MAX_PLUGIN_OUTPUT = 1024 * 1024
# Versions whose spec knows CHECK (added in 0.4.0).
_CHECK_VERSIONS = ("0.4.0", "1.0.0", "1.1.0")


class CniError(Internal):
    """A plugin failed; the message carries the plugin's code, msg and details."""


class CniTimeout(CniError):
    """A plugin ran past ``cni.plugin_timeout_seconds`` and was killed."""

    code = CommandTimeout.code


@dataclass(frozen=True)
class PortMapping:
    host_port: int
    container_port: int
    protocol: str = "tcp"  # "tcp" | "udp" | "sctp"
    host_ip: str = ""

    def to_cni(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "hostPort": self.host_port,
            "containerPort": self.container_port,
            "protocol": self.protocol,
        }
        if self.host_ip:
            out["hostIP"] = self.host_ip
        return out


@dataclass(frozen=True)
class NetworkList:
    """A loaded network config list (a single .conf is wrapped into one)."""

    name: str
    cni_version: str
    plugins: list[dict[str, Any]]
    source: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "") -> NetworkList:
        version = str(data.get("cniVersion", "0.2.0"))
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise FailedPrecondition(f"CNI config {source}: no network name")
        plugins = data.get("plugins")
        if plugins is None:  # a single-plugin .conf
            plugins = [{k: v for k, v in data.items() if k not in ("name", "cniVersion")}]
        if not isinstance(plugins, list) or not plugins:
            raise FailedPrecondition(f"CNI config {source}: no plugins")
        for p in plugins:
            if not isinstance(p, dict) or not isinstance(p.get("type"), str):
                raise FailedPrecondition(f"CNI config {source}: a plugin has no type")
        return cls(name, version, plugins, source)


def load_network(cfg: CniConfig) -> NetworkList:
    found = load_default_network(cfg)
    if found is None:
        raise FailedPrecondition(f"no CNI network config in {cfg.conf_dir}")
    path, data = found
    return NetworkList.from_dict(dict(data), str(path))


@dataclass(frozen=True)
class PodNetworkRequest:
    sandbox_id: str
    netns: str
    pod_name: str = ""
    pod_namespace: str = ""
    pod_uid: str = ""
    port_mappings: list[PortMapping] = field(default_factory=list)

    def cni_args(self) -> str:
        # What kubelet-era runtimes pass; plugins ignore keys they do not know.
        return ";".join(
            [
                "IgnoreUnknown=1",
                f"K8S_POD_NAMESPACE={self.pod_namespace}",
                f"K8S_POD_NAME={self.pod_name}",
                f"K8S_POD_INFRA_CONTAINER_ID={self.sandbox_id}",
                f"K8S_POD_UID={self.pod_uid}",
            ]
        )


@dataclass(frozen=True)
class CniResult:
    """The final ADD result of a list: ``raw`` is persisted, ``ips`` shown to kubelet."""

    raw: dict[str, Any]
    ips: list[str]


def parse_ips(result: dict[str, Any], ifname: str = IFNAME) -> list[str]:
    """Pod IPs from a CNI result, IPv4 first (kubelet takes the first as the pod IP).

    0.3.x/0.4.0/1.0.0 results list ``ips`` with an optional ``interface`` index into
    ``interfaces``; IPs on a host-side interface (no ``sandbox``) and on other
    interfaces than ``ifname`` are skipped. 0.1/0.2 results carry ``ip4``/``ip6``.
    """
    out: list[str] = []
    interfaces = result.get("interfaces")
    ifs = interfaces if isinstance(interfaces, list) else []
    ips = result.get("ips")
    if isinstance(ips, list):
        for entry in ips:
            if not isinstance(entry, dict):
                continue
            idx = entry.get("interface")
            if isinstance(idx, int) and 0 <= idx < len(ifs):
                iface = ifs[idx]
                if isinstance(iface, dict) and (
                    not iface.get("sandbox") or iface.get("name") not in (ifname, None)
                ):
                    continue
            addr = entry.get("address")
            if isinstance(addr, str):
                out.append(addr)
    else:
        for key in ("ip4", "ip6"):
            block = result.get(key)
            if isinstance(block, dict) and isinstance(block.get("ip"), str):
                out.append(block["ip"])
    parsed: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for a in out:
        try:
            parsed.append(ipaddress.ip_interface(a).ip)
        except ValueError:
            continue
    parsed.sort(key=lambda ip: ip.version)
    seen: list[str] = []
    for ip in parsed:
        if str(ip) not in seen:
            seen.append(str(ip))
    return seen


def plugin_conf(
    net: NetworkList,
    plugin: dict[str, Any],
    prev_result: dict[str, Any] | None,
    port_mappings: list[PortMapping],
) -> dict[str, Any]:
    """The stdin config of one plugin of ``net`` (pure; unit-tested)."""
    conf = dict(plugin)
    conf["name"] = net.name
    conf["cniVersion"] = net.cni_version
    caps = plugin.get("capabilities")
    runtime: dict[str, Any] = {}
    if isinstance(caps, dict) and caps.get("portMappings") and port_mappings:
        runtime["portMappings"] = [pm.to_cni() for pm in port_mappings if pm.host_port > 0]
    conf.pop("runtimeConfig", None)
    if runtime:
        conf["runtimeConfig"] = runtime
    if prev_result is not None:
        conf["prevResult"] = prev_result
    return conf


class Cni:
    def __init__(self, cfg: CniConfig) -> None:
        self._cfg = cfg

    def network(self) -> NetworkList:
        return load_network(self._cfg)

    async def add(self, req: PodNetworkRequest) -> tuple[NetworkList, CniResult]:
        net = self.network()
        prev: dict[str, Any] | None = None
        done: list[dict[str, Any]] = []
        try:
            for plugin in net.plugins:
                conf = plugin_conf(net, plugin, prev, req.port_mappings)
                out = await self._exec("ADD", plugin["type"], conf, req)
                done.append(plugin)
                if out:  # a plugin with no output passes the previous result on
                    prev = out
        except BaseException:
            # Undo what succeeded, as the spec asks of a failed ADD.
            undo = NetworkList(net.name, net.cni_version, done, net.source)
            with contextlib.suppress(Exception):
                await asyncio.shield(self._del_list(undo, prev, req))
            raise
        result = prev or {"cniVersion": net.cni_version}
        return net, CniResult(result, parse_ips(result))

    async def delete(
        self, net_conf: dict[str, Any], cached: dict[str, Any] | None, req: PodNetworkRequest
    ) -> None:
        """DEL with the list as it was at ADD time (``net_conf``), so a conflist edited
        or removed since does not strand the pod's IP allocation."""
        await self._del_list(NetworkList.from_dict(net_conf), cached, req)

    async def check(
        self, net_conf: dict[str, Any], cached: dict[str, Any], req: PodNetworkRequest
    ) -> None:
        net = NetworkList.from_dict(net_conf)
        if net.cni_version not in _CHECK_VERSIONS:
            return
        for plugin in net.plugins:
            conf = plugin_conf(net, plugin, cached, req.port_mappings)
            await self._exec("CHECK", plugin["type"], conf, req)

    async def _del_list(
        self, net: NetworkList, cached: dict[str, Any] | None, req: PodNetworkRequest
    ) -> None:
        errors: list[str] = []
        for plugin in reversed(net.plugins):
            conf = plugin_conf(net, plugin, cached, req.port_mappings)
            try:
                await self._exec("DEL", plugin["type"], conf, req)
            except CniError as e:
                # Keep going: the other plugins still hold resources to free.
                errors.append(e.message)
        if errors:
            raise CniError("; ".join(errors))

    async def _exec(
        self, command: str, kind: str, conf: dict[str, Any], req: PodNetworkRequest
    ) -> dict[str, Any] | None:
        if "/" in kind:
            raise CniError(f"CNI plugin type {kind!r} must be a plain name")
        binary = find_plugin(kind, self._cfg.bin_dirs)
        if binary is None:
            raise CniError(f"CNI plugin {kind!r} not found in {', '.join(self._cfg.bin_dirs)}")
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": req.sandbox_id,
            "CNI_NETNS": req.netns,
            "CNI_IFNAME": IFNAME,
            "CNI_ARGS": req.cni_args(),
            "CNI_PATH": os.pathsep.join(self._cfg.bin_dirs),
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        }
        limit = self._cfg.plugin_timeout_seconds
        proc = await asyncio.create_subprocess_exec(
            str(binary),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,  # its own group: the kill reaches what it started
        )
        try:
            async with asyncio.timeout(limit) as cm:
                out, err = await proc.communicate(json.dumps(conf).encode())
        except TimeoutError:
            await reap(proc)
            if not cm.expired():
                raise
            raise CniTimeout(
                f"CNI {command} {kind}: no answer in {limit}s; killed ({binary})"
            ) from None
        except BaseException:
            await reap(proc)  # the caller was cancelled: leave nothing running
            raise
        out = out[:MAX_PLUGIN_OUTPUT]
        if proc.returncode != 0:
            raise CniError(f"CNI {command} {kind} failed: {_plugin_error(out, err)}")
        if command != "ADD" or not out.strip():
            return None
        try:
            result = json.loads(out)
        except ValueError as e:
            raise CniError(f"CNI ADD {kind}: result is not JSON: {e}") from e
        if not isinstance(result, dict):
            raise CniError(f"CNI ADD {kind}: result is not an object")
        return result


def _plugin_error(out: bytes, err: bytes) -> str:
    try:
        doc = json.loads(out)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and "msg" in doc:
        text = f"code {doc.get('code')}: {doc.get('msg')}"
        if doc.get("details"):
            text += f" ({doc['details']})"
        return text
    text = (out or err).decode(errors="replace").strip()
    return text[:2000] or "no output"
