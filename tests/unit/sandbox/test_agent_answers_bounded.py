"""What a hostile agent sends is bounded before criv keeps it (docs/security.md)."""

from __future__ import annotations

import pytest

from criv.agent import convert
from criv.errors import AgentError
from criv_agent.api.agent.v1 import agent_pb2
from criv_agent.api.runtime.v1 import api_pb2


def test_container_info_fields_are_clipped() -> None:
    info = agent_pb2.ContainerInfo(
        container_id="a" * 10_000, state=agent_pb2.EXITED, reason="r" * 10_000,
        message="m" * 1_000_000, created_at_ns=-5, exit_code=3,
    )  # fmt: skip
    got = convert.container_info(info, None)
    assert len(got.container_id) == convert.MAX_ID
    assert len(got.reason) == 128 and len(got.message) == convert.MAX_TEXT
    assert got.created_at_ns == 0 and got.exit_code == 3


def test_an_answer_about_another_container_is_refused() -> None:
    with pytest.raises(AgentError, match="asked about"):
        convert.container_info(agent_pb2.ContainerInfo(container_id="other"), "mine")


def test_oversized_resources_are_dropped_not_stored() -> None:
    small = agent_pb2.ContainerInfo(container_id="c")
    small.resources.CopyFrom(api_pb2.LinuxContainerResources(cpu_shares=2))
    assert convert.container_info(small, "c").resources == small.resources.SerializeToString()
    big = agent_pb2.ContainerInfo(container_id="c")
    big.resources.unified.update({f"k{i}": "v" * 100 for i in range(1000)})
    assert convert.container_info(big, "c").resources == b""


def test_container_user_is_kept_and_an_oversized_one_dropped() -> None:
    small = agent_pb2.ContainerInfo(container_id="c")
    small.user.linux.uid, small.user.linux.gid = 1000, 100
    small.user.linux.supplemental_groups.extend([100, 2])
    kept = convert.container_info(small, "c").user
    assert api_pb2.ContainerUser.FromString(kept) == small.user
    big = agent_pb2.ContainerInfo(container_id="c")
    big.user.linux.supplemental_groups.extend(range(1 << 30, (1 << 30) + 20_000))
    assert convert.container_info(big, "c").user == b""
