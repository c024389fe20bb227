"""Seccomp Localhost profiles, read-only and recursive read-only volumes and mount
propagation, through a real criv in host isolation (as containerd + runc behave)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri

pytestmark = pytest.mark.integration

SP = api_pb2.SecurityProfile
SYS_ADMIN = api_pb2.Capability(add_capabilities=["SYS_ADMIN"])


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@contextlib.contextmanager
def _mounted(*points: Path) -> Iterator[None]:
    """Unmount (recursively) whatever the test mounted, so the leak check stays clean."""
    try:
        yield
    finally:
        for p in reversed(points):
            subprocess.run(["umount", "-R", "--lazy", str(p)], capture_output=True)


def _code(e: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return e.value.code()  # type: ignore[no-any-return]


def _out(cri: Cri, pod: str, name: str, cmd: str, **kw: object) -> str:
    cid = cri.run(pod, name, ["sh", "-c", cmd], **kw)
    cri.wait_exited(cid)
    return "".join(line.split(" ", 3)[3] + "\n" for line in cri.log(pod, name).splitlines())


def _profile(path: Path, syscalls: list[str]) -> SP:
    rules = [{"names": syscalls, "action": "SCMP_ACT_ERRNO"}]
    path.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": rules}))
    return SP(profile_type=SP.Localhost, localhost_ref=str(path))


@pytest.mark.timeout(120)
def test_seccomp_localhost_profile_blocks_even_with_the_capability(
    cri: Cri, tmp_path: Path
) -> None:
    pod = cri.run_pod("seccomp")
    blocked = _profile(tmp_path / "no-sethostname.json", ["sethostname"])
    allowed = _profile(tmp_path / "no-mkdir.json", ["mkdir", "mkdirat"])
    cmd = "hostname foo 2>&1; echo rc=$?"

    def sc(profile: SP) -> api_pb2.LinuxContainerSecurityContext:
        return api_pb2.LinuxContainerSecurityContext(capabilities=SYS_ADMIN, seccomp=profile)

    # the capability alone lets it through; the profile stops it
    assert "rc=0" in _out(cri, pod, "other", cmd, security=sc(allowed))
    text = _out(cri, pod, "blocked", cmd, security=sc(blocked))
    assert "rc=1" in text and "Operation not permitted" in text, text

    def refused(ref: str) -> grpc.StatusCode:
        bad = SP(profile_type=SP.Localhost, localhost_ref=ref)
        with pytest.raises(grpc.RpcError) as e:
            cri.create(pod, f"bad{len(ref)}", ["true"], security=sc(bad))
        assert ref in str(e.value.details())
        return _code(e)

    assert refused(str(tmp_path / "missing.json")) == grpc.StatusCode.NOT_FOUND
    (tmp_path / "junk.json").write_text("{not json")
    assert refused(str(tmp_path / "junk.json")) == grpc.StatusCode.INVALID_ARGUMENT
    (tmp_path / "noaction.json").write_text('{"syscalls": []}')
    assert refused(str(tmp_path / "noaction.json")) == grpc.StatusCode.INVALID_ARGUMENT
    (tmp_path / "link.json").symlink_to(tmp_path / "no-sethostname.json")
    assert refused(str(tmp_path / "link.json")) == grpc.StatusCode.INVALID_ARGUMENT


def _ro_mount(host: Path, recursive: bool) -> api_pb2.Mount:
    return api_pb2.Mount(
        container_path="/v", host_path=str(host), readonly=True, recursive_read_only=recursive
    )


@pytest.mark.timeout(120)
def test_read_only_volume_sub_mounts_and_recursive_read_only(cri: Cri, tmp_path: Path) -> None:
    st = cri.rt.Status(api_pb2.StatusRequest(), timeout=30)
    assert {h.name: h.features.recursive_read_only_mounts for h in st.runtime_handlers} == {
        "": True,
        "host": True,
        "vm": True,
    }
    vol = tmp_path / "vol"
    (vol / "sub").mkdir(parents=True)
    pod = cri.run_pod("rro")
    cmd = "touch /v/top 2>&1; echo top=$?; touch /v/sub/f 2>&1; echo sub=$?"
    with _mounted(vol / "sub"):
        _sh("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(vol / "sub"))
        text = _out(cri, pod, "ro", cmd, mounts=[_ro_mount(vol, False)])
        assert "top=1" in text and "sub=0" in text, text  # as containerd: sub-mounts keep rw
        text = _out(cri, pod, "rro", cmd, mounts=[_ro_mount(vol, True)])
        assert "top=1" in text and "sub=1" in text, text
        assert "Read-only file system" in text
        assert (vol / "sub" / "f").exists() and not (vol / "top").exists()
        # a read-only volume of "/" (node exporters): read-only, sub-mounts seen
        root = api_pb2.Mount(container_path="/host", host_path="/", readonly=True)
        text = _out(cri, pod, "root", f"touch /host{vol}/top; echo top=$?; ls /host{vol}/sub",
                    mounts=[root])  # fmt: skip
        assert "top=1" in text and "\nf\n" in text, text
        assert not (vol / "top").exists()

    # as containerd: recursive_read_only only with readonly and private propagation
    for name, m in (
        ("rw", api_pb2.Mount(container_path="/v", host_path=str(vol), recursive_read_only=True)),
        ("prop", api_pb2.Mount(
            container_path="/v", host_path=str(vol), readonly=True, recursive_read_only=True,
            propagation=api_pb2.PROPAGATION_HOST_TO_CONTAINER)),
    ):  # fmt: skip
        with pytest.raises(grpc.RpcError) as e:
            cri.create(pod, name, ["true"], mounts=[m])
        assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT
        assert "recursive_read_only" in str(e.value.details())


def _shared(d: Path) -> None:
    """A directory that is a shared mount of its own, as containerd's tests make one."""
    d.mkdir(parents=True, exist_ok=True)
    _sh("mount", "--bind", str(d), str(d))
    _sh("mount", "--make-private", str(d))
    _sh("mount", "--make-shared", str(d))


def _vol(host: Path, path: str, prop: int) -> api_pb2.Mount:
    return api_pb2.Mount(container_path=path, host_path=str(host), propagation=prop)


@pytest.mark.timeout(120)
def test_mount_propagation_host_to_container_and_bidirectional(cri: Cri, tmp_path: Path) -> None:
    shared, private = tmp_path / "shared", tmp_path / "private"
    (shared / "late").mkdir(parents=True)
    (shared / "back").mkdir()
    private.mkdir()
    pod = cri.run_pod("prop")
    sc = api_pb2.LinuxContainerSecurityContext(
        capabilities=SYS_ADMIN, seccomp=SP(profile_type=SP.Unconfined)
    )
    sleep = ["sleep", "3600"]
    with _mounted(shared, private):
        _shared(shared)
        _sh("mount", "--bind", str(private), str(private))
        _sh("mount", "--make-private", str(private))
        mounts = [
            _vol(shared, "/h2c", api_pb2.PROPAGATION_HOST_TO_CONTAINER),
            _vol(shared, "/priv", api_pb2.PROPAGATION_PRIVATE),
            _vol(shared, "/bidi", api_pb2.PROPAGATION_BIDIRECTIONAL),
        ]
        cid = cri.run(pod, "c", sleep, mounts=mounts, security=sc)
        # a mount the host makes under the volume after the container started
        _sh("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(shared / "late"))
        (shared / "late" / "marker").write_text("from the host\n")
        r = cri.exec(cid, ["cat", "/h2c/late/marker"])
        assert (r.exit_code, r.stdout) == (0, b"from the host\n"), r.stderr
        assert cri.exec(cid, ["cat", "/priv/late/marker"]).exit_code != 0  # rprivate
        # a mount the container makes under a bidirectional volume reaches the host
        r = cri.exec(cid, ["sh", "-c", "mount -t tmpfs tmpfs /bidi/back && echo hi > /bidi/back/f"])
        assert r.exit_code == 0, r.stderr
        assert (shared / "back" / "f").read_text() == "hi\n"
        assert os.path.ismount(shared / "back")

        # as containerd: a source that is not on a shared mount is refused
        for name, prop in (
            ("h2c", api_pb2.PROPAGATION_HOST_TO_CONTAINER),
            ("bidi", api_pb2.PROPAGATION_BIDIRECTIONAL),
        ):
            with pytest.raises(grpc.RpcError) as e:
                cri.create(pod, name, sleep, mounts=[_vol(private, "/p", prop)], security=sc)
            assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION
            assert "--make-shared" in str(e.value.details())
        cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=60)
