"""runtime.host_namespace_pods: its default follows runtime.host_pods; a contradiction
with it is a config error naming the key."""

from __future__ import annotations

import pytest

from criv.config import Config, parse_config
from criv.errors import ConfigError


def test_default_follows_host_pods() -> None:
    assert Config().runtime.host_namespace_pods == "host"
    assert parse_config("runtime: {host_pods: reject}").runtime.host_namespace_pods == "reject"
    cfg = parse_config("runtime: {host_namespace_pods: reject}")
    assert cfg.runtime.host_namespace_pods == "reject" and cfg.runtime.host_pods == "allow"


def test_host_with_host_pods_reject_is_refused() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config("runtime: {host_pods: reject, host_namespace_pods: host}")
    assert "runtime.host_namespace_pods" in str(e.value) and "host_pods" in str(e.value)


@pytest.mark.parametrize("value", ["vm", "", "allow", True])
def test_only_host_or_reject(value: object) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(f"runtime: {{host_namespace_pods: {value!r}}}")
    assert "runtime.host_namespace_pods" in str(e.value)
