"""RuntimeReady and NetworkReady: can criv run containers and pods' networks right now?

:class:`NodeReadiness` is what Status asks; it works each answer out again only when a
file the answer came from changed (:mod:`criv.statmemo`).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from criv.config import Config
from criv.network.readiness import Readiness, network_readiness_from
from criv.statmemo import StatMemo


def binaries_readiness(cfg: Config) -> tuple[Readiness, list[str] | None]:
    """crun and the agent installed; when they are, the paths they were found at."""
    crun = shutil.which(cfg.runtime.crun)
    if crun is None:
        return Readiness(
            False, "OCIRuntimeMissing", f"OCI runtime {cfg.runtime.crun!r} not found in PATH"
        ), None
    agent = shutil.which("criv-agent") or str(Path(sys.executable).parent / "criv-agent")
    if not Path(agent).exists():
        return Readiness(False, "AgentMissing", "criv-agent is not installed"), None
    return Readiness(True), [crun, agent]


def state_dir_readiness(cfg: Config) -> Readiness:
    # asked each time: a read-only remount changes no stamp
    if not os.access(cfg.state_dir, os.W_OK):
        return Readiness(False, "StateDirNotWritable", f"{cfg.state_dir} is not writable")
    return Readiness(True)


class NodeReadiness:
    def __init__(self, cfg: Config, clock: Callable[[], int] = time.time_ns) -> None:
        self._cfg = cfg
        self._binaries = StatMemo(partial(binaries_readiness, cfg), clock)
        self._network = StatMemo(partial(network_readiness_from, cfg.cni), clock)

    def runtime(self) -> Readiness:
        r = self._binaries.get()
        return state_dir_readiness(self._cfg) if r.ready else r

    def network(self) -> Readiness:
        return self._network.get()
