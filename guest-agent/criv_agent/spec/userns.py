"""A container's user namespace from CRI ``NamespaceOption.userns_options``.

Mode POD (what kubelet sends for ``hostUsers: false``): the container gets a user
namespace of its own with the pod's uid/gid mappings (kubelet sends every container of a
pod the same ones), as OCI ``linux.namespaces`` ``user`` plus ``uidMappings`` and
``gidMappings``; crun writes the maps. Mode NODE: the agent's own (no user namespace).
Whoever provides the rootfs makes it usable by the mapped ids (criv, in ``host`` and
``vm`` isolation alike: an overlay on idmapped image layers, built on the host, which a
vm guest reaches through virtio-fs; see criv/sandbox/userns.py); criv refuses
``vm-image`` and checks the mappings before they get here, the agent checks them again.
"""

from __future__ import annotations

from typing import Any

from criv_agent.api.runtime.v1 import api_pb2
from criv_agent.errors import InvalidArgument

_ID_LIMIT = 1 << 32


def _mappings(ms: list[api_pb2.IDMapping], name: str) -> list[dict[str, int]]:
    if not ms:
        raise InvalidArgument(f"userns_options.{name}: no mapping for a user namespace")
    out = []
    for m in ms:
        if m.length == 0 or max(m.container_id, m.host_id) + m.length > _ID_LIMIT:
            raise InvalidArgument(f"userns_options.{name}: mapping out of range")
        out.append({"containerID": m.container_id, "hostID": m.host_id, "size": m.length})
    return out


def user_namespace(opts: api_pb2.NamespaceOption) -> dict[str, Any] | None:
    """The OCI ``linux`` keys of the container's user namespace; None for none."""
    if not opts.HasField("userns_options"):
        return None
    u = opts.userns_options
    if u.mode == api_pb2.NamespaceMode.NODE:
        return None
    if u.mode != api_pb2.NamespaceMode.POD:
        raise InvalidArgument(f"userns_options.mode: {u.mode} is not supported (POD or NODE)")
    return {
        "uidMappings": _mappings(list(u.uids), "uids"),
        "gidMappings": _mappings(list(u.gids), "gids"),
    }
