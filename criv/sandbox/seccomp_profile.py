"""A container's seccomp ``Localhost`` profile, read on the host.

CRI's ``localhost_ref`` is a host path (kubelet's ``<root>/seccomp/...``). The agent of
a vm pod cannot reach it, so criv reads it here and hands the bytes to the agent
(``CreateContainerRequest.seccomp_profile_json``) in both isolation modes, and checks
it the way a caller can act on: a missing file is NOT_FOUND, anything else wrong
(not a regular file, a symlink as last component, too big, not a JSON object with a
``defaultAction``) INVALID_ARGUMENT.

The agent turns the profile into the OCI ``linux.seccomp`` object (Docker format
accepted); criv checks only what is needed to fail early with a clear message.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import stat

from criv.errors import InvalidArgument, NotFound

# Docker's default profile is ~20 KiB; a profile listing every syscall with arguments
# stays far below this. The agent's gRPC message must carry it too.
MAX_PROFILE_BYTES = 1 << 20


def _read(path: str) -> bytes:
    if not os.path.isabs(path):
        raise InvalidArgument(f"seccomp localhost profile {path[:200]!r} is not an absolute path")
    try:
        # O_NOFOLLOW: a profile swapped for a link to some other host file is refused;
        # O_NONBLOCK: a FIFO planted there does not hang the daemon
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"seccomp localhost profile {path[:200]} does not exist") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InvalidArgument(
                f"seccomp localhost profile {path[:200]} is a symlink; name the file itself"
            ) from None
        raise InvalidArgument(f"seccomp localhost profile {path[:200]}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"seccomp localhost profile {path[:200]} is not a regular file")
        if st.st_size > MAX_PROFILE_BYTES:
            raise InvalidArgument(
                f"seccomp localhost profile {path[:200]} is {st.st_size} bytes "
                f"(at most {MAX_PROFILE_BYTES})"
            )
        data = os.read(fd, MAX_PROFILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_PROFILE_BYTES:  # grew between fstat and read
        raise InvalidArgument(f"seccomp localhost profile {path[:200]} is too big")
    check_profile(data, path)
    return data


def check_profile(data: bytes, path: str) -> None:
    """A JSON object with a string ``defaultAction``, or INVALID_ARGUMENT."""
    try:
        prof = json.loads(data)
    except ValueError as e:
        raise InvalidArgument(f"seccomp localhost profile {path[:200]} is not JSON: {e}") from None
    if not isinstance(prof, dict):
        raise InvalidArgument(f"seccomp localhost profile {path[:200]} is not a JSON object")
    if not isinstance(prof.get("defaultAction"), str):
        raise InvalidArgument(
            f"seccomp localhost profile {path[:200]} has no defaultAction (OCI or Docker format)"
        )
    if not isinstance(prof.get("syscalls", []), list | None):
        raise InvalidArgument(f"seccomp localhost profile {path[:200]}: syscalls is not a list")


async def load(path: str) -> bytes:
    """The profile's bytes (b"" for no path), read off the event loop."""
    if not path:
        return b""
    return await asyncio.to_thread(_read, path)
