"""User namespaces (hostUsers: false) in host isolation: the container's ids are mapped,
its root is not the host's, and its image and writable layer still work for it
(idmapped image layers, criv/sandbox/userns.py). vm isolation refuses them, by handler."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri

pytestmark = pytest.mark.integration

HOST_ID = 1_000_000  # kubelet hands out multiples of 65536 above its own range
LENGTH = 65536


def _userns() -> api_pb2.NamespaceOption:
    m = api_pb2.IDMapping(container_id=0, host_id=HOST_ID, length=LENGTH)
    return api_pb2.NamespaceOption(
        pid=api_pb2.CONTAINER,
        userns_options=api_pb2.UserNamespace(mode=api_pb2.POD, uids=[m], gids=[m]),
    )


def _pod_linux() -> api_pb2.LinuxPodSandboxConfig:
    return api_pb2.LinuxPodSandboxConfig(
        security_context=api_pb2.LinuxSandboxSecurityContext(namespace_options=_userns()),
        # namespaced sysctls: crun cannot write them from inside the user namespace,
        # the agent writes them into the pod's namespaces (podsysctl.py)
        sysctls={"net.ipv4.ip_unprivileged_port_start": "0", "kernel.shm_rmid_forced": "1"},
    )


def _out(cri: Cri, cid: str, cmd: list[str]) -> str:
    r = cri.exec(cid, cmd)
    assert r.exit_code == 0, (cmd, r.stdout, r.stderr)
    return r.stdout.decode()


@pytest.mark.timeout(120)
def test_userns_pod_maps_ids_and_keeps_the_rootfs_usable(
    cri_factory: Callable[..., Cri], tmp_path: Path
) -> None:
    # criv's state dir is outside pytest's tree (tests/support/daemon.py): crun resolves
    # the rootfs path as the container's mapped root, so its parents must be searchable
    cri = cri_factory()
    handlers = {h.name: h.features.user_namespaces for h in cri.rt.Status(
        api_pb2.StatusRequest(), timeout=30).runtime_handlers}  # fmt: skip
    assert handlers == {"": True, "host": True, "vm": False}

    vol = tmp_path / "vol"
    vol.mkdir()
    vol.chmod(0o777)  # as kubelet makes an emptyDir (its parents may stay 0700)
    pod = cri.run_pod("userns", linux=_pod_linux())
    sc = api_pb2.LinuxContainerSecurityContext(namespace_options=_userns())
    cid = cri.run(
        pod,
        "c",
        ["sh", "-c", "cat /proc/self/uid_map; exec sleep 3600"],
        security=sc,
        mounts=[api_pb2.Mount(container_path="/vol", host_path=str(vol))],
    )
    # the container's process and its execs: in the user namespace, root inside
    assert _out(cri, cid, ["cat", "/proc/self/uid_map"]).split() == ["0", str(HOST_ID), "65536"]
    assert _out(cri, cid, ["cat", "/proc/self/gid_map"]).split() == ["0", str(HOST_ID), "65536"]
    assert _out(cri, cid, ["id", "-u"]) == "0\n"
    sysctls = ["/proc/sys/net/ipv4/ip_unprivileged_port_start", "/proc/sys/kernel/shm_rmid_forced"]
    assert _out(cri, cid, ["cat", *sysctls]).split() == ["0", "1"]
    assert cri.status(cid).user.linux.uid == 0
    # the image's files are root's to it (idmapped layers): readable, and writable
    # through its own upper layer, root-owned directories included
    assert _out(cri, cid, ["stat", "-c", "%u:%g", "/etc/passwd", "/root"]).split() == [
        "0:0",
        "0:0",
    ]
    assert "app:x:1000" in _out(cri, cid, ["cat", "/etc/passwd"])
    _out(cri, cid, ["sh", "-c", "echo mine > /etc/written && echo x > /root/own"])
    assert _out(cri, cid, ["cat", "/etc/written"]) == "mine\n"
    # ...but it is not the host's root: what it writes to a host directory is the
    # mapped host uid's, and a host root-owned file there is not its own
    _out(cri, cid, ["touch", "/vol/made-inside"])
    st = os.stat(vol / "made-inside")
    assert (st.st_uid, st.st_gid) == (HOST_ID, HOST_ID)
    (vol / "hosts-own").write_text("secret\n")
    (vol / "hosts-own").chmod(0o600)
    assert _out(cri, cid, ["stat", "-c", "%u", "/vol/hosts-own"]) == "65534\n"  # unmapped
    r = cri.exec(cid, ["cat", "/vol/hosts-own"])
    assert r.exit_code != 0, r

    # vm isolation refuses a user namespace, naming the handler
    with pytest.raises(grpc.RpcError) as e:
        cri.run_pod("userns-vm", handler="vm", linux=_pod_linux())
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'vm'" in (e.value.details() or ""), e.value.details()
