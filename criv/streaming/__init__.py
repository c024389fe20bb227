"""The exec/attach/port-forward streaming server (SPDY/3.1 and WebSocket); docs/streaming.md.

Entry points: :class:`criv.streaming.server.StreamingServer` (start/stop with the
daemon), :class:`criv.streaming.service.StreamingService` (validates CRI requests and
issues URLs), and the backend interface in :mod:`criv.streaming.backend`.
"""
