"""The pod's sysctls for a container in a user namespace of its own.

crun writes ``linux.sysctl`` from inside the container, after it entered its user
namespace; the pod's network and IPC namespaces belong to the agent's (the node's or the
guest's) user namespace, so those writes are refused (EACCES) there. For such a
container the spec carries no ``sysctl`` (see spec/__init__.py) and the agent writes the
pod's sysctls into the pod's namespaces itself (``nsenter``), as root, before the
container is created: the same values crun would set, in the same namespaces. Only
namespaced sysctls go (``net.*`` into the pod's network namespace, the IPC ones into its
IPC namespace), and only where the container joins the pod's namespace: a sysctl that
would reach the node is refused, as crun refuses it.
"""

from __future__ import annotations

import asyncio
import re

from criv_agent.api.runtime.v1 import api_pb2
from criv_agent.errors import FailedPrecondition, InvalidArgument
from criv_agent.spec.namespaces import PodNamespaces

_IPC_PREFIXES = ("kernel.shm", "kernel.msg", "kernel.sem", "fs.mqueue.")
_NAME = re.compile(r"^[a-z0-9]([-_a-z0-9]*[a-z0-9])?([./][a-z0-9]([-_a-z0-9]*[a-z0-9])?)*$")
POD = api_pb2.NamespaceMode.POD
# writes each "$path=$value" argument to /proc/sys/$path
_WRITE = 'for a; do printf "%s" "${a#*=}" > "/proc/sys/${a%%=*}" || exit 1; done'


def _path(name: str) -> str:
    """/proc/sys relative path of a sysctl, dotted or slashed (as crun takes both)."""
    return name if "/" in name else name.replace(".", "/")


def nsenter_argv(
    sysctls: dict[str, str], opts: api_pb2.NamespaceOption, pod: PodNamespaces
) -> list[str]:
    """The command that writes ``sysctls`` into the pod's namespaces (pure)."""
    net = ipc = False
    args: list[str] = []
    for name, value in sorted(sysctls.items()):
        dotted = name.replace("/", ".")
        if not _NAME.match(name) or "\n" in value or "=" in name:
            raise InvalidArgument(f"sysctl {name!r}: not a sysctl name")
        if dotted.startswith("net."):
            if opts.network != POD or not pod.net:
                raise InvalidArgument(f"sysctl {name}: the container has no pod network namespace")
            net = True
        elif dotted.startswith(_IPC_PREFIXES):
            if opts.ipc != POD or not pod.ipc:
                raise InvalidArgument(f"sysctl {name}: the container has no pod IPC namespace")
            ipc = True
        else:
            raise InvalidArgument(
                f"sysctl {name}: not allowed in a user namespace (not a network or IPC one)"
            )
        args.append(f"{_path(name)}={value}")
    ns = ([f"--net={pod.net}"] if net else []) + ([f"--ipc={pod.ipc}"] if ipc else [])
    return ["nsenter", *ns, "--", "sh", "-c", _WRITE, "sh", *args]


async def apply(sysctls: dict[str, str], opts: api_pb2.NamespaceOption, pod: PodNamespaces) -> None:
    if not sysctls:
        return
    argv = nsenter_argv(sysctls, opts, pod)
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise FailedPrecondition("pod sysctls: nsenter did not finish in 30 s") from None
    if proc.returncode != 0:
        msg = err.decode(errors="replace").strip()[:500]
        raise FailedPrecondition(f"pod sysctls: {msg or f'exit {proc.returncode}'}")
