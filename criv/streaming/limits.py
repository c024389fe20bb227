"""What one peer may make the streaming server hold: connection slots, idle connections,
queued pongs, and the per-connection SPDY limits (docs/streaming.md, "Limits").

The port is on the node network and answers before any token is checked, so every
resource a peer can pin is counted here; the protocol modules ask, this module decides.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from criv.config import StreamingConfig

log = logging.getLogger("criv.streaming.limits")

# Bytes a stream that nobody reads yet may hold (a port-forward data stream waiting for
# its error stream): client-go sends nothing before both exist, so this is slack only.
PENDING_STREAM_BUFFER = 64 * 1024
# Pongs queued behind unsent bytes before the peer counts as flooding without reading.
# A stalled but honest client pings every 5 s: 4096 pings is 5.7 h, past the idle timeout.
MAX_QUEUED_PONGS = 4096


@dataclass(frozen=True)
class SpdyLimits:
    """Per-connection SPDY limits; the defaults are the config defaults."""

    max_streams: int = 512
    stream_buffer: int = 1024 * 1024
    connection_buffer: int = 8 * 1024 * 1024
    pending_buffer: int = PENDING_STREAM_BUFFER
    max_queued_pongs: int = MAX_QUEUED_PONGS

    @classmethod
    def from_config(cls, config: StreamingConfig) -> SpdyLimits:
        stream = config.stream_buffer_kib * 1024
        return cls(
            max_streams=config.max_streams_per_connection,
            stream_buffer=stream,
            connection_buffer=config.connection_buffer_kib * 1024,
            pending_buffer=min(PENDING_STREAM_BUFFER, stream),
        )


@dataclass(frozen=True)
class Refusal:
    status: int
    reason: str
    message: str


class ConnectionLimiter:
    """Connection slots, in total and per peer address, held from accept to close."""

    def __init__(self, total: int, per_peer: int) -> None:
        self.total = total
        self.per_peer = per_peer
        self.active = 0
        self._by_peer: dict[str, int] = {}

    def acquire(self, peer: str) -> Refusal | None:
        """Take a slot for ``peer``, or say why not (then nothing is held)."""
        if self.active >= self.total:
            return Refusal(503, "Service Unavailable", "too many streaming connections")
        if self._by_peer.get(peer, 0) >= self.per_peer:
            return Refusal(429, "Too Many Requests", "too many streaming connections from you")
        self.active += 1
        self._by_peer[peer] = self._by_peer.get(peer, 0) + 1
        return None

    def release(self, peer: str) -> None:
        n = self._by_peer.get(peer, 0)
        if n <= 0:
            return
        self.active -= 1
        if n == 1:
            del self._by_peer[peer]  # no entry per peer ever seen: the map stays small
        else:
            self._by_peer[peer] = n - 1

    def held_by(self, peer: str) -> int:
        return self._by_peer.get(peer, 0)


class PongGuard:
    """Counts pings answered while the peer has not read what we sent before.

    Pongs are tiny, so queueing a few costs nothing; a peer that keeps pinging without
    reading would otherwise grow our write buffer without bound. Any ping that finds the
    buffer empty starts the count again.
    """

    def __init__(self, limit: int = MAX_QUEUED_PONGS) -> None:
        self.limit = limit
        self.queued = 0

    def allow(self, unsent_bytes: int) -> bool:
        """False once ``limit`` pongs in a row found unsent bytes: drop the peer."""
        if unsent_bytes == 0:
            self.queued = 0
            return True
        self.queued += 1
        return self.queued <= self.limit


class IdleWatch:
    """Calls ``on_idle`` once ``timeout`` seconds pass without :meth:`touch`.

    ``touch`` only stores the time (it runs for every data frame); the timer re-arms
    itself lazily when it fires early. A timeout of 0 or less never fires.
    """

    def __init__(self, timeout: float, on_idle: Callable[[], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self.timeout = timeout
        self._on_idle = on_idle
        self.last = self._loop.time()
        self.fired = False
        self._handle: asyncio.TimerHandle | None = None
        if timeout > 0:
            self._handle = self._loop.call_at(self.last + timeout, self._check)

    def touch(self) -> None:
        self.last = self._loop.time()

    def _check(self) -> None:
        due = self.last + self.timeout
        if self._loop.time() < due:
            self._handle = self._loop.call_at(due, self._check)
            return
        self._handle = None
        self.fired = True
        self._on_idle()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class QuietLog:
    """Logs a recurring warning at most once per ``interval`` with a count of the rest, so
    a flood of refused peers cannot flood the log too."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._log = logger
        self._interval = interval
        self._next = 0.0
        self._suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        if self._suppressed:
            msg += f" ({self._suppressed} more like it suppressed)"
            self._suppressed = 0
        self._next = now + self._interval
        self._log.warning(msg, *args)
