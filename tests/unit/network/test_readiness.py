"""NodeReadiness: Status's NetworkReady follows the CNI config and plugins as they change."""

from __future__ import annotations

import json
import time
from pathlib import Path

from criv.config import CniConfig, Config
from criv.sandbox.readiness import NodeReadiness
from criv.statmemo import RACY_NS


def test_node_readiness_follows_the_cni_config(tmp_path: Path) -> None:
    conf = tmp_path / "net.d"
    conf.mkdir()
    bins = tmp_path / "bin"
    bins.mkdir()
    (bins / "bridge").write_text("")
    cfg = Config(cni=CniConfig(conf_dir=str(conf), bin_dirs=[str(bins)]))
    nodes = NodeReadiness(cfg, clock=lambda: time.time_ns() + 10 * RACY_NS)
    assert nodes.network().reason == "NetworkPluginNotReady"
    listing = conf / "10-a.conflist"
    listing.write_text(json.dumps({"name": "n", "plugins": [{"type": "bridge"}]}))
    assert nodes.network().ready
    assert nodes.network().ready  # kept
    (bins / "bridge").unlink()  # a plugin the config needs goes
    assert "'bridge' not found" in nodes.network().message
    (bins / "bridge").write_text("")
    assert nodes.network().ready
    # a config sorted before the chosen one, rewritten in place, takes over
    (conf / "05-b.conf").write_text("not json")
    assert nodes.network().ready
    (conf / "05-b.conf").write_text(json.dumps({"name": "b", "type": "nosuch"}))
    assert "'nosuch' not found" in nodes.network().message
