"""`criv kubelet-config`: the kubelet settings and RuntimeClass objects that match a config.

docs/kubernetes.md embeds this output for the default configuration, and a unit test
keeps the two equal, so change both together.
"""

from __future__ import annotations

from typing import Any

import yaml

from criv.config import Config

# Host memory per idle `vm` pod (its guest RAM, QEMU's own PSS, its vsock backend and
# virtiofsd, criv's growth) with 10 pods at the default vm.memory_mib (256), the larger of
# clones (161.7) and cold boots (171.4): bench/podstart.py, docs/vm.md (Guest root mapped
# with DAX).
VM_POD_OVERHEAD_MIB = 172

SECTIONS = ("flags", "kubelet", "runtimeclasses")


def endpoint(cfg: Config) -> str:
    return f"unix://{cfg.socket_path}"


def kubelet_flags(cfg: Config) -> list[str]:
    ep = endpoint(cfg)
    return [
        f"--container-runtime-endpoint={ep}",
        f"--image-service-endpoint={ep}",
        f"--cgroup-driver={cfg.cgroup_driver}",
    ]


def kubelet_configuration(cfg: Config) -> dict[str, Any]:
    ep = endpoint(cfg)
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "containerRuntimeEndpoint": ep,
        "imageServiceEndpoint": ep,
        "cgroupDriver": cfg.cgroup_driver,
    }


def runtime_classes(cfg: Config) -> list[dict[str, Any]]:
    """One RuntimeClass per named handler this node would accept ("" needs none)."""
    out = []
    for handler, mode in sorted(cfg.runtime.handlers.items()):
        if not handler or (mode == "host" and cfg.runtime.host_pods == "reject"):
            continue
        rc: dict[str, Any] = {
            "apiVersion": "node.k8s.io/v1",
            "kind": "RuntimeClass",
            "metadata": {"name": handler},
            "handler": handler,
        }
        if mode == "vm":
            rc["overhead"] = {"podFixed": {"memory": f"{VM_POD_OVERHEAD_MIB}Mi"}}
        out.append(rc)
    return out


def _yaml(doc: dict[str, Any]) -> str:
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def render(cfg: Config, source: str, sections: tuple[str, ...] = SECTIONS) -> str:
    """The text `criv kubelet-config` prints; ``source`` names the config file read."""
    parts: list[str] = []
    if "flags" in sections:
        lines = [f"# kubelet flags for criv ({source})", *kubelet_flags(cfg)]
        parts.append("\n".join(lines) + "\n")
    if "kubelet" in sections:
        parts.append(
            "# or the same in kubelet's --config file (KubeletConfiguration)\n---\n"
            + _yaml(kubelet_configuration(cfg))
        )
    if "runtimeclasses" in sections:
        head = ["# RuntimeClasses (kubectl apply -f -)"]
        default = cfg.runtime.handlers.get("")
        if default:
            head.append(f"# pods that name no RuntimeClass run in {default!r} isolation")
        if cfg.runtime.host_pods == "reject":
            head.append("# no host RuntimeClass: runtime.host_pods is reject")
        docs = [_yaml(rc) for rc in runtime_classes(cfg)]
        parts.append("\n".join(head) + "\n" + "".join(f"---\n{d}" for d in docs))
    return "\n".join(parts)
