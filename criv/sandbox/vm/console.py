"""Reading a pod VM's serial console log, which the guest writes: bounded, from the end."""

from __future__ import annotations

import os
from pathlib import Path

TAIL_BYTES = 1500


def console_tail(path: Path, n: int = TAIL_BYTES) -> str:
    """The last ``n`` bytes of the console log (never the whole file: the guest decides
    how big it is). Blocking: call it off the event loop."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - n))
            return f.read(n).decode(errors="replace").strip()
    except OSError:
        return ""
