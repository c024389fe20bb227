"""Security context, end to end (the agent suite covers the OCI spec in depth; these
check that what kubelet sends through criv reaches the container)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri

pytestmark = pytest.mark.integration

NET_ADMIN_BIT = 1 << 12


def _out(cri: Cri, pod: str, name: str, cmd: str, **sc: Any) -> tuple[int, str]:
    security = api_pb2.LinuxContainerSecurityContext(**sc)
    cid = cri.run(pod, name, ["sh", "-c", cmd], security=security)
    st = cri.wait_exited(cid)
    text = "".join(line.split(" ", 3)[3] + "\n" for line in cri.log(pod, name).splitlines())
    return st.exit_code, text


@pytest.mark.timeout(120)
def test_security_context(cri: Cri, tmp_path: Path) -> None:
    pod = cri.run_pod("sec")
    uid = api_pb2.Int64Value(value=1000)
    assert _out(cri, pod, "uid", "id -u; id -g", run_as_user=uid) == (0, "1000\n1000\n")
    assert _out(cri, pod, "uname", "id -un", run_as_username="app") == (0, "app\n")
    _, text = _out(cri, pod, "ro", "touch /newfile 2>&1; echo rc=$?", readonly_rootfs=True)
    assert "Read-only file system" in text and "rc=1" in text
    caps = api_pb2.Capability(add_capabilities=["NET_ADMIN"], drop_capabilities=["ALL"])
    _, text = _out(cri, pod, "caps", "grep CapEff /proc/self/status", capabilities=caps)
    assert int(text.split()[1], 16) == NET_ADMIN_BIT
    _, text = _out(cri, pod, "masked", "wc -c < /proc/timer_list; ls /proc/acpi | wc -l")
    assert text.split() == ["0", "0"]
    profile = tmp_path / "no-mkdir.json"
    rules = [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]
    profile.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": rules}))
    seccomp = api_pb2.SecurityProfile(
        profile_type=api_pb2.SecurityProfile.Localhost, localhost_ref=str(profile)
    )
    _, text = _out(cri, pod, "seccomp", "mkdir /tmp/x 2>&1; echo rc=$?", seccomp=seccomp)
    assert "Operation not permitted" in text and "rc=1" in text
