"""Run a host command from the event loop without blocking it."""

from __future__ import annotations

import asyncio


async def run_command(*argv: str, merge_stderr: bool = True) -> tuple[int, str]:
    """Run ``argv``; return (exit code, output stripped).

    ``merge_stderr`` folds stderr into the output (for error messages); turn it off when
    stdout is parsed and warnings on stderr would pollute it.
    """
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT if merge_stderr else asyncio.subprocess.DEVNULL,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace").strip()
