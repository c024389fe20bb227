"""OCI spec from CRI: golden expectations for containerd-compatible behaviour."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeAlias

import pytest

from criv_agent.api.runtime.v1 import api_pb2
from criv_agent.errors import InvalidArgument
from criv_agent.spec import (
    HostInfo,
    PodNamespaces,
    SpecInput,
    build_spec,
    image_config,
    stop_signal,
)
from criv_agent.spec.mounts import PodFiles
from criv_agent.spec.security import DEFAULT_CAPS, DEFAULT_MASKED_PATHS, DEFAULT_READONLY_PATHS
from criv_agent.spec.users import UserDb, parse_group, parse_passwd

NS = api_pb2.NamespaceMode
PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"
GROUP = "root:x:0:\napp:x:1000:\nextra:x:2000:app,other\nwheel:x:10:root\n"
USERS = UserDb(parse_passwd(PASSWD), parse_group(GROUP))
POD_FILES = PodFiles("/sb/hostname", "/sb/hosts", "/sb/resolv.conf", "/sb/shm")
POD_NS = PodNamespaces(net="/proc/1/ns/net", ipc="/proc/9/ns/ipc", uts="/proc/9/ns/uts",
                       pid="/proc/9/ns/pid_for_children")  # fmt: skip


def spec(
    cfg: api_pb2.ContainerConfig | None = None,
    image: dict[str, Any] | None = None,
    sandbox: api_pb2.PodSandboxConfig | None = None,
    sources: list[str] | None = None,
    host: HostInfo | None = None,
    **kw: Any,
) -> dict[str, Any]:
    cfg = cfg or api_pb2.ContainerConfig(command=["sh"])
    sb = sandbox or api_pb2.PodSandboxConfig(hostname="pod")
    return build_spec(SpecInput(
        container_id="c1", config=cfg, sandbox_config=sb, image=image or {},
        rootfs="/rootfs", mount_sources=sources if sources is not None else
        [m.host_path for m in cfg.mounts],
        cgroups_path="/criv/sb/c1", pod_files=POD_FILES, pod_ns=kw.pop("pod_ns", POD_NS),
        host=host or HostInfo(cgroup_v2=False), users=kw.pop("users", USERS), **kw,
    ))  # fmt: skip


def sc_cfg(**fields: Any) -> api_pb2.ContainerConfig:
    cfg = api_pb2.ContainerConfig(command=["sh"])
    for k, v in fields.items():
        setattr(cfg.linux.security_context, k, v)
    return cfg


# --- process: args, env, cwd ----------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "args", "entrypoint", "cmd", "want"),
    [
        ([], [], ["/ep"], ["a"], ["/ep", "a"]),  # image only
        (["/c"], [], ["/ep"], ["a"], ["/c"]),  # CRI command drops image Cmd too
        ([], ["x"], ["/ep"], ["a"], ["/ep", "x"]),  # CRI args replace Cmd only
        (["/c"], ["x"], ["/ep"], ["a"], ["/c", "x"]),
        ([], [], [""], ["a"], ["a"]),  # an empty Entrypoint means none
        ([], [], [], ["a", "b"], ["a", "b"]),
    ],
)
def test_args_merge(
    command: list[str], args: list[str], entrypoint: list[str], cmd: list[str], want: list[str]
) -> None:
    cfg = api_pb2.ContainerConfig(command=command, args=args)
    assert spec(cfg, {"Entrypoint": entrypoint, "Cmd": cmd})["process"]["args"] == want


def test_no_command_is_an_error() -> None:
    with pytest.raises(InvalidArgument):
        spec(api_pb2.ContainerConfig(), {})


def test_env_merge_and_default_path() -> None:
    cfg = api_pb2.ContainerConfig(command=["sh"])
    cfg.envs.add(key="B", value=b"cri")
    cfg.envs.add(key="C", value=b"new")
    env = spec(cfg, {"Env": ["A=1", "B=img"]})["process"]["env"]
    assert env == ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                   "HOSTNAME=pod", "A=1", "B=cri", "C=new"]  # fmt: skip
    env = spec(image={"Env": ["PATH=/x"], "Cmd": ["a"]})["process"]["env"]
    assert env[0] == "PATH=/x"


def test_cwd_terminal_and_oom_score() -> None:
    assert spec(image={"WorkingDir": "/w"})["process"]["cwd"] == "/w"
    cfg = api_pb2.ContainerConfig(command=["sh"], working_dir="/cri", tty=True)
    cfg.linux.resources.oom_score_adj = 500
    p = spec(cfg, {"WorkingDir": "/w"})["process"]
    assert (p["cwd"], p["terminal"], p["oomScoreAdj"]) == ("/cri", True, 500)
    assert spec()["process"]["cwd"] == "/"


def test_image_config_accepts_whole_or_inner() -> None:
    assert image_config(b'{"config": {"User": "a"}}') == {"User": "a"}
    assert image_config(b'{"User": "a"}') == {"User": "a"}
    assert image_config(b"") == {}
    with pytest.raises(InvalidArgument):
        image_config(b"[1]")


def test_stop_signal() -> None:
    assert stop_signal({}) == 15
    assert stop_signal({"StopSignal": "SIGQUIT"}) == 3
    assert stop_signal({"StopSignal": "usr1"}) == 10
    assert stop_signal({"StopSignal": "9"}) == 9
    assert stop_signal({"StopSignal": "BOGUS"}) == 15


# --- users ----------------------------------------------------------------------------


def user(cfg: api_pb2.ContainerConfig, image: dict[str, Any] | None = None) -> dict[str, Any]:
    u: dict[str, Any] = spec(cfg, image)["process"]["user"]
    return u


def test_user_default_root_with_member_groups() -> None:
    assert user(sc_cfg()) == {"uid": 0, "gid": 0, "additionalGids": [0, 10]}


def test_run_as_user_numeric() -> None:
    cfg = sc_cfg()
    cfg.linux.security_context.run_as_user.value = 1000
    assert user(cfg) == {"uid": 1000, "gid": 1000, "additionalGids": [1000, 2000]}
    cfg.linux.security_context.run_as_user.value = 4242  # not in passwd: gid 0
    assert user(cfg) == {"uid": 4242, "gid": 0, "additionalGids": [0]}


def test_run_as_username_group_and_supplemental() -> None:
    cfg = sc_cfg(run_as_username="app")
    cfg.linux.security_context.run_as_group.value = 5
    cfg.linux.security_context.supplemental_groups.extend([7, 2000])
    assert user(cfg) == {"uid": 1000, "gid": 5, "additionalGids": [5, 2000, 7]}


def test_supplemental_groups_policy_strict_ignores_the_images_group_file() -> None:
    cfg = sc_cfg(run_as_username="app")
    cfg.linux.security_context.supplemental_groups.append(7)
    # Merge (the default): the image's /etc/group adds 2000 (app is a member)
    assert user(cfg) == {"uid": 1000, "gid": 1000, "additionalGids": [1000, 2000, 7]}
    strict = api_pb2.SupplementalGroupsPolicy.Strict
    cfg.linux.security_context.supplemental_groups_policy = strict
    assert user(cfg) == {"uid": 1000, "gid": 1000, "additionalGids": [1000, 7]}
    assert user(sc_cfg(supplemental_groups_policy=strict))["additionalGids"] == [0]


def test_unknown_username_is_an_error() -> None:
    with pytest.raises(InvalidArgument):
        user(sc_cfg(run_as_username="ghost"))


def test_group_without_user_is_an_error() -> None:
    cfg = sc_cfg()
    cfg.linux.security_context.run_as_group.value = 5
    with pytest.raises(InvalidArgument):
        user(cfg)


@pytest.mark.parametrize(
    ("image_user", "want"),
    [("app", (1000, 1000)), ("app:extra", (1000, 2000)), ("1000:10", (1000, 10)),
     ("0", (0, 0)), ("", (0, 0))],
)  # fmt: skip
def test_image_user(image_user: str, want: tuple[int, int]) -> None:
    u = user(sc_cfg(), {"User": image_user, "Cmd": ["x"]})
    assert (u["uid"], u["gid"]) == want


def test_users_read_from_rootfs_without_escaping(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    outside = tmp_path / "outside-passwd"
    outside.write_text("evil:x:666:666::/:/bin/sh\n")
    # absolute and relative links that point outside must resolve inside the rootfs
    (root / "etc" / "passwd").symlink_to(str(outside))
    (root / "etc" / "group").symlink_to("../../../../outside-passwd")
    db = UserDb.from_rootfs(str(root))
    assert db.passwd == [] and db.group == []
    (root / "real").mkdir()
    (root / "real" / "passwd").write_text(PASSWD)
    (root / "etc" / "passwd").unlink()
    (root / "etc" / "passwd").symlink_to("/real/passwd")
    assert UserDb.from_rootfs(str(root)).by_name("app") is not None


# --- capabilities, privileged, masked paths -------------------------------------------


def caps(cfg: api_pb2.ContainerConfig, **kw: Any) -> list[str]:
    c: list[str] = spec(cfg, **kw)["process"]["capabilities"]["effective"]
    return c


def test_default_caps() -> None:
    c = spec()["process"]["capabilities"]
    assert c["bounding"] == c["effective"] == c["permitted"] == DEFAULT_CAPS
    assert "inheritable" not in c and "ambient" not in c


def test_cap_add_drop() -> None:
    cfg = sc_cfg()
    cfg.linux.security_context.capabilities.add_capabilities.extend(["NET_ADMIN", "cap_sys_time"])
    cfg.linux.security_context.capabilities.drop_capabilities.extend(["CHOWN", "KILL"])
    got = caps(cfg)
    assert "CAP_NET_ADMIN" in got and "CAP_SYS_TIME" in got
    assert "CAP_CHOWN" not in got and "CAP_KILL" not in got
    assert len(got) == len(DEFAULT_CAPS) + 2 - 2


def test_cap_all() -> None:
    cfg = sc_cfg()
    cfg.linux.security_context.capabilities.drop_capabilities.append("ALL")
    cfg.linux.security_context.capabilities.add_capabilities.append("NET_RAW")
    assert caps(cfg) == ["CAP_NET_RAW"]
    cfg = sc_cfg()
    cfg.linux.security_context.capabilities.add_capabilities.append("ALL")
    cfg.linux.security_context.capabilities.drop_capabilities.append("SYS_ADMIN")
    got = caps(cfg, host=HostInfo(cgroup_v2=False, cap_bounding=(1 << 41) - 1))
    assert len(got) == 40 and "CAP_SYS_ADMIN" not in got


def test_ambient_caps() -> None:
    cfg = sc_cfg()
    cfg.linux.security_context.capabilities.add_ambient_capabilities.append("NET_BIND_SERVICE")
    c = spec(cfg)["process"]["capabilities"]
    assert c["ambient"] == c["inheritable"] == ["CAP_NET_BIND_SERVICE"]


def test_unknown_cap_is_an_error() -> None:
    cfg = sc_cfg()
    cfg.linux.security_context.capabilities.add_capabilities.append("WIZARDRY")
    with pytest.raises(InvalidArgument):
        spec(cfg)


def test_every_container_names_the_default_persona() -> None:
    # crun sets it in the init and every exec: it clears the no-ASLR flag the agent's
    # helpers may run with (fixedlayout.py), privileged containers included
    assert spec()["linux"]["personality"] == {"domain": "LINUX"}
    assert spec(sc_cfg(privileged=True), sandbox=privileged_sandbox())["linux"]["personality"] == {
        "domain": "LINUX"
    }


def test_masked_readonly_defaults_and_overrides() -> None:
    s = spec()
    assert s["linux"]["maskedPaths"] == DEFAULT_MASKED_PATHS
    assert s["linux"]["readonlyPaths"] == DEFAULT_READONLY_PATHS
    cfg = sc_cfg()
    cfg.linux.security_context.masked_paths.append("/proc/x")
    cfg.linux.security_context.readonly_paths.append("/proc/y")
    s = spec(cfg)
    assert (s["linux"]["maskedPaths"], s["linux"]["readonlyPaths"]) == (["/proc/x"], ["/proc/y"])


def privileged_sandbox() -> api_pb2.PodSandboxConfig:
    sb = api_pb2.PodSandboxConfig(hostname="pod")
    sb.linux.security_context.privileged = True
    return sb


def test_privileged() -> None:
    cfg = sc_cfg(privileged=True)
    cfg.linux.security_context.seccomp.profile_type = api_pb2.SecurityProfile.RuntimeDefault
    host = HostInfo(cgroup_v2=True, cap_bounding=0b111)
    s = spec(cfg, sandbox=privileged_sandbox(), host=host)
    assert s["process"]["capabilities"]["bounding"] == ["CAP_CHOWN", "CAP_DAC_OVERRIDE",
                                                        "CAP_DAC_READ_SEARCH"]  # fmt: skip
    assert s["linux"]["maskedPaths"] == [] and s["linux"]["readonlyPaths"] == []
    assert "seccomp" not in s["linux"]
    sysfs = next(m for m in s["mounts"] if m["destination"] == "/sys")
    assert "ro" not in sysfs["options"]
    assert s["linux"]["resources"]["devices"][0] == {"allow": True, "access": "rwm"}
    assert not any(n["type"] == "cgroup" for n in s["linux"]["namespaces"])


def test_privileged_needs_privileged_sandbox() -> None:
    with pytest.raises(InvalidArgument):
        spec(sc_cfg(privileged=True))


def test_no_new_privs_and_readonly_rootfs() -> None:
    s = spec(sc_cfg(no_new_privs=True, readonly_rootfs=True))
    assert s["process"]["noNewPrivileges"] is True
    assert s["root"] == {"path": "/rootfs", "readonly": True}
    hosts = next(m for m in s["mounts"] if m["destination"] == "/etc/hosts")
    assert "ro" in hosts["options"]


# --- seccomp --------------------------------------------------------------------------


def seccomp(cfg: api_pb2.ContainerConfig) -> dict[str, Any] | None:
    r: dict[str, Any] | None = spec(cfg)["linux"].get("seccomp")
    return r


def _denied(prof: dict[str, Any]) -> set[str]:
    return {n for r in prof["syscalls"] if "args" not in r for n in r["names"]}


def test_seccomp_unset_is_unconfined() -> None:
    assert seccomp(sc_cfg()) is None
    cfg = sc_cfg()
    cfg.linux.security_context.seccomp.profile_type = api_pb2.SecurityProfile.Unconfined
    assert seccomp(cfg) is None


def test_seccomp_runtime_default_denylist() -> None:
    cfg = sc_cfg()
    cfg.linux.security_context.seccomp.profile_type = api_pb2.SecurityProfile.RuntimeDefault
    prof = seccomp(cfg)
    assert prof is not None and prof["defaultAction"] == "SCMP_ACT_ALLOW"
    denied = _denied(prof)
    assert {"mount", "keyctl", "bpf", "init_module", "reboot", "unshare"} <= denied
    assert "read" not in denied
    assert all("unlessCaps" not in r for r in prof["syscalls"])
    clone = [r for r in prof["syscalls"] if r["names"] == ["clone"]]
    assert len(clone) == 7 and all(r["args"][0]["op"] == "SCMP_CMP_MASKED_EQ" for r in clone)
    # a capability lifts its syscalls
    cfg.linux.security_context.capabilities.add_capabilities.append("SYS_ADMIN")
    prof = seccomp(cfg)
    assert prof is not None
    assert "mount" not in _denied(prof) and "keyctl" in _denied(prof)
    assert not [r for r in prof["syscalls"] if r["names"] == ["clone"]]


def test_seccomp_deprecated_path_field() -> None:
    assert seccomp(sc_cfg(seccomp_profile_path="runtime/default")) is not None
    assert seccomp(sc_cfg(seccomp_profile_path="unconfined")) is None
    with pytest.raises(InvalidArgument):
        seccomp(sc_cfg(seccomp_profile_path="bogus"))


def test_seccomp_localhost(tmp_path: Path) -> None:
    p = tmp_path / "p.json"
    prof = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}],
    }
    p.write_text(json.dumps(prof))
    cfg = sc_cfg()
    cfg.linux.security_context.seccomp.profile_type = api_pb2.SecurityProfile.Localhost
    cfg.linux.security_context.seccomp.localhost_ref = str(p)
    assert seccomp(cfg) == prof
    assert seccomp(sc_cfg(seccomp_profile_path=f"localhost/{p}")) == prof
    cfg.linux.security_context.seccomp.localhost_ref = str(tmp_path / "missing.json")
    with pytest.raises(InvalidArgument):
        seccomp(cfg)
    cfg.linux.security_context.seccomp.localhost_ref = "relative.json"
    with pytest.raises(InvalidArgument):
        seccomp(cfg)


# --- namespaces -----------------------------------------------------------------------


def namespaces(cfg: api_pb2.ContainerConfig, **kw: Any) -> dict[str, str | None]:
    s = spec(cfg, **kw)
    out = {n["type"]: n.get("path") for n in s["linux"]["namespaces"]}
    out["hostname"] = s.get("hostname")
    return out


Mode: TypeAlias = api_pb2.NamespaceMode.ValueType


def ns_cfg(network: Mode, pid: Mode, ipc: Mode, target: str = "") -> api_pb2.ContainerConfig:
    cfg = sc_cfg()
    o = cfg.linux.security_context.namespace_options
    o.network, o.pid, o.ipc, o.target_id = network, pid, ipc, target
    return cfg


def test_namespaces_pod() -> None:
    got = namespaces(ns_cfg(NS.POD, NS.POD, NS.POD))
    assert got == {"mount": None, "network": "/proc/1/ns/net", "uts": "/proc/9/ns/uts",
                   "ipc": "/proc/9/ns/ipc", "pid": "/proc/9/ns/pid_for_children",
                   "hostname": None}  # fmt: skip


def test_namespaces_container_pid_and_node() -> None:
    got = namespaces(ns_cfg(NS.NODE, NS.CONTAINER, NS.NODE))
    assert got == {"mount": None, "pid": None, "hostname": None}
    got = namespaces(ns_cfg(NS.NODE, NS.NODE, NS.CONTAINER))
    assert got == {"mount": None, "ipc": None, "hostname": None}


def test_namespaces_without_holder_get_new_uts_with_hostname() -> None:
    got = namespaces(ns_cfg(NS.POD, NS.CONTAINER, NS.POD), pod_ns=PodNamespaces())
    assert got["uts"] is None and "uts" in got and got["hostname"] == "pod"


def test_namespaces_target() -> None:
    got = namespaces(ns_cfg(NS.POD, NS.TARGET, NS.POD, "other"), target_pid_ns="/proc/5/ns/pid")
    assert got["pid"] == "/proc/5/ns/pid"
    with pytest.raises(InvalidArgument):
        namespaces(ns_cfg(NS.POD, NS.TARGET, NS.POD, "other"))


def test_cgroup_namespace_on_v2() -> None:
    got = namespaces(sc_cfg(), host=HostInfo(cgroup_v2=True))
    assert "cgroup" in got


# --- mounts ---------------------------------------------------------------------------


def test_default_and_pod_mounts() -> None:
    s = spec()
    dsts = [m["destination"] for m in s["mounts"]]
    assert dsts == ["/proc", "/dev", "/dev/pts", "/dev/mqueue", "/sys", "/sys/fs/cgroup",
                    "/etc/hostname", "/etc/hosts", "/etc/resolv.conf", "/dev/shm"]  # fmt: skip
    shm = s["mounts"][-1]
    assert shm["source"] == "/sb/shm" and shm["type"] == "bind"
    cg = next(m for m in s["mounts"] if m["destination"] == "/sys/fs/cgroup")
    assert "ro" in cg["options"]


def test_cri_mounts_propagation_readonly_order_and_override() -> None:
    P = api_pb2.MountPropagation
    cfg = api_pb2.ContainerConfig(command=["sh"])
    cfg.mounts.add(container_path="/a/b", host_path="/h1", readonly=True,
                   propagation=P.PROPAGATION_HOST_TO_CONTAINER)  # fmt: skip
    cfg.mounts.add(container_path="/a", host_path="/h2", propagation=P.PROPAGATION_BIDIRECTIONAL)
    cfg.mounts.add(container_path="/etc/hosts", host_path="/h3")
    cfg.mounts.add(container_path="/dev/termination-log", host_path="/h4")
    s = spec(cfg, sources=["/r1", "/r2", "/r3", "/r4"])
    cri = s["mounts"][-4:]
    assert [(m["destination"], m["source"], m["options"]) for m in cri] == [
        # parents before children (stable sort by depth)
        ("/a", "/r2", ["rbind", "rshared", "rw"]),
        ("/a/b", "/r1", ["rbind", "rslave", "ro"]),
        ("/etc/hosts", "/r3", ["rbind", "rprivate", "rw"]),
        ("/dev/termination-log", "/r4", ["rbind", "rprivate", "rw"]),
    ]
    assert [m["destination"] for m in s["mounts"]].count("/etc/hosts") == 1


def test_mount_sources_must_match() -> None:
    cfg = api_pb2.ContainerConfig(command=["sh"])
    cfg.mounts.add(container_path="/a", host_path="/h")
    with pytest.raises(InvalidArgument):
        spec(cfg, sources=[])


# --- resources, sysctls, devices ------------------------------------------------------


def test_resources() -> None:
    cfg = api_pb2.ContainerConfig(command=["sh"])
    r = cfg.linux.resources
    r.cpu_shares, r.cpu_quota, r.cpu_period = 512, 50000, 100000
    r.cpuset_cpus, r.cpuset_mems = "0-1", "0"
    r.memory_limit_in_bytes = 1 << 26
    r.hugepage_limits.add(page_size="2MB", limit=1 << 21)
    r.unified["memory.high"] = "1000000"
    res = spec(cfg, host=HostInfo(cgroup_v2=True, swap_accounting=True))["linux"]["resources"]
    assert res == {
        "cpu": {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0-1", "mems": "0"},
        "memory": {"limit": 1 << 26, "swap": 1 << 26},
        "hugepageLimits": [{"pageSize": "2MB", "limit": 1 << 21}],
        "unified": {"memory.high": "1000000"},
        "devices": [{"allow": False, "access": "rwm"}],
    }
    res = spec(cfg, host=HostInfo(cgroup_v2=False))["linux"]["resources"]
    assert res["memory"] == {"limit": 1 << 26}  # no swap accounting: no swap limit
    r.cpu_quota = -1  # unlimited: what a new cgroup has; crun would write it as 2^64-1
    assert "quota" not in spec(cfg)["linux"]["resources"]["cpu"]
    assert spec()["linux"]["resources"] == {"devices": [{"allow": False, "access": "rwm"}]}


def test_sysctls_and_cgroups_path() -> None:
    sb = api_pb2.PodSandboxConfig(hostname="pod")
    sb.linux.sysctls["net.ipv4.ip_forward"] = "1"
    s = spec(sandbox=sb)
    assert s["linux"]["sysctl"] == {"net.ipv4.ip_forward": "1"}
    assert s["linux"]["cgroupsPath"] == "/criv/sb/c1"
    assert "sysctl" not in spec()["linux"]


def test_devices() -> None:
    cfg = api_pb2.ContainerConfig(command=["sh"])
    cfg.devices.add(container_path="/dev/mynull", host_path="/dev/null", permissions="rw")
    s = spec(cfg)
    dev = s["linux"]["devices"][0]
    assert (dev["path"], dev["type"], dev["major"], dev["minor"]) == ("/dev/mynull", "c", 1, 3)
    assert s["linux"]["resources"]["devices"][1] == {
        "allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"}  # fmt: skip
    cfg.devices[0].host_path = "/etc/hostname-not-a-device"
    with pytest.raises(InvalidArgument):
        spec(cfg)


def test_seccomp_localhost_docker_format(tmp_path: Path) -> None:
    p = tmp_path / "docker.json"
    p.write_text(json.dumps({
        "defaultAction": "SCMP_ACT_ERRNO",
        "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86"]}],
        "syscalls": [
            {"names": ["read"], "action": "SCMP_ACT_ALLOW", "comment": "x", "includes": {}},
            {"name": "write", "action": "SCMP_ACT_ALLOW"},
            {"names": ["mount"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_X"]}},
        ],
    }))  # fmt: skip
    cfg = sc_cfg(seccomp_profile_path=f"localhost/{p}")
    assert seccomp(cfg) == {
        "defaultAction": "SCMP_ACT_ERRNO",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
        "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"},
                     {"names": ["write"], "action": "SCMP_ACT_ALLOW"}],
    }  # fmt: skip


def test_userns_pod_mode_gives_a_user_namespace_with_the_mappings() -> None:
    cfg = sc_cfg()
    u = cfg.linux.security_context.namespace_options.userns_options
    u.mode = api_pb2.NamespaceMode.POD
    u.uids.add(container_id=0, host_id=65536, length=65536)
    u.gids.add(container_id=0, host_id=131072, length=65536)
    s = spec(cfg)
    assert {"type": "user"} in s["linux"]["namespaces"]
    assert s["linux"]["uidMappings"] == [{"containerID": 0, "hostID": 65536, "size": 65536}]
    assert s["linux"]["gidMappings"] == [{"containerID": 0, "hostID": 131072, "size": 65536}]
    u.mode = api_pb2.NamespaceMode.NODE
    assert "uidMappings" not in spec(cfg)["linux"]
    u.mode = api_pb2.NamespaceMode.POD
    del u.gids[:]
    with pytest.raises(InvalidArgument, match="gids"):
        spec(cfg)


def test_userns_container_gets_no_sysctls_from_crun_and_the_agent_writes_pod_ones() -> None:
    from criv_agent.podsysctl import nsenter_argv

    cfg = sc_cfg()
    opts = cfg.linux.security_context.namespace_options
    opts.userns_options.mode = api_pb2.NamespaceMode.POD
    opts.userns_options.uids.add(container_id=0, host_id=65536, length=65536)
    opts.userns_options.gids.add(container_id=0, host_id=65536, length=65536)
    sb = api_pb2.PodSandboxConfig(hostname="h")
    sb.linux.sysctls.update({"net.ipv4.ip_forward": "1", "kernel.shm_rmid_forced": "1"})
    assert "sysctl" not in spec(cfg, sandbox=sb)["linux"]
    pod = PodNamespaces(net="/proc/1/ns/net", ipc="/proc/2/ns/ipc")
    argv = nsenter_argv(dict(sb.linux.sysctls), opts, pod)
    assert argv[:4] == ["nsenter", "--net=/proc/1/ns/net", "--ipc=/proc/2/ns/ipc", "--"]
    assert argv[-2:] == ["kernel/shm_rmid_forced=1", "net/ipv4/ip_forward=1"]
    for bad in ({"vm.swappiness": "1"}, {"kernel.hostname": "x"}, {"net/../x": "1"}):
        with pytest.raises(InvalidArgument):
            nsenter_argv(bad, opts, pod)
    opts.network = api_pb2.NamespaceMode.NODE  # the node's network: refused, not written
    with pytest.raises(InvalidArgument, match="no pod network"):
        nsenter_argv({"net.ipv4.ip_forward": "1"}, opts, pod)
