"""The backend process runs once per VM: what it imports is paid for in every one."""

from __future__ import annotations

import subprocess

from criv.vsock.process import VsockBackendProcess

# each would bring in more of the stdlib than the backend uses (dataclasses: inspect and
# ast; typing) or does not belong in it at all (site's path hooks, grpc, asyncio)
NOT_IN_THE_BACKEND = ("asyncio", "dataclasses", "grpc", "inspect", "site", "typing")


def test_the_backend_imports_only_what_it_uses() -> None:
    backend = VsockBackendProcess("/nonexistent/v.sock", "/nonexistent/u.sock", guest_cid=3)
    argv = backend.argv()
    # the interpreter with the backend's own flags, its environment, and its module imported
    interpreter = argv[: argv.index("-m")]
    code = "import sys, criv.vsock.backend; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run(
        [*interpreter, "-c", code],
        env=backend.environment(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "criv.vsock.backend" in out
    assert [m for m in out if m.split(".")[0] in NOT_IN_THE_BACKEND] == []
