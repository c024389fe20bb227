"""Open one data connection to an agent for streaming (exec/attach stdio, port-forward).

The handshake is the log follower's (:func:`criv.agent.logstream.open_stream`); this
only builds the ``StreamOpen`` so that callers outside ``criv/agent`` need no protobuf.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from criv.agent.logstream import open_stream
from criv_agent.api.agent.v1 import agent_pb2

StreamKind = Literal["stdio", "port_forward"]

_KINDS = {"stdio": agent_pb2.StreamOpen.STDIO, "port_forward": agent_pb2.StreamOpen.PORT_FORWARD}


async def open_data_stream(
    endpoint: str,
    kind: StreamKind,
    container_id: str = "",
    port: int = 0,
    exec_id: str = "",
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to the agent's data ``endpoint`` (a unix socket path) and open a stream.

    ``stdio`` with an ``exec_id`` runs that exec; with only ``container_id`` it attaches
    to the container's own stdio. Raises StreamRefused with the agent's reason, OSError
    or TimeoutError when the agent cannot be reached.
    """
    req = agent_pb2.StreamOpen(
        kind=_KINDS[kind], container_id=container_id, port=port, exec_id=exec_id
    )
    return await open_stream(endpoint, req)
