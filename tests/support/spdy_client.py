"""A SPDY/3 client playing client-go's role, written from the facts sheet.

Independent of criv.streaming on purpose (its own framing and zlib contexts), so the
tests check the server against the protocol, not against itself. Also used by
bench/stream.py to drive criv's and containerd's streaming servers alike.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

DICT_PATH = Path(__file__).resolve().parents[2] / "criv" / "streaming" / "spdy3-dictionary.bin"
DICT = DICT_PATH.read_bytes()
assert hashlib.sha256(DICT).hexdigest() == (
    "51d27341373f923f3cd88e1eb7162aeaa3723d7585ff2399201dc06498407f02"
)


@dataclass
class HttpResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def get(self, name: str) -> str | None:
        vals = self.get_all(name)
        return vals[0] if vals else None


async def http_request(
    url: str, method: str, headers: list[tuple[str, str]]
) -> tuple[HttpResponse, asyncio.StreamReader, asyncio.StreamWriter]:
    """Send one request; read the response head (and the body of a non-101)."""
    u = urlsplit(url)
    ctx = None
    if u.scheme == "https":
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(u.hostname, u.port, ssl=ctx)
    lines = [f"{method} {u.path} HTTP/1.1", f"Host: {u.netloc}", "Content-Length: 0"]
    lines += [f"{k}: {v}" for k, v in headers]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *hlines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ")[1])
    hdrs = []
    for line in hlines:
        if line:
            k, _, v = line.partition(":")
            hdrs.append((k.strip(), v.strip()))
    body = b""
    if status != 101:
        n = int(dict((k.lower(), v) for k, v in hdrs).get("content-length", "0"))
        body = await reader.readexactly(n) if n else await reader.read()
    return HttpResponse(status, hdrs, body), reader, writer


async def open_raw(
    url: str, *, local_host: str | None = None, rcvbuf: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain TCP connection to the URL's server, optionally from another loopback
    address (a second peer) or with a small receive buffer (a peer that reads little)."""
    u = urlsplit(url)
    assert u.hostname is not None and u.port is not None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connect, so the advertised window stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if local_host is not None:
        sock.bind((local_host, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (u.hostname, u.port))
    return await asyncio.open_connection(sock=sock)


def upgrade_head(url: str, protocols: list[str]) -> bytes:
    """A SPDY upgrade request as client-go sends it."""
    u = urlsplit(url)
    lines = [f"POST {u.path} HTTP/1.1", f"Host: {u.netloc}", "Content-Length: 0"]
    lines += ["Connection: Upgrade", "Upgrade: SPDY/3.1"]
    lines += [f"X-Stream-Protocol-Version: {p}" for p in protocols]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def ping_frame(pid: int) -> bytes:
    return control(6, 0, struct.pack("!I", pid))


def control(type_: int, flags: int, payload: bytes) -> bytes:
    return struct.pack("!HHI", 0x8003, type_, (flags << 24) | len(payload)) + payload


def data_frame(sid: int, payload: bytes, fin: bool = False) -> bytes:
    return struct.pack("!II", sid, ((1 if fin else 0) << 24) | len(payload)) + payload


def header_block(headers: dict[str, str]) -> bytes:
    out = struct.pack("!I", len(headers))
    for k, v in headers.items():
        out += struct.pack("!I", len(k)) + k.encode() + struct.pack("!I", len(v)) + v.encode()
    return out


def parse_block(block: bytes) -> dict[str, str]:
    (n,) = struct.unpack_from("!I", block)
    pos, out = 4, {}
    for _ in range(n):
        (ln,) = struct.unpack_from("!I", block, pos)
        name = block[pos + 4 : pos + 4 + ln].decode()
        pos += 4 + ln
        (lv,) = struct.unpack_from("!I", block, pos)
        out[name] = block[pos + 4 : pos + 4 + lv].decode()
        pos += 4 + lv
    assert pos == len(block)
    return out


@dataclass
class ClientStream:
    id: int
    headers: dict[str, str]
    replied: asyncio.Event = field(default_factory=asyncio.Event)
    data: bytearray = field(default_factory=bytearray)
    fin: asyncio.Event = field(default_factory=asyncio.Event)
    reset: int | None = None
    got_data: asyncio.Event = field(default_factory=asyncio.Event)


class SpdyClient:
    """Upgrades a connection and then speaks SPDY as the client side."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.comp = zlib.compressobj(9, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY, zdict=DICT)
        self.decomp = zlib.decompressobj(zdict=DICT)
        self.next_id = 1
        self.streams: dict[int, ClientStream] = {}
        self.pongs: list[int] = []
        self.pong_event = asyncio.Event()
        self.goaway: tuple[int, int] | None = None
        self.closed = asyncio.Event()  # server closed TCP
        self.frames: list[tuple[str, int, int]] = []  # (kind, id, flags) in arrival order
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls, url: str, protocols: list[str], method: str = "POST"
    ) -> tuple[HttpResponse, SpdyClient | None]:
        headers = [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")]
        headers += [("X-Stream-Protocol-Version", p) for p in protocols]
        resp, reader, writer = await http_request(url, method, headers)
        if resp.status != 101:
            writer.close()
            return resp, None
        client = cls(reader, writer)
        client._task = asyncio.create_task(client._read_loop())
        return resp, client

    def send(self, frame: bytes) -> None:
        self.writer.write(frame)

    async def open_stream(self, headers: dict[str, str], wait: bool = True) -> ClientStream:
        sid = self.next_id
        self.next_id += 2
        block = self.comp.compress(header_block(headers)) + self.comp.flush(zlib.Z_SYNC_FLUSH)
        s = ClientStream(sid, headers)
        self.streams[sid] = s
        self.send(control(1, 0, struct.pack("!IIBB", sid, 0, 0, 0) + block))
        await self.writer.drain()
        if wait:
            await asyncio.wait_for(self._replied_or_reset(s), 30)
        return s

    async def _replied_or_reset(self, s: ClientStream) -> None:
        while not s.replied.is_set() and s.reset is None:
            await asyncio.wait(
                [asyncio.create_task(s.replied.wait()), asyncio.create_task(s.fin.wait())],
                return_when=asyncio.FIRST_COMPLETED,
            )

    async def write(self, s: ClientStream, payload: bytes, fin: bool = False) -> None:
        for i in range(0, max(len(payload), 1), 32768):
            last = i + 32768 >= len(payload)
            self.send(data_frame(s.id, payload[i : i + 32768], fin and last))
        await self.writer.drain()

    async def ping(self, pid: int) -> None:
        self.send(control(6, 0, struct.pack("!I", pid)))
        await self.writer.drain()

    async def _read_loop(self) -> None:
        try:
            while True:
                head = await self.reader.readexactly(8)
                a, b = struct.unpack("!II", head)
                flags, length = b >> 24, b & 0xFFFFFF
                payload = await self.reader.readexactly(length) if length else b""
                if a & 0x80000000:
                    self._control(a & 0xFFFF, flags, payload)
                else:
                    sid = a & 0x7FFFFFFF
                    self.frames.append(("data", sid, flags))
                    s = self.streams.get(sid)
                    assert s is not None, f"data for unknown stream {sid}"
                    assert not s.fin.is_set(), f"data after FIN on {sid}"
                    s.data += payload
                    s.got_data.set()
                    if flags & 1:
                        s.fin.set()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for s in self.streams.values():
                s.fin.set()
            self.closed.set()

    def _control(self, type_: int, flags: int, payload: bytes) -> None:
        if type_ == 2:  # SYN_REPLY
            (sid,) = struct.unpack_from("!I", payload)
            assert flags == 0
            assert parse_block(self.decomp.decompress(payload[4:])) == {}
            self.frames.append(("syn_reply", sid, flags))
            self.streams[sid].replied.set()
        elif type_ == 3:  # RST_STREAM
            sid, status = struct.unpack("!II", payload)
            self.frames.append(("rst", sid, status))
            s = self.streams.get(sid)
            if s is not None:
                s.reset = status
                s.fin.set()
        elif type_ == 6:
            (pid,) = struct.unpack("!I", payload)
            self.pongs.append(pid)
            self.pong_event.set()
        elif type_ == 7:
            assert len(payload) == 8 and flags == 0
            self.goaway = struct.unpack("!II", payload)
            self.frames.append(("goaway", self.goaway[0], self.goaway[1]))
        else:
            raise AssertionError(f"server sent control frame type {type_}")

    async def read_stream(self, s: ClientStream, timeout: float = 30) -> bytes:
        await asyncio.wait_for(s.fin.wait(), timeout)
        return bytes(s.data)

    async def close(self) -> None:
        self.writer.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def forward_one(c: SpdyClient, port: int, rid: int, payload: bytes) -> bytes:
    """One forwarded connection as client-go does it; returns what came back."""
    err = await c.open_stream({"streamtype": "error", "port": str(port), "requestid": str(rid)})
    await c.write(err, b"", fin=True)
    data = await c.open_stream({"streamtype": "data", "port": str(port), "requestid": str(rid)})
    await c.write(data, payload, fin=True)  # half-close: the echo must still come back
    got = await c.read_stream(data)
    assert await c.read_stream(err) == b""
    assert err.reset is None
    return got


@dataclass
class ExecResult:
    stdout: bytes
    stderr: bytes
    error: bytes
    protocol: str
    client: SpdyClient

    @property
    def status(self) -> dict[str, object]:
        doc: dict[str, object] = json.loads(self.error)
        return doc


async def spdy_exec(
    url: str,
    *,
    stdin: bytes | None = None,
    stdout: bool = True,
    stderr: bool = True,
    tty: bool = False,
    protocols: list[str] | None = None,
    resize: tuple[int, int] | None = None,
    timeout: float = 60,
) -> ExecResult:
    """One exec/attach the way client-go does it: streams in order, then copy, then wait."""
    protocols = protocols or [
        "v5.channel.k8s.io",
        "v4.channel.k8s.io",
        "v3.channel.k8s.io",
        "v2.channel.k8s.io",
        "channel.k8s.io",
    ]
    resp, c = await SpdyClient.connect(url, protocols)
    assert resp.status == 101, (resp.status, resp.body)
    assert c is not None
    proto = resp.get("X-Stream-Protocol-Version") or ""
    err = await c.open_stream({"streamtype": "error"})
    sin = await c.open_stream({"streamtype": "stdin"}) if stdin is not None else None
    sout = await c.open_stream({"streamtype": "stdout"}) if stdout else None
    serr = await c.open_stream({"streamtype": "stderr"}) if stderr and not tty else None
    srz = None
    if tty and proto not in ("v2.channel.k8s.io", "channel.k8s.io"):
        srz = await c.open_stream({"streamtype": "resize"})
    if srz is not None and resize is not None:
        await c.write(srz, json.dumps({"Width": resize[0], "Height": resize[1]}).encode() + b"\n")
        await asyncio.sleep(0.2)
    if sin is not None:
        assert stdin is not None
        await c.write(sin, stdin, fin=True)
    async with asyncio.timeout(timeout):
        out = await c.read_stream(sout) if sout else b""
        errout = await c.read_stream(serr) if serr else b""
        status = await c.read_stream(err)
    await c.close()
    return ExecResult(out, errout, status, proto, c)
