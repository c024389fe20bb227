"""The HTTP/1.1 the streaming server needs: read one request head under a deadline and a
size bound, and write a response head. Every request is an upgrade or an error, so there
are no bodies and no keep-alive.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

# Request line and headers together; kubelet's proxied upgrade carries a few hundred bytes.
MAX_HEADER_BYTES = 64 * 1024


@dataclass
class HttpRequest:
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]  # names lower-cased, in order, repeats kept

    def get(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]


class BadRequest(Exception):
    """The request head cannot be served; ``status`` and ``reason`` go back to the peer."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


def parse_request(raw: bytes) -> HttpRequest:
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError("bad request line")
    method, target, _ = parts
    path, _, query = target.partition("?")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError("bad header line")
        headers.append((name.strip().lower(), value.strip()))
    return HttpRequest(method, path, query, headers)


async def read_request(reader: asyncio.StreamReader, timeout: float) -> HttpRequest | None:
    """The next request head, or None if the peer closed before sending one.

    The whole head must arrive within ``timeout``: a peer that trickles it would
    otherwise hold its connection slot for as long as it likes. The reader's ``limit``
    (``MAX_HEADER_BYTES`` on the server) bounds its size.
    """
    try:
        async with asyncio.timeout(timeout):
            raw = await reader.readuntil(b"\r\n\r\n")
    except TimeoutError:
        raise BadRequest(408, "Request Timeout", "request headers not received in time") from None
    except asyncio.LimitOverrunError:
        raise BadRequest(
            431, "Request Header Fields Too Large", "request headers too large"
        ) from None
    except asyncio.IncompleteReadError:
        return None
    try:
        return parse_request(raw)
    except ValueError:
        raise BadRequest(400, "Bad Request", "bad request") from None


def response(status: int, reason: str, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    head = [f"HTTP/1.1 {status} {reason}"]
    if status != 101:
        headers = [
            *headers,
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
    head += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def text_response(
    status: int, reason: str, body: str, extra: list[tuple[str, str]] | None = None
) -> bytes:
    headers = [("Content-Type", "text/plain; charset=utf-8"), *(extra or [])]
    return response(status, reason, headers, body.encode())


def offered_spdy_protocols(req: HttpRequest) -> list[str]:
    out: list[str] = []
    for line in req.get_all("x-stream-protocol-version"):
        out += [p.strip() for p in line.split(",") if p.strip()]
    return out


def is_websocket(req: HttpRequest) -> bool:
    upgrade = (req.get("upgrade") or "").lower()
    connection = " ".join(req.get_all("connection")).lower()
    return upgrade == "websocket" and "upgrade" in connection
