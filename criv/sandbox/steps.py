"""Run independent steps of an operation together without losing track of any.

``together`` waits for *every* step it started, even when one fails or the caller is
cancelled: a step still running on a worker thread (a process being spawned) would
otherwise finish after the undo ran and leave an orphan behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any


async def together(*aws: Awaitable[Any]) -> list[Any]:
    """Run ``aws`` concurrently; their results in order. Every one has finished when this
    returns or raises: on a failure, the first error (by position) is raised once all are
    done; on cancellation, they are left to finish (they are undone after) and the
    cancellation is re-raised."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.shield(asyncio.wait(tasks))
    except asyncio.CancelledError:
        # not cancelled themselves: a cancelled task's worker thread would run on unseen
        await asyncio.wait(tasks)
        for t in tasks:
            if not t.cancelled():
                t.exception()  # retrieved: no "exception never retrieved" noise
        raise
    errors = [None if t.cancelled() else t.exception() for t in tasks]  # all retrieved
    for t, e in zip(tasks, errors, strict=True):
        if t.cancelled():
            raise asyncio.CancelledError()
        if e is not None:
            raise e
    return [t.result() for t in tasks]
