"""The cached requests a token stands for (built from the CRI requests, proto-free)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ExecRequest:
    container_id: str
    cmd: list[str]
    tty: bool = False
    stdin: bool = False
    stdout: bool = True
    stderr: bool = True


@dataclass(frozen=True)
class AttachRequest:
    container_id: str
    tty: bool = False
    stdin: bool = False
    stdout: bool = True
    stderr: bool = True


@dataclass(frozen=True)
class PortForwardRequest:
    sandbox_id: str
    # Only the legacy WebSocket port-forward uses this list; SPDY takes ports per stream.
    ports: list[int] = field(default_factory=list)


StreamRequest = ExecRequest | AttachRequest | PortForwardRequest
