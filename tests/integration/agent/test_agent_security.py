"""Security context through a real agent and crun: users, read-only rootfs, capabilities,
masked paths, seccomp, privileged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support.agent_harness import Agent

pytestmark = pytest.mark.integration

SP = api_pb2.SecurityProfile


def _out(agent: Agent, cid: str, script: str, **kw: Any) -> tuple[int, list[str]]:
    info = agent.run(cid, ["sh", "-c", script], **kw)
    return info.exit_code, [c for _, _, c in agent.logs(cid)]


def _cfg() -> api_pb2.ContainerConfig:
    return api_pb2.ContainerConfig()


def _cap_eff(lines: list[str]) -> int:
    line = next(x for x in lines if x.startswith("CapEff:"))
    return int(line.split()[1], 16)


@pytest.mark.timeout(60)
def test_run_as_uid_username_group(agent: Agent) -> None:
    agent.setup()
    cfg = _cfg()
    cfg.linux.security_context.run_as_user.value = 1000
    assert _out(agent, "uid", "id -u; id -g; id -G", config=cfg) == (0, ["1000", "1000",
                                                                          "1000 2000"])  # fmt: skip
    cfg = _cfg()
    cfg.linux.security_context.run_as_username = "nobody"
    cfg.linux.security_context.run_as_group.value = 1000
    cfg.linux.security_context.supplemental_groups.append(3000)
    code, lines = _out(agent, "name", "id -u; id -g; id -G", config=cfg)
    assert (code, lines[:2]) == (0, ["65534", "1000"])
    assert set(lines[2].split()) == {"1000", "3000"}
    _, lines = _out(agent, "img", "id -un", image={"User": "app"})
    assert lines == ["app"]


@pytest.mark.timeout(60)
def test_readonly_rootfs(agent: Agent) -> None:
    agent.setup()
    cfg = _cfg()
    cfg.linux.security_context.readonly_rootfs = True
    _, lines = _out(agent, "ro", "touch /x 2>/dev/null && echo wrote || echo denied",
                       config=cfg)  # fmt: skip
    assert lines == ["denied"]


@pytest.mark.timeout(60)
def test_capabilities(agent: Agent) -> None:
    agent.setup()
    default_caps = 0xA80425FB  # containerd's default set
    _, lines = _out(agent, "default", "grep Cap /proc/self/status")
    assert _cap_eff(lines) == default_caps
    cfg = _cfg()
    cfg.linux.security_context.capabilities.drop_capabilities.append("ALL")
    cfg.linux.security_context.capabilities.add_capabilities.append("NET_ADMIN")
    _, lines = _out(agent, "dropped", "grep Cap /proc/self/status", config=cfg)
    assert _cap_eff(lines) == 1 << 12
    cfg = _cfg()
    cfg.linux.security_context.capabilities.drop_capabilities.append("CHOWN")
    _, lines = _out(agent, "nochown", "grep Cap /proc/self/status", config=cfg)
    assert _cap_eff(lines) == default_caps & ~1


@pytest.mark.timeout(60)
def test_masked_and_readonly_paths(agent: Agent) -> None:
    agent.setup()
    script = ("wc -c < /proc/timer_list; "
              "(echo 1 > /proc/sys/vm/drop_caches) 2>/dev/null && echo rw || echo ro")  # fmt: skip
    _, lines = _out(agent, "masked", script)
    assert lines == ["0", "ro"]


@pytest.mark.timeout(60)
def test_privileged(agent: Agent) -> None:
    cfg_sb = agent.sandbox_config()
    cfg_sb.linux.security_context.privileged = True
    agent.setup(cfg_sb)
    cfg = _cfg()
    cfg.linux.security_context.privileged = True
    _, lines = _out(agent, "priv", "grep Cap /proc/self/status; wc -c < /proc/timer_list",
                    config=cfg)  # fmt: skip
    bounding = next(x for x in Path("/proc/self/status").read_text().splitlines()
                    if x.startswith("CapBnd:"))  # fmt: skip
    assert _cap_eff(lines) == int(bounding.split()[1], 16)
    assert int(lines[-1]) > 0  # not masked


@pytest.mark.timeout(60)
def test_seccomp_localhost_profile_blocks_mkdir(agent: Agent, tmp_path: Path) -> None:
    agent.setup()
    profile = tmp_path / "no-mkdir.json"
    profile.write_text(json.dumps({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO",
                      "errnoRet": 1}],
    }))  # fmt: skip
    cfg = _cfg()
    cfg.linux.security_context.seccomp.profile_type = SP.Localhost
    cfg.linux.security_context.seccomp.localhost_ref = str(profile)
    _, lines = _out(agent, "sc", "mkdir /tmp/d 2>&1; echo rc=$?", config=cfg)
    assert lines[-1] == "rc=1"
    assert "Operation not permitted" in lines[0]


@pytest.mark.timeout(60)
def test_seccomp_runtime_default(agent: Agent) -> None:
    agent.setup()
    cfg = _cfg()
    cfg.linux.security_context.seccomp.profile_type = SP.RuntimeDefault
    cfg.linux.security_context.capabilities.add_capabilities.append("SYS_ADMIN")
    cfg.linux.security_context.capabilities.add_capabilities.append("SYSLOG")
    # keyctl is denied for everyone; mount is allowed here because of CAP_SYS_ADMIN
    script = "mkdir /tmp/m && mount -t tmpfs t /tmp/m && echo mounted; dmesg >/dev/null && echo log"
    _, lines = _out(agent, "rd", script, config=cfg)
    assert lines == ["mounted", "log"]
    cfg = _cfg()
    cfg.linux.security_context.seccomp.profile_type = SP.RuntimeDefault
    _, lines = _out(agent, "rd2", "dmesg >/dev/null 2>&1 && echo log || echo denied",
                       config=cfg)  # fmt: skip
    assert lines == ["denied"]
