"""The daemon through its real socket: lifecycle, locking, config refusal, basic RPCs."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest

from criv import __version__
from tests.support.daemon import CRIV, CrivProcess, api_pb2

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _conditions(resp: Any) -> dict[str, Any]:
    return {c.type: c for c in resp.status.conditions}


def test_version(criv: CrivProcess) -> None:
    v = criv.runtime.Version(api_pb2.VersionRequest())
    assert v.runtime_name == "criv"
    assert v.runtime_version == __version__
    assert v.runtime_api_version == "v1"


def test_socket_mode_and_removal_on_sigterm(criv: CrivProcess) -> None:
    mode = stat.S_IMODE(criv.socket.stat().st_mode)
    assert mode == 0o660
    assert criv.stop() == 0
    assert not criv.socket.exists()
    assert "criv stopped" in criv.logs()


def test_status_reports_network_not_ready_without_cni_config(
    criv_factory: Any, tmp_path: Path
) -> None:
    empty = tmp_path / "cni-empty"
    empty.mkdir()
    c = criv_factory({"cni": {"conf_dir": str(empty)}})
    conds = _conditions(c.runtime.Status(api_pb2.StatusRequest()))
    assert conds["RuntimeReady"].status is True
    assert conds["NetworkReady"].status is False
    assert conds["NetworkReady"].reason == "NetworkPluginNotReady"
    assert str(empty) in conds["NetworkReady"].message


def test_status_network_ready_with_valid_conflist(criv_factory: Any, tmp_path: Path) -> None:
    conf = tmp_path / "cni"
    conf.mkdir()
    (conf / "10-test.conflist").write_text(
        json.dumps(
            {
                "cniVersion": "1.0.0",
                "name": "t",
                "plugins": [{"type": "loopback"}, {"type": "portmap"}],
            }
        )
    )
    c = criv_factory({"cni": {"conf_dir": str(conf), "bin_dirs": ["/usr/lib/cni"]}})
    conds = _conditions(c.runtime.Status(api_pb2.StatusRequest()))
    assert conds["NetworkReady"].status is True, conds["NetworkReady"].message

    (conf / "10-test.conflist").write_text(
        json.dumps({"cniVersion": "1.0.0", "name": "t", "plugins": [{"type": "nosuch"}]})
    )
    conds = _conditions(c.runtime.Status(api_pb2.StatusRequest()))
    assert conds["NetworkReady"].status is False
    assert "nosuch" in conds["NetworkReady"].message


def test_status_verbose_info_is_json(criv: CrivProcess) -> None:
    resp = criv.runtime.Status(api_pb2.StatusRequest(verbose=True))
    info = json.loads(resp.info["info"])
    assert info["version"] == __version__
    assert info["config"]["socket"] == str(criv.socket)


def test_runtime_config_reports_cgroup_driver(criv_factory: Any) -> None:
    c = criv_factory({"cgroup_driver": "systemd"})
    resp = c.runtime.RuntimeConfig(api_pb2.RuntimeConfigRequest())
    assert resp.linux.cgroup_driver == api_pb2.SYSTEMD


def test_pod_cidr_survives_restart(criv: CrivProcess) -> None:
    criv.runtime.UpdateRuntimeConfig(
        api_pb2.UpdateRuntimeConfigRequest(
            runtime_config=api_pb2.RuntimeConfig(
                network_config=api_pb2.NetworkConfig(pod_cidr="10.244.3.0/24")
            )
        )
    )
    criv.restart()
    info = json.loads(criv.runtime.Status(api_pb2.StatusRequest(verbose=True)).info["info"])
    assert info["pod_cidr"] == "10.244.3.0/24"


def test_unimplemented_rpc_says_what_is_missing(criv: CrivProcess) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        criv.runtime.CheckpointContainer(api_pb2.CheckpointContainerRequest(container_id="x"))
    assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "CheckpointContainer" in exc.value.details()


def _serve_once(config: dict[str, Any], path: Path) -> subprocess.CompletedProcess[str]:
    """Run `criv serve` with ``config``; it is expected to refuse and exit."""
    path.write_text(json.dumps(config))
    return subprocess.run(
        [str(CRIV), "serve", "--config", str(path)], capture_output=True, text=True, timeout=60
    )


def test_second_criv_on_same_socket_refuses(criv_factory: Any) -> None:
    first = criv_factory()
    second = criv_factory({"socket": str(first.socket)}, start=False)
    r = _serve_once(second.config, second.config_path)
    assert r.returncode != 0
    assert "already running" in r.stderr and str(first.socket) in r.stderr
    # the first one is unharmed
    assert first.runtime.Version(api_pb2.VersionRequest()).runtime_name == "criv"


def test_second_criv_on_same_state_dir_refuses(criv_factory: Any) -> None:
    first = criv_factory()
    second = criv_factory({"state_dir": str(first.state_dir)}, start=False)
    r = _serve_once(second.config, second.config_path)
    assert r.returncode != 0
    assert "already running" in r.stderr and "state dir" in r.stderr


def test_bad_config_refuses_to_start_and_names_the_key(tmp_path: Path) -> None:
    r = _serve_once({"log": {"level": "loud"}}, tmp_path / "bad.yaml")
    assert r.returncode == 1
    assert "'log.level'" in r.stderr
