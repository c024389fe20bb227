"""User namespaces (hostUsers: false), written once for both isolation modes: the
runtime suite (tests/integration/runtime/test_runtime_userns.py, host) and the vm pod
suite (tests/vm/pods/test_vm_userns.py) call :func:`pod_maps_ids_and_keeps_the_rootfs_usable`.
One pod carries every check, since a vm pod costs a TCG boot.

The container's ids are mapped, its root is not the host's, and its image and writable
layer still work for it: criv mounts the overlay on the host on idmapped image layers
(criv/sandbox/userns.py), in a vm pod too, whose guest sees it through virtio-fs.
"""

from __future__ import annotations

import os
from pathlib import Path

from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri

HOST_ID = 1_000_000  # kubelet hands out multiples of 65536 above its own range
LENGTH = 65536


def namespace_options() -> api_pb2.NamespaceOption:
    m = api_pb2.IDMapping(container_id=0, host_id=HOST_ID, length=LENGTH)
    return api_pb2.NamespaceOption(
        pid=api_pb2.CONTAINER,
        userns_options=api_pb2.UserNamespace(mode=api_pb2.POD, uids=[m], gids=[m]),
    )


def pod_linux() -> api_pb2.LinuxPodSandboxConfig:
    return api_pb2.LinuxPodSandboxConfig(
        security_context=api_pb2.LinuxSandboxSecurityContext(namespace_options=namespace_options()),
        # namespaced sysctls: crun cannot write them from inside the user namespace,
        # the agent writes them into the pod's namespaces (podsysctl.py)
        sysctls={"net.ipv4.ip_unprivileged_port_start": "0", "kernel.shm_rmid_forced": "1"},
    )


def _out(cri: Cri, cid: str, cmd: list[str]) -> str:
    r = cri.exec(cid, cmd)
    assert r.exit_code == 0, (cmd, r.stdout, r.stderr)
    return r.stdout.decode()


def handlers_advertise(cri: Cri) -> dict[str, bool]:
    """Status: each runtime handler's ``user_namespaces`` feature."""
    st = cri.rt.Status(api_pb2.StatusRequest(), timeout=30)
    return {h.name: h.features.user_namespaces for h in st.runtime_handlers}


def pod_maps_ids_and_keeps_the_rootfs_usable(
    cri: Cri, vol: Path, create_as_dac_override: bool
) -> None:
    """``vol``: an empty host directory, mounted as a volume (not idmapped).
    ``create_as_dac_override``: the container's root creates files in a directory of
    another of its ids (host mode); a vm pod's cannot (virtiofsd)."""
    vol.chmod(0o777)  # as kubelet makes an emptyDir (its parents may stay 0700)
    pod = cri.run_pod("userns", linux=pod_linux())
    sc = api_pb2.LinuxContainerSecurityContext(namespace_options=namespace_options())
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
    assert _out(cri, cid, ["stat", "-c", "%u:%g", "/etc/passwd", "/root", "/home/app"]).split() == [
        "0:0",
        "0:0",
        "1000:1000",
    ]
    assert "app:x:1000" in _out(cri, cid, ["cat", "/etc/passwd"])
    _out(cri, cid, ["sh", "-c", "echo mine > /etc/written && echo x > /root/own"])
    assert _out(cri, cid, ["cat", "/etc/written"]) == "mine\n"
    # an image file modified in place, a directory made, a file given to app
    _out(cri, cid, ["sh", "-c", "echo extra:x:7: >> /etc/group && mkdir /etc/made"])
    assert _out(cri, cid, ["tail", "-n1", "/etc/group"]) == "extra:x:7:\n"
    _out(cri, cid, ["sh", "-c", "touch /tmp/apps && chown 1000:1000 /tmp/apps"])
    # a directory of another of its ids (app's, 0755): in host mode its root may still
    # create files there (its CAP_DAC_OVERRIDE covers the ids it maps); in a vm pod it
    # may not: virtiofsd creates a file as the guest caller's host ids (1000000) with
    # no capabilities, so the host kernel refuses (docs/vm.md, user namespaces)
    r = cri.exec(cid, ["sh", "-c", "echo r > /home/app/roots"])
    if create_as_dac_override:
        assert r.exit_code == 0, r
    else:
        assert r.exit_code != 0 and b"Permission denied" in r.stderr, r
    assert _out(
        cri, cid, ["stat", "-c", "%u:%g", "/etc/written", "/etc/made", "/tmp/apps"]
    ).split() == [
        "0:0",
        "0:0",
        "1000:1000",
    ]
    # the pod's files (guest-local in a vm pod) are the node's (or guest's) root's:
    # readable, not its own; the pod's /dev/shm is writable
    pod_files = ["/etc/hostname", "/etc/hosts", "/etc/resolv.conf"]
    assert _out(cri, cid, ["stat", "-c", "%u", *pod_files]).split() == ["65534"] * 3
    assert _out(cri, cid, ["cat", "/etc/hostname"]).strip()
    _out(cri, cid, ["sh", "-c", "echo s > /dev/shm/x && cat /dev/shm/x"])
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
