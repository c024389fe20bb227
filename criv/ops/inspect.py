"""`criv inspect POD|CONTAINER`: everything criv knows about one pod or container, as
JSON: the CRI status, criv's verbose info and its record on disk, the paths criv uses,
the host processes (QEMU or agent, vsock backend) with their memory, the vsock
backend's status, and a vm pod's libvirt domain XML."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from criv.config import Config
from criv.cri.client import ContainerView, CriClient, PodView
from criv.errors import CrivError, NotFound
from criv.ops import procinfo
from criv.ops.podproc import backend_process, main_process, vsock_status
from criv.sandbox.isolation import PodPaths

# Records are small; a bigger file is not one of criv's.
MAX_RECORD_BYTES = 4 << 20


def _record(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read(MAX_RECORD_BYTES))
    except (OSError, ValueError) as e:
        return {"error": f"cannot read {path}: {e}"}


def _paths(pod: PodView) -> tuple[PodPaths | None, dict[str, str]]:
    """The pod's files: its state dir (from the verbose info) and, for sockets and the
    backend's status file, the paths the running processes were started with."""
    out: dict[str, str] = {}
    if pod.state_dir is None:
        return None, out
    paths = PodPaths(pod.state_dir, Path())  # run dir: not recorded, taken from processes
    out["stateDir"] = str(paths.state)
    out["record"] = str(paths.record)
    st = pod.isolation_state
    if pod.mode == "vm":
        if isinstance(st.get("console_log"), str) and st["console_log"]:
            out["consoleLog"] = st["console_log"]
        pid = st.get("backend_pid")
        if isinstance(pid, int) and pid > 0:
            args = procinfo.argv(pid)
            for flag, key in (("--status-file", "vsockStatus"), ("--socket", "vhostUserSocket")):
                if value := procinfo.arg_after(args, flag):
                    out[key] = value
    elif pod.mode == "host":
        out["agentLog"] = str(paths.agent_log)
        out["agentState"] = str(paths.agent_state)
        pid = st.get("pid")
        if isinstance(pid, int) and pid > 0:
            control = procinfo.arg_after(procinfo.argv(pid), "--control")
            if control:
                out["agentControlSocket"] = control.removeprefix("unix:")
    return paths, out


def _domain_xml(cfg: Config, pod: PodView) -> str | None:
    domain = pod.isolation_state.get("domain")
    if pod.mode != "vm" or not isinstance(domain, str) or not domain:
        return None
    from criv.hypervisor.readonly import domain_xml

    try:
        return domain_xml(cfg.vm.libvirt_uri, domain)
    except CrivError as e:
        return f"<!-- {e.message} -->"


def pod_document(cfg: Config, pod: PodView) -> dict[str, Any]:
    paths, files = _paths(pod)
    procs = [p for p in (main_process(pod), backend_process(pod)) if p is not None]
    doc: dict[str, Any] = {
        "kind": "pod",
        "id": pod.id,
        "status": pod.status,
        "info": pod.info,
        "record": _record(paths.record) if paths else None,
        "paths": files,
        "processes": [p.to_dict() for p in procs],
        "containers": pod.container_ids,
    }
    if pod.mode == "vm":
        doc["vsock"] = vsock_status(pod)
        doc["domainXml"] = _domain_xml(cfg, pod)
    return doc


def container_document(c: ContainerView, pod: PodView | None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "kind": "container",
        "id": c.id,
        "podId": c.pod_id,
        "status": c.status,
        "info": c.info,
        "workingSetBytes": c.working_set_bytes,
    }
    if pod is not None and pod.state_dir is not None:
        record = PodPaths(pod.state_dir, Path()).containers / c.id / "container.json"
        doc["record"] = _record(record)
        doc["paths"] = {"record": str(record), "rootfs": c.info.get("rootfs", "")}
        doc["pod"] = {"name": pod.name, "namespace": pod.namespace, "mode": pod.mode}
    return doc


def inspect_command(cfg: Config, target: str) -> str:
    with CriClient(cfg.socket_path) as cri:
        try:
            doc = pod_document(cfg, cri.pod(target))
        except NotFound:
            try:
                c = cri.container(target)
            except NotFound:
                raise NotFound(f"no pod sandbox or container {target!r}") from None
            try:
                pod: PodView | None = cri.pod(c.pod_id)
            except NotFound:
                pod = None
            doc = container_document(c, pod)
    return json.dumps(doc, indent=2, sort_keys=True)
