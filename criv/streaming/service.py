"""The CRI side of streaming: validate Exec/Attach/PortForward and hand out URLs.

``criv/cri/runtime_service.py`` converts the proto requests to these plain arguments
(this package stays proto-free) and returns the URL in the response.
"""

from __future__ import annotations

from collections.abc import Sequence

from criv.errors import InvalidArgument
from criv.streaming.requests import AttachRequest, ExecRequest, PortForwardRequest
from criv.streaming.server import StreamingServer


def _check_stdio(container_id: str, tty: bool, stdin: bool, stdout: bool, stderr: bool) -> None:
    # The same checks, and messages, as the kubelet streaming library.
    if not container_id:
        raise InvalidArgument("missing required container_id")
    if tty and stderr:
        raise InvalidArgument("tty and stderr cannot both be true")
    if not (stdin or stdout or stderr):
        raise InvalidArgument("one of stdin, stdout, or stderr must be set")


class StreamingService:
    def __init__(self, server: StreamingServer) -> None:
        self._server = server

    @property
    def base_url(self) -> str:
        """scheme://host:port of the server ("" before it started)."""
        return self._server.base_url

    def exec_url(
        self,
        container_id: str,
        cmd: Sequence[str],
        *,
        tty: bool = False,
        stdin: bool = False,
        stdout: bool = True,
        stderr: bool = True,
    ) -> str:
        _check_stdio(container_id, tty, stdin, stdout, stderr)
        if not cmd:
            raise InvalidArgument("cmd must not be empty")
        return self._server.url_for(
            ExecRequest(container_id, list(cmd), tty, stdin, stdout, stderr)
        )

    def attach_url(
        self,
        container_id: str,
        *,
        tty: bool = False,
        stdin: bool = False,
        stdout: bool = True,
        stderr: bool = True,
    ) -> str:
        _check_stdio(container_id, tty, stdin, stdout, stderr)
        return self._server.url_for(AttachRequest(container_id, tty, stdin, stdout, stderr))

    def port_forward_url(self, sandbox_id: str, ports: Sequence[int] = ()) -> str:
        if not sandbox_id:
            raise InvalidArgument("missing required pod_sandbox_id")
        for p in ports:
            if not 0 < p < 65536:
                raise InvalidArgument(f"invalid port {p}")
        return self._server.url_for(PortForwardRequest(sandbox_id, list(ports)))
