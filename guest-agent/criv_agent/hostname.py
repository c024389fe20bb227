"""The pod hostname's one rule, for the host's CRI checks (criv/cri/validate.py) and the
agent's (spare.py): empty (keep the guest's), or an RFC 1123 host name of at most 64
bytes, what ``sethostname`` takes."""

from __future__ import annotations

import re

HOSTNAME_MAX = 64
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def hostname_problem(name: str) -> str:
    """What is wrong with ``name`` as a pod hostname, to follow it in a message ("": it
    is fine)."""
    if len(name.encode()) > HOSTNAME_MAX:
        return f"is longer than {HOSTNAME_MAX} bytes"
    if name and not all(_LABEL.fullmatch(label) for label in name.split(".")):
        return "is not an RFC 1123 host name"
    return ""
