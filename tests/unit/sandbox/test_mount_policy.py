"""Host-side mount rules: a Localhost seccomp profile read with bounds, propagation
checks as containerd makes them, and recursive_read_only validation."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from criv.cri.validate_linux import check_mount
from criv.errors import FailedPrecondition, InvalidArgument, NotFound
from criv.sandbox import propagation, seccomp_profile
from criv_agent.api.runtime.v1 import api_pb2

MOUNTINFO = "\n".join(
    [
        "20 1 254:0 / / rw shared:1 - ext4 /dev/vda rw",
        "21 20 0:40 / /data rw master:7 - ext4 /dev/vdb rw",
        "22 20 0:41 / /data/private rw - tmpfs tmpfs rw",
        "23 20 0:42 / /plain rw - tmpfs tmpfs rw",
    ]
)


def test_propagation_needs_a_shared_or_slave_source() -> None:
    check = propagation.check_source
    check("/anything", propagation.BIDIRECTIONAL, MOUNTINFO)  # on /, shared
    check("/data/x", propagation.HOST_TO_CONTAINER, MOUNTINFO)  # slave is enough
    with pytest.raises(FailedPrecondition, match=r"not shared.*make-shared /data"):
        check("/data/x", propagation.BIDIRECTIONAL, MOUNTINFO)
    with pytest.raises(FailedPrecondition, match="neither shared nor slave"):
        check("/data/private/y", propagation.HOST_TO_CONTAINER, MOUNTINFO)
    check("/plain", propagation.PRIVATE, MOUNTINFO)  # private asks nothing
    with pytest.raises(InvalidArgument, match="vm isolation"):
        propagation.refuse_in_vm(propagation.BIDIRECTIONAL, "/b")
    propagation.refuse_in_vm(propagation.HOST_TO_CONTAINER, "/b")


def _load(path: Path) -> bytes:
    return asyncio.run(seccomp_profile.load(str(path)))


def test_localhost_profile_is_read_with_bounds(tmp_path: Path) -> None:
    good = tmp_path / "p.json"
    good.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}))
    assert json.loads(_load(good))["defaultAction"] == "SCMP_ACT_ALLOW"
    with pytest.raises(NotFound):
        _load(tmp_path / "missing.json")
    (tmp_path / "link.json").symlink_to(good)
    with pytest.raises(InvalidArgument, match="symlink"):
        _load(tmp_path / "link.json")
    with pytest.raises(InvalidArgument, match="regular file"):
        _load(tmp_path)
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (seccomp_profile.MAX_PROFILE_BYTES + 1))
    with pytest.raises(InvalidArgument, match="bytes"):
        _load(big)
    for text, problem in (("[1]", "JSON object"), ("{", "not JSON"), ("{}", "defaultAction")):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(InvalidArgument, match=problem):
            _load(tmp_path / "bad.json")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InvalidArgument, match="regular file"):
        _load(fifo)  # and does not hang
    assert asyncio.run(seccomp_profile.load("")) == b""


def test_recursive_read_only_needs_readonly_and_private_propagation() -> None:
    ok = api_pb2.Mount(container_path="/v", host_path="/h", readonly=True, recursive_read_only=True)
    check_mount(ok, "config.mounts[0]")
    with pytest.raises(InvalidArgument, match=r"mounts\[0\].recursive_read_only: needs readonly"):
        check_mount(api_pb2.Mount(recursive_read_only=True), "config.mounts[0]")
    prop = api_pb2.Mount(
        readonly=True,
        recursive_read_only=True,
        propagation=api_pb2.PROPAGATION_BIDIRECTIONAL,
    )
    with pytest.raises(InvalidArgument, match="PROPAGATION_BIDIRECTIONAL"):
        check_mount(prop, "config.mounts[0]")


def test_the_localhost_path_is_picked_as_the_agent_picks_the_profile() -> None:
    from criv.cri.runtime_convert import seccomp_localhost

    sc = api_pb2.LinuxContainerSecurityContext
    local = api_pb2.SecurityProfile(
        profile_type=api_pb2.SecurityProfile.Localhost, localhost_ref="/p.json"
    )
    assert seccomp_localhost(sc(seccomp=local)) == "/p.json"
    assert seccomp_localhost(sc(seccomp=local, privileged=True)) == ""  # no filter at all
    assert seccomp_localhost(sc(seccomp_profile_path="localhost//old.json")) == "/old.json"
    default = api_pb2.SecurityProfile(profile_type=api_pb2.SecurityProfile.RuntimeDefault)
    # the typed field wins over the deprecated string, as in the agent
    assert seccomp_localhost(sc(seccomp=default, seccomp_profile_path="localhost//x")) == ""
