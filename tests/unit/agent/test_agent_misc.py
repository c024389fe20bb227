"""Small agent pieces: rootfs path resolution, addresses, pod files, cgroup parsing."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from criv_agent import address, cgroups, podsandbox
from criv_agent.api.runtime.v1 import api_pb2
from criv_agent.sandbox import Sandbox, hosts_file, resolv_conf
from criv_agent.spec.rootfs import read_rootfs_file, resolve_in_root


def test_resolve_in_root_clamps_links_and_dotdot(tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "abs").symlink_to("/etc/target")
    (root / "etc" / "up").symlink_to("../../../../../../etc/target")
    (root / "etc" / "loop").symlink_to("loop")
    r = str(root)
    assert resolve_in_root(r, "/etc/abs") == f"{r}/etc/target"
    assert resolve_in_root(r, "/etc/up") == f"{r}/etc/target"
    assert resolve_in_root(r, "/../../x") == f"{r}/x"
    with pytest.raises(OSError):
        resolve_in_root(r, "/etc/loop")
    (root / "etc" / "target").write_text("inside\n")
    assert read_rootfs_file(r, "/etc/up") == "inside\n"
    (root / "etc" / "dir").mkdir()
    assert read_rootfs_file(r, "/etc/dir") is None
    assert read_rootfs_file(r, "/etc/missing") is None


def test_addresses() -> None:
    assert address.parse("unix:/run/a.sock") == address.Address("unix", path="/run/a.sock")
    assert address.parse("vsock:1024") == address.Address("vsock", port=1024)
    assert str(address.parse("vsock:1025")) == "vsock:1025"
    for bad in ("tcp:1", "unix:", "vsock:x", "nothing"):
        with pytest.raises(ValueError):
            address.parse(bad)
    # an AF_VSOCK listener (the guest's); a host without a vsock transport refuses it
    try:
        s = address.listen(address.parse("vsock:0"))
    except OSError:
        return
    assert s.family == socket.AF_VSOCK
    s.close()


def test_pod_files(tmp_path: Path) -> None:
    dns = api_pb2.DNSConfig(servers=["1.1.1.1", "8.8.8.8"], searches=["a", "b"],
                            options=["ndots:5"])  # fmt: skip
    assert (
        resolv_conf(dns) == "search a b\nnameserver 1.1.1.1\nnameserver 8.8.8.8\noptions ndots:5\n"
    )
    hosts = hosts_file("web", ["10.0.0.2", "fd00::2"])
    assert hosts.startswith("127.0.0.1\tlocalhost\n")
    assert hosts.endswith("10.0.0.2\tweb\nfd00::2\tweb\n")
    cfg = api_pb2.PodSandboxConfig(hostname="web", dns_config=dns)
    sb = Sandbox("sb1", str(tmp_path / "sb"), cfg)
    sb.write_files(["10.0.0.2"])
    assert (tmp_path / "sb" / "hostname").read_text() == "web\n"
    assert (tmp_path / "sb" / "hosts").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in (tmp_path / "sb").iterdir()) == [
        "hostname",
        "hosts",
        "resolv.conf",
    ]
    assert "nameserver 1.1.1.1" in (tmp_path / "sb" / "resolv.conf").read_text()
    assert sb.cgroup_parent == "/criv/sb1"
    cfg.linux.cgroup_parent = "/kubepods/pod1/"
    assert sb.cgroup_parent == "/kubepods/pod1"
    cfg.linux.cgroup_parent = "kubepods-pod1.slice"
    assert sb.cgroup_parent == "/criv/sb1"
    again = Sandbox.from_json(sb.to_json())
    assert again.config == cfg and again.sandbox_dir == sb.sandbox_dir


def test_cgroup_v1_stats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroups, "ROOT", str(tmp_path))
    for ctrl, files in {
        "cpuacct": {"cpuacct.usage": "123456\n"},
        "memory": {"memory.usage_in_bytes": "1000\n", "memory.limit_in_bytes": "4000\n",
                   "memory.stat": "total_inactive_file 100\ntotal_rss 700\n"
                                  "total_pgfault 9\ntotal_pgmajfault 1\n",
                   "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"},
        "pids": {"pids.current": "3\n"},
    }.items():  # fmt: skip
        d = tmp_path / ctrl / "criv" / "sb" / "c"
        d.mkdir(parents=True)
        for name, text in files.items():
            (d / name).write_text(text)
    st = cgroups.read_stats("/criv/sb/c")
    assert (st.cpu_ns, st.memory_usage, st.working_set, st.rss) == (123456, 1000, 900, 700)
    assert (st.page_faults, st.major_page_faults, st.available, st.pids) == (9, 1, 3100, 3)
    assert cgroups.oom_kills("/criv/sb/c") == 2
    for ctrl in ("cpuacct", "memory", "pids"):
        for f in (tmp_path / ctrl / "criv" / "sb" / "c").iterdir():
            f.unlink()
        (tmp_path / ctrl / "criv" / "sb" / "c").rmdir()
    cgroups.remove_tree_if_empty("/criv/sb")
    assert not any((tmp_path / c / "criv").exists() for c in ("cpuacct", "memory", "pids"))


def test_cgroup_v2_stats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroups, "ROOT", str(tmp_path))
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    d = tmp_path / "criv" / "sb" / "c"
    d.mkdir(parents=True)
    (d / "cpu.stat").write_text("usage_usec 5\nuser_usec 3\n")
    (d / "memory.current").write_text("2000\n")
    (d / "memory.max").write_text("max\n")
    (d / "memory.stat").write_text("anon 1500\ninactive_file 500\npgfault 4\npgmajfault 0\n")
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (d / "pids.current").write_text("1\n")
    st = cgroups.read_stats("/criv/sb/c")
    assert (st.cpu_ns, st.memory_usage, st.working_set, st.rss, st.available) == (
        5000, 2000, 1500, 1500, 0)  # fmt: skip
    assert cgroups.oom_kills("/criv/sb/c") == 1
    assert os.path.isdir(d)


def test_a_userns_pods_guest_local_files_are_reachable_by_its_mapped_root(tmp_path: Path) -> None:
    """A vm guest keeps the pod files under the agent's 0700 state dir; crun binds them
    as a user namespace's mapped root, so for such a pod the dir becomes searchable."""
    m = api_pb2.IDMapping(container_id=0, host_id=1 << 20, length=65536)
    opts = api_pb2.NamespaceOption(
        userns_options=api_pb2.UserNamespace(mode=api_pb2.POD, uids=[m], gids=[m])
    )
    cfg = api_pb2.PodSandboxConfig()
    assert not podsandbox.userns_pod(cfg)
    cfg.linux.security_context.namespace_options.CopyFrom(opts)
    assert podsandbox.userns_pod(cfg)
    opts.userns_options.mode = api_pb2.NODE
    cfg.linux.security_context.namespace_options.CopyFrom(opts)
    assert not podsandbox.userns_pod(cfg)
    d = tmp_path / "agent"
    d.mkdir(mode=0o700)
    podsandbox.searchable(str(d))
    assert d.stat().st_mode & 0o777 == 0o711  # searchable, not listable
