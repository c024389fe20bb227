"""Copying between bytes and the scattered guest buffers of a descriptor chain."""

from __future__ import annotations


def scatter(views: list[memoryview], data: bytes) -> None:
    """Copy ``data`` across ``views`` (the caller checked the total size)."""
    pos = 0
    for v in views:
        n = min(len(v), len(data) - pos)
        v[:n] = data[pos : pos + n]
        pos += n
        if pos == len(data):
            return


def gather(views: list[memoryview], n: int) -> bytes:
    out = bytearray()
    for v in views:
        out += v[: n - len(out)]
        if len(out) >= n:
            break
    return bytes(out)


def split(
    views: list[memoryview], at: int, limit: int
) -> tuple[list[memoryview], list[memoryview]]:
    """Split ``views`` into the first ``at`` bytes and at most ``limit`` bytes after them."""
    head: list[memoryview] = []
    tail: list[memoryview] = []
    for v in views:
        if at > 0:
            if len(v) <= at:
                head.append(v)
                at -= len(v)
                continue
            head.append(v[:at])
            v = v[at:]
            at = 0
        if limit <= 0:
            break
        if len(v) > limit:
            v = v[:limit]
        tail.append(v)
        limit -= len(v)
    return head, tail
