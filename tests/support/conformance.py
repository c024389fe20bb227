"""CRI behaviours kubelet relies on (issue 15), written once for both isolation modes:
the runtime suite (tests/integration/runtime, host) and the vm pod suite (tests/vm/pods)
call them. One pod carries every check, since a vm pod costs a TCG boot.
"""

from __future__ import annotations

import asyncio
import os
import time

import grpc
import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri
from tests.support.spdy_client import spdy_exec
from tests.support.streaming import exec_url

# what makes up a process's identity in /proc/<pid>/status
_IDENTITY = "^(Uid|Gid|Groups|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):"


def _out(cri: Cri, cid: str, cmd: list[str]) -> str:
    r = cri.exec(cid, cmd)
    assert r.exit_code == 0, (cmd, r.stderr)
    return r.stdout.decode()


def _wait_gone(cri: Cri, cid: str, args: str, timeout: float = 20) -> None:
    """Until no process of the container runs ``args``, zombies included: a killed exec
    whose crun died first is the agent's to reap (else the container's init could never
    finish exiting); fails if one is still there after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        ps = _out(cri, cid, ["ps", "-o", "stat,args"]).splitlines()
        live = [p for p in ps if p.split(None, 1)[-1] in (args, f"[{args.split()[0]}]")]
        if not live:
            return
        assert time.monotonic() < deadline, f"{args!r} still running: {ps}"
        time.sleep(0.2)


def _wait_log(cri: Cri, pod: str, name: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while not (text := cri.log(pod, name)):
        assert time.monotonic() < deadline, f"{name} wrote no log line"
        time.sleep(0.1)
    return text


def _groups_line(log: str) -> list[str]:
    """The groups ``id -G`` printed first in a CRI log (``<time> stdout F <line>``)."""
    return log.splitlines()[0].split(" ", 3)[3].split()


def _supplemental_groups_policy(cri: Cri, pod: str, merge: str) -> None:
    """Merge (``merge``, the default): the image's /etc/group adds staff (50) to app's
    groups; Strict: only the primary gid and supplemental_groups. The container's own
    process, ExecSync and Exec alike; ContainerStatus.user reports them."""
    assert _groups_line(_wait_log(cri, pod, "app")) == ["1000", "50"]
    assert _out(cri, merge, ["id", "-G"]).split() == ["1000", "50"]
    user = cri.status(merge).user.linux
    assert (user.uid, user.gid, list(user.supplemental_groups)) == (1000, 1000, [1000, 50])
    sc = api_pb2.LinuxContainerSecurityContext(
        run_as_username="app",
        supplemental_groups=[3001],
        supplemental_groups_policy=api_pb2.SupplementalGroupsPolicy.Strict,
    )
    strict = cri.run(pod, "strict", ["sh", "-c", "id -G; exec sleep 3600"], security=sc)
    assert _groups_line(_wait_log(cri, pod, "strict")) == ["1000", "3001"]
    assert _out(cri, strict, ["id", "-G"]).split() == ["1000", "3001"]
    r = asyncio.run(spdy_exec(exec_url(cri, strict, ["id", "-G"])))
    assert r.stdout.split() == [b"1000", b"3001"], r
    user = cri.status(strict).user.linux
    assert (user.uid, user.gid, list(user.supplemental_groups)) == (1000, 1000, [1000, 3001])
    features = cri.rt.Status(api_pb2.StatusRequest(), timeout=30).features
    assert features.supplemental_groups_policy


def exec_identity_log_file_and_exec_timeout(cri: Cri) -> None:
    pod = cri.run_pod("conform")

    # The log file exists once StartContainer returns, output in it by EXITED.
    quick = cri.create(pod, "quick", ["sh", "-c", "echo quick-line"])
    cri.start(quick)
    assert os.path.exists(cri.status(quick).log_path), "no log file after StartContainer"
    assert cri.wait_exited(quick, 120).exit_code == 0
    assert "quick-line" in cri.log(pod, "quick")

    # Exec runs as the container: user, group, supplemental groups, cwd, env, and the
    # same credentials, capabilities, no_new_privs and seccomp mode as its init.
    sc = api_pb2.LinuxContainerSecurityContext(
        run_as_user=api_pb2.Int64Value(value=1001),
        run_as_group=api_pb2.Int64Value(value=2001),
        supplemental_groups=[3001, 3002],
        no_new_privs=True,
        capabilities=api_pb2.Capability(
            drop_capabilities=["ALL"], add_capabilities=["NET_BIND_SERVICE"]
        ),
        seccomp=api_pb2.SecurityProfile(profile_type=api_pb2.SecurityProfile.RuntimeDefault),
        # as kubelet sends it: a pid namespace of its own, so /proc/1 is the container's init
        namespace_options=api_pb2.NamespaceOption(pid=api_pb2.CONTAINER),
    )
    envs = [api_pb2.KeyValue(key="GREETING", value=b"from-the-spec")]
    cid = cri.run(pod, "ident", ["sleep", "3600"], security=sc, working_dir="/tmp", envs=envs)
    assert _out(cri, cid, ["id", "-u"]) == "1001\n"
    assert _out(cri, cid, ["id", "-g"]) == "2001\n"
    assert {"2001", "3001", "3002"} <= set(_out(cri, cid, ["id", "-G"]).split())
    assert _out(cri, cid, ["pwd"]) == "/tmp\n"
    assert _out(cri, cid, ["sh", "-c", "echo $GREETING"]) == "from-the-spec\n"
    init = _out(cri, cid, ["grep", "-E", _IDENTITY, "/proc/1/status"])
    mine = _out(cri, cid, ["grep", "-E", _IDENTITY, "/proc/self/status"])
    assert "NoNewPrivs:\t1" in init and "Seccomp:\t2" in init, init
    assert "CapBnd:\t0000000000000400" in init, init  # NET_BIND_SERVICE only
    assert mine == init, (mine, init)
    # interactive Exec too, with and without a terminal
    r = asyncio.run(spdy_exec(exec_url(cri, cid, ["id", "-u"])))
    assert r.stdout == b"1001\n", r
    tty_cmd = ["sh", "-c", "id -u; id -G; echo $TERM"]
    r = asyncio.run(spdy_exec(exec_url(cri, cid, tty_cmd, tty=True), tty=True, stderr=False))
    uid, groups, term = r.stdout.decode().splitlines()
    assert uid == "1001" and {"3001", "3002"} <= set(groups.split()), r
    assert term == "xterm"  # as containerd gives a terminal exec

    # run_as_username: the image's user by name
    app = cri.run(
        pod,
        "app",
        ["sh", "-c", "id -G; exec sleep 3600"],
        security=api_pb2.LinuxContainerSecurityContext(run_as_username="app"),
    )
    assert _out(cri, app, ["whoami"]) == "app\n"
    assert _out(cri, app, ["id", "-u"]) == "1000\n"
    _supplemental_groups_policy(cri, pod, app)

    # ExecSync's timeout kills what it started
    with pytest.raises(grpc.RpcError) as e:
        cri.exec(cid, ["sleep", "4321"], timeout=1)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_gone(cri, cid, "sleep 4321")
