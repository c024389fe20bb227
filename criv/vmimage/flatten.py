"""Flatten a stopped vm-image container's disk (its qcow2 overlay over the shared base)
into one compressed qcow2 with no backing file: what `criv vm-image commit` stores.

The overlay is hostile (see :mod:`criv.vmimage.qcow2`): first it is taken from QEMU's
user (root-owned, 0600: no later open by a ``criv-qemu`` process), then its header and
the base's are checked by criv's own bounded read, then ``qemu-img convert -c`` reads
the chain pinned by a ``json:`` filename (overlay, base and formats given, no name from
a header followed), and the result's header is checked again: a qcow2 of the base's
virtual size with no backing file and no data file.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

from criv.commands import run_command
from criv.errors import FailedPrecondition, Internal
from criv.vmimage.qcow2 import check_header, convert_argv, read_header, virtual_size

FLATTEN_TIMEOUT = 3600.0


def _revoke(overlay: Path) -> None:
    """The overlay becomes root's alone (QEMU, its writer, has exited)."""
    st = os.lstat(overlay)
    if not stat.S_ISREG(st.st_mode):
        raise FailedPrecondition(f"{overlay} is not a regular file")
    os.chown(overlay, 0, 0, follow_symlinks=False)
    os.chmod(overlay, 0o600, follow_symlinks=False)


def _check_inputs(overlay: Path, base: Path, base_format: str) -> int:
    """Check both headers; the base's virtual size, which the overlay's must equal."""
    size = virtual_size(base, base_format, "the base disk")
    h = read_header(overlay, "the container's overlay")
    check_header(h, "the container's overlay")
    if h.size != size:
        raise FailedPrecondition(
            f"the container's overlay is {h.size} bytes, its base {size}: not its overlay"
        )
    return size


def _check_output(out: Path, size: int) -> None:
    h = read_header(out, "the flattened disk")
    check_header(h, "the flattened disk")
    if h.has_backing or h.size != size:
        raise Internal(f"qemu-img made {out} with a backing file or another size")


async def flatten(
    overlay: Path, base: Path, base_format: str, out: Path, timeout: float = FLATTEN_TIMEOUT
) -> None:
    """Write ``out``: ``overlay`` over ``base`` as one compressed qcow2 (no backing)."""
    await asyncio.to_thread(_revoke, overlay)
    size = await asyncio.to_thread(_check_inputs, overlay, base, base_format)
    rc, output = await run_command(*convert_argv(overlay, base, base_format, out), timeout=timeout)
    if rc != 0:
        raise Internal(f"qemu-img convert of {overlay}: {output.strip()[-500:]}")
    await asyncio.to_thread(_check_output, out, size)
