"""OCI mounts for read-only, recursive read-only and propagating volumes, their
sub-mounts (crun 1.8's rbind leaves them out), and a Localhost seccomp profile sent by
criv."""

from __future__ import annotations

import json
from typing import Any

from criv_agent.api.runtime.v1 import api_pb2
from criv_agent.spec import SpecInput, build_spec
from criv_agent.spec.submounts import MAX_SUBMOUNTS, parse_mountinfo, under
from criv_agent.spec.users import UserDb, parse_group, parse_passwd

P = api_pb2.MountPropagation
USERS = UserDb(parse_passwd("root:x:0:0::/root:/bin/sh\n"), parse_group("root:x:0:\n"))


def _line(n: int, point: str, opts: str = "rw,relatime", optional: str = "shared:1") -> str:
    return f"{n} 1 0:{n} / {point} {opts} {optional} - tmpfs tmpfs rw"


TABLE = "\n".join(
    [
        _line(20, "/"),
        _line(21, "/vol"),
        _line(22, "/vol/a", "ro,relatime"),
        _line(23, "/vol/a/deep"),
        _line(24, "/vol/with\\040space"),
        _line(25, "/volume-not-under"),
        _line(26, "/vol/a", "rw,relatime"),  # covers the read-only one
    ]
)


def _spec(cfg: api_pb2.ContainerConfig, sources: list[str], **kw: Any) -> dict[str, Any]:
    inp = SpecInput(
        container_id="c" * 64,
        config=cfg,
        sandbox_config=api_pb2.PodSandboxConfig(),
        image={},
        rootfs="/rootfs",
        mount_sources=sources,
        cgroups_path="/criv/c",
        users=USERS,
        **kw,
    )
    return build_spec(inp)


def test_submounts_below_a_source_top_of_each_point_shallowest_first() -> None:
    found = under("/vol", parse_mountinfo(TABLE))
    assert [(m.path, m.readonly) for m in found] == [
        ("/vol/with space", False),
        ("/vol/a", False),  # the later, read-write mount on it
        ("/vol/a/deep", False),
    ]
    # a volume of "/" (node exporters): not "/" itself again, on top, read-write
    assert [m.path for m in under("/", parse_mountinfo(TABLE))][:2] == ["/vol", "/volume-not-under"]
    many = "\n".join(_line(100 + i, f"/vol/m{i}") for i in range(MAX_SUBMOUNTS + 5))
    assert len(under("/vol", parse_mountinfo(many))) == MAX_SUBMOUNTS


def _mounts(spec: dict[str, Any], prefix: str) -> list[tuple[str, str, list[str]]]:
    return [
        (m["destination"], m["source"], m["options"])
        for m in spec["mounts"]
        if m["destination"].startswith(prefix)
    ]


def test_read_only_keeps_sub_mounts_own_flags_recursive_makes_all_read_only() -> None:
    table = "\n".join([_line(21, "/vol"), _line(22, "/vol/rw"), _line(23, "/vol/ro", "ro")])
    cfg = api_pb2.ContainerConfig(command=["sh"])
    cfg.mounts.add(container_path="/v", host_path="/vol", readonly=True)
    cfg.mounts.add(container_path="/r", host_path="/vol", readonly=True, recursive_read_only=True)
    s = _spec(cfg, ["/vol", "/vol"], mountinfo=table)
    assert _mounts(s, "/v") == [
        ("/v", "/vol", ["rbind", "rprivate", "ro"]),
        ("/v/rw", "/vol/rw", ["rbind", "rprivate", "rw"]),
        ("/v/ro", "/vol/ro", ["rbind", "rprivate", "ro"]),
    ]
    assert _mounts(s, "/r") == [
        ("/r", "/vol", ["rbind", "rprivate", "ro", "rro"]),
        ("/r/rw", "/vol/rw", ["rbind", "rprivate", "ro"]),
        ("/r/ro", "/vol/ro", ["rbind", "rprivate", "ro"]),
    ]
    assert "rootfsPropagation" not in s["linux"]


def test_rootfs_propagation_follows_the_volumes_as_containerd() -> None:
    def prop(*props: int) -> str | None:
        cfg = api_pb2.ContainerConfig(command=["sh"])
        for i, p in enumerate(props):
            cfg.mounts.add(container_path=f"/m{i}", host_path=f"/h{i}", propagation=p)
        linux: dict[str, Any] = _spec(cfg, [f"/h{i}" for i in range(len(props))])["linux"]
        return linux.get("rootfsPropagation")

    assert prop(P.PROPAGATION_PRIVATE) is None
    assert prop(P.PROPAGATION_PRIVATE, P.PROPAGATION_HOST_TO_CONTAINER) == "rslave"
    assert prop(P.PROPAGATION_HOST_TO_CONTAINER, P.PROPAGATION_BIDIRECTIONAL) == "rshared"


def test_a_localhost_profile_sent_by_criv_is_used_not_the_path() -> None:
    cfg = api_pb2.ContainerConfig(command=["sh"])
    sc = cfg.linux.security_context
    sc.seccomp.profile_type = api_pb2.SecurityProfile.Localhost
    sc.seccomp.localhost_ref = "/host/only/profile.json"  # not readable here
    rules = [{"names": ["sethostname"], "action": "SCMP_ACT_ERRNO"}]
    prof = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": rules}
    s = _spec(cfg, [], seccomp_profile=json.dumps(prof).encode())
    assert s["linux"]["seccomp"] == prof
