"""Flatten a stopped vm-image container's disk (its qcow2 overlay over the shared base)
into one compressed qcow2 with no backing file: what `criv vm-image commit` stores.

The overlay is hostile (see :mod:`criv.vmimage.qcow2`): first it is taken from QEMU's
user (root-owned, 0600: no later open by a ``criv-qemu`` process) and copied, bounded in
size, beside the output (a directory only root may write: a process that still held the
overlay open cannot change what is checked after the check), then the copy's header and
the base's are checked by criv's own bounded read, then ``qemu-img convert -c`` reads
the chain pinned by a ``json:`` filename (the copy, the base and their formats given, no
name from a header followed), and the result's header is checked again: a qcow2 of the
base's virtual size with no backing file and no data file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
from pathlib import Path

from criv.commands import run_command
from criv.errors import FailedPrecondition, Internal
from criv.vmimage.qcow2 import check_header, convert_argv, read_header, virtual_size

FLATTEN_TIMEOUT = 3600.0


def max_overlay_bytes(size: int) -> int:
    """The largest overlay file of a ``size``-byte disk criv copies: every cluster written,
    plus room for qcow2's tables (1/8192 of the size for L2, less for refcounts)."""
    return size + size // 4 + (256 << 20)


def _take(overlay: Path, copy: Path, limit: int) -> None:
    """The overlay becomes root's alone (QEMU, its writer, has exited), then ``copy`` of
    it, at most ``limit`` bytes, is what the rest reads."""
    try:
        fd = os.open(overlay, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if isinstance(e, FileNotFoundError) or e.errno == errno.ELOOP:
            raise FailedPrecondition(f"{overlay} is not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FailedPrecondition(f"{overlay} is not a regular file")
        os.fchown(fd, 0, 0)
        os.fchmod(fd, 0o600)
        if st.st_size > limit:
            raise FailedPrecondition(f"the container's overlay is {st.st_size} bytes, over {limit}")
        out = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            left = limit + 1
            while left > 0 and (n := os.copy_file_range(fd, out, min(left, 1 << 30))) > 0:
                left -= n
        finally:
            os.close(out)
        if left <= 0:
            raise FailedPrecondition(f"the container's overlay grew past {limit} bytes")
    finally:
        os.close(fd)


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
    """Write ``out``: ``overlay`` over ``base`` as one compressed qcow2 (no backing).
    ``out``'s directory must be root's alone: the overlay's copy is made there."""
    limit = max_overlay_bytes(
        await asyncio.to_thread(virtual_size, base, base_format, "the base disk")
    )
    copy = out.with_name(f".{out.name}.overlay")
    try:
        await asyncio.to_thread(_take, overlay, copy, limit)
        size = await asyncio.to_thread(_check_inputs, copy, base, base_format)
        argv = convert_argv(copy, base, base_format, out)
        rc, output = await run_command(*argv, timeout=timeout)
        if rc != 0:
            raise Internal(f"qemu-img convert of {overlay}: {output.strip()[-500:]}")
        await asyncio.to_thread(_check_output, out, size)
    finally:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(copy.unlink)
