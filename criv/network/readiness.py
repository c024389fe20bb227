"""NetworkReady: is there a usable CNI configuration with its plugins installed?"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from criv.config import CniConfig


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reason: str = ""
    message: str = ""


def find_plugin(name: str, bin_dirs: list[str]) -> Path | None:
    for d in bin_dirs:
        p = Path(d) / name
        if p.is_file():
            return p
    return None


def load_default_network(cfg: CniConfig) -> tuple[Path, dict[str, object]] | None:
    """The first .conflist/.conf in conf_dir (lexical order, as containerd picks it)."""
    conf_dir = Path(cfg.conf_dir)
    if not conf_dir.is_dir():
        return None
    for f in sorted(conf_dir.iterdir()):
        if f.suffix not in (".conflist", ".conf", ".json") or not f.is_file():
            continue
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            return f, data
    return None


def network_readiness(cfg: CniConfig) -> Readiness:
    found = load_default_network(cfg)
    if found is None:
        return Readiness(
            False, "NetworkPluginNotReady", f"no valid CNI network config in {cfg.conf_dir}"
        )
    path, data = found
    plugins = data.get("plugins")
    if not isinstance(plugins, list):
        plugins = [data]
    for p in plugins:
        kind = p.get("type") if isinstance(p, dict) else None
        if not isinstance(kind, str):
            return Readiness(False, "NetworkPluginNotReady", f"{path}: a plugin has no type")
        if find_plugin(kind, cfg.bin_dirs) is None:
            return Readiness(
                False,
                "NetworkPluginNotReady",
                f"{path}: CNI plugin {kind!r} not found in {', '.join(cfg.bin_dirs)}",
            )
    return Readiness(True)
