"""Upgrade negotiation: which subprotocol a request gets, or which refusal, as bytes.

Pure functions of the request head, with the kubelet library's answers: no protocol
header -> 400; nothing supported offered -> 403 (SPDY: with the accepted versions);
missing upgrade headers -> 400.
"""

from __future__ import annotations

from dataclasses import dataclass

from criv.streaming.http import HttpRequest, offered_spdy_protocols, response, text_response
from criv.streaming.portforward import PROTOCOL as PORTFORWARD_PROTOCOL
from criv.streaming.remotecommand import SPDY_PROTOCOLS
from criv.streaming.requests import PortForwardRequest, StreamRequest
from criv.streaming.websocket import accept_key
from criv.streaming.wschannels import EXEC_PROTOCOLS, PORTFORWARD_PROTOCOLS, TUNNEL_PORTFORWARD


@dataclass(frozen=True)
class Upgrade:
    protocol: str  # "" for the legacy no-subprotocol WebSocket offer
    head: bytes  # the 101 response


Outcome = Upgrade | bytes  # bytes: the refusal to send before closing


def spdy_upgrade(req: HttpRequest, request: StreamRequest) -> Outcome:
    offered = offered_spdy_protocols(req)
    if not offered:
        return text_response(
            400,
            "Bad Request",
            "unable to upgrade: header X-Stream-Protocol-Version does not exist or is empty\n",
        )
    supported = (
        (PORTFORWARD_PROTOCOL,) if isinstance(request, PortForwardRequest) else SPDY_PROTOCOLS
    )
    chosen = next((p for p in offered if p in supported), None)
    if chosen is None:
        body = (
            f"unable to upgrade: unable to negotiate protocol: client supports "
            f"[{' '.join(offered)}], server accepts [{' '.join(supported)}]"
        )
        accepted = [("X-Accepted-Stream-Protocol-Versions", p) for p in supported]
        return text_response(403, "Forbidden", body + "\n", accepted)
    connection = " ".join(req.get_all("connection")).lower()
    upgrade = " ".join(req.get_all("upgrade")).lower()
    if "upgrade" not in connection or "spdy/3.1" not in upgrade:
        return text_response(400, "Bad Request", "unable to upgrade: missing upgrade headers\n")
    headers = [
        ("Connection", "Upgrade"),
        ("Upgrade", "SPDY/3.1"),
        ("X-Stream-Protocol-Version", chosen),
    ]
    return Upgrade(chosen, response(101, "Switching Protocols", headers))


def websocket_upgrade(req: HttpRequest, request: StreamRequest, max_ports: int) -> Outcome:
    if req.method != "GET":
        return text_response(405, "Method Not Allowed", "method not allowed\n")
    key = req.get("sec-websocket-key")
    if not key:
        return text_response(400, "Bad Request", "missing Sec-WebSocket-Key\n")
    if req.get("sec-websocket-version") != "13":
        return text_response(
            400,
            "Bad Request",
            "unsupported WebSocket version\n",
            [("Sec-WebSocket-Version", "13")],
        )
    offered: list[str] = []
    for line in req.get_all("sec-websocket-protocol"):
        offered += [p.strip() for p in line.split(",") if p.strip()]
    is_pf = isinstance(request, PortForwardRequest)
    allowed = PORTFORWARD_PROTOCOLS if is_pf else EXEC_PROTOCOLS
    chosen = next((p for p in (offered or [""]) if p in allowed), None)
    if chosen is None:
        return response(403, "Forbidden", [])
    # The legacy form dials every listed port at once: as many as port-forward pairs.
    if (
        isinstance(request, PortForwardRequest)
        and chosen != TUNNEL_PORTFORWARD
        and len(request.ports) > max_ports
    ):
        return text_response(400, "Bad Request", f"too many ports: at most {max_ports}\n")
    headers = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", accept_key(key)),
    ]
    if chosen:
        headers.append(("Sec-WebSocket-Protocol", chosen))
    return Upgrade(chosen, response(101, "Switching Protocols", headers))
