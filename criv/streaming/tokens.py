"""Single-use, expiring tokens that stand for a validated Exec/Attach/PortForward request.

As the kubelet library does it: 6 random bytes as unpadded URL-safe base64 (8 chars),
one minute to live, at most 1000 live tokens, expired ones purged on every insert, and
the first lookup removes the token whatever happens next.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from criv.errors import Internal, ResourceExhausted
from criv.streaming.requests import StreamRequest

TOKEN_TTL = 60.0
MAX_TOKENS = 1000
TOKEN_BYTES = 6


def new_token() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(TOKEN_BYTES)).rstrip(b"=").decode()


@dataclass(frozen=True)
class _Entry:
    request: StreamRequest
    expires: float


class TokenCache:
    def __init__(
        self,
        ttl: float = TOKEN_TTL,
        capacity: int = MAX_TOKENS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl
        self._capacity = capacity
        self._clock = clock
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def insert(self, request: StreamRequest) -> str:
        now = self._clock()
        for tok in [t for t, e in self._entries.items() if e.expires <= now]:
            del self._entries[tok]
        if len(self._entries) >= self._capacity:
            raise ResourceExhausted("maximum number of in-flight requests exceeded")
        for _ in range(10):  # a collision in 2^48 is unlikely, but the library retries too
            token = new_token()
            if token not in self._entries:
                self._entries[token] = _Entry(request, now + self._ttl)
                return token
        raise Internal("failed to generate a unique streaming token")

    def consume(self, token: str) -> StreamRequest | None:
        """The request for ``token``, removing it; None if unknown, used or expired."""
        entry = self._entries.pop(token, None)
        if entry is None or entry.expires <= self._clock():
            return None
        return entry.request
