"""`criv vm-image ...` run as the operator runs it: the venv's `criv` against a test
daemon's config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CRIV = Path(sys.executable).parent / "criv"


def vm_image_cli(
    config: Path, command: str, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CRIV), "vm-image", command, *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
