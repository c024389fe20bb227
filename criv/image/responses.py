"""Reading a registry's responses: bodies read with a bound, the registry's own error
message out of one, and the most telling of the errors met across a host's endpoints.
"""

from __future__ import annotations

import json

import aiohttp

from criv.errors import DigestMismatch, ImageError, ImageNotFound, RegistryAuthError, RegistryError


def error_text(body: bytes) -> str:
    """The registry's own message: ``CODE: message`` from its error JSON, else the text."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body.decode(errors="replace").strip()[:500]
    errs = doc.get("errors") if isinstance(doc, dict) else None
    if isinstance(errs, list) and errs:
        parts = []
        for e in errs:
            if isinstance(e, dict):
                parts.append(f"{e.get('code', '')}: {e.get('message', '')}".strip(": "))
        return "; ".join(parts)
    if isinstance(doc, dict):
        for key in ("message", "error", "details"):
            if isinstance(doc.get(key), str):
                return str(doc[key])
    return body.decode(errors="replace").strip()[:500]


async def read_at_most(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, up to ``limit`` bytes (one read() returns only what has arrived)."""
    chunks: list[bytes] = []
    n = 0
    while n < limit:
        chunk = await resp.content.read(limit - n)
        if not chunk:
            break
        chunks.append(chunk)
        n += len(chunk)
    return b"".join(chunks)


class Failures:
    """Errors met across endpoints; the most telling one is raised at the end."""

    def __init__(self) -> None:
        self.errors: list[Exception] = []

    def add(self, e: Exception) -> None:
        self.errors.append(e)

    def raise_best(self, what: str) -> None:
        for cls in (RegistryAuthError, DigestMismatch, ImageNotFound, ImageError):
            for e in self.errors:
                if isinstance(e, cls):
                    others = [str(x) for x in self.errors if x is not e]
                    msg = str(e) + (f" (also tried: {'; '.join(others)})" if others else "")
                    raise type(e)(msg) from e
        raise RegistryError(f"{what}: no registry endpoint answered")
