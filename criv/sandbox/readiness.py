"""RuntimeReady: can criv run containers right now?"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from criv.config import Config
from criv.network.readiness import Readiness


def runtime_readiness(cfg: Config) -> Readiness:
    if shutil.which(cfg.runtime.crun) is None:
        return Readiness(
            False, "OCIRuntimeMissing", f"OCI runtime {cfg.runtime.crun!r} not found in PATH"
        )
    agent = shutil.which("criv-agent") or str(Path(sys.executable).parent / "criv-agent")
    if not Path(agent).exists():
        return Readiness(False, "AgentMissing", "criv-agent is not installed")
    state = Path(cfg.state_dir)
    if not os.access(state, os.W_OK):
        return Readiness(False, "StateDirNotWritable", f"{state} is not writable")
    return Readiness(True)
