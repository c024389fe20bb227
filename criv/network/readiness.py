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
    return _load_default_network(cfg, [])


def _load_default_network(
    cfg: CniConfig, read: list[Path]
) -> tuple[Path, dict[str, object]] | None:
    """:func:`load_default_network`, adding to ``read`` every file it looked into."""
    conf_dir = Path(cfg.conf_dir)
    if not conf_dir.is_dir():
        return None
    for f in sorted(conf_dir.iterdir()):
        if f.suffix not in (".conflist", ".conf", ".json"):
            continue
        read.append(f)  # even one that is not a file yet (a symlink whose target is not)
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            return f, data
    return None


def network_readiness(cfg: CniConfig) -> Readiness:
    return network_readiness_from(cfg)[0]


def network_readiness_from(cfg: CniConfig) -> tuple[Readiness, list[str] | None]:
    """NetworkReady and, when ready, the paths it follows from (for criv.statmemo): the
    config directory, the config files up to the one chosen, and each plugin found."""
    read: list[Path] = []
    found = _load_default_network(cfg, read)
    if found is None:
        return Readiness(
            False, "NetworkPluginNotReady", f"no valid CNI network config in {cfg.conf_dir}"
        ), None
    path, data = found
    plugins = data.get("plugins")
    if not isinstance(plugins, list):
        plugins = [data]
    for p in plugins:
        kind = p.get("type") if isinstance(p, dict) else None
        if not isinstance(kind, str):
            return Readiness(False, "NetworkPluginNotReady", f"{path}: a plugin has no type"), None
        exe = find_plugin(kind, cfg.bin_dirs)
        if exe is None:
            return Readiness(
                False,
                "NetworkPluginNotReady",
                f"{path}: CNI plugin {kind!r} not found in {', '.join(cfg.bin_dirs)}",
            ), None
        read.append(exe)
    return Readiness(True), [cfg.conf_dir, *map(str, read)]
