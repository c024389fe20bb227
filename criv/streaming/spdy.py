"""SPDY/3 framing as spdystream (the Go library under client-go) speaks it.

Only the parts the Kubernetes streaming protocols use: control frames with version 3,
data frames, name/value header blocks compressed with one zlib context per direction
and the SPDY/3 dictionary. No flow control: spdystream never sends or honours
WINDOW_UPDATE, so neither do we (facts sheet section 4.6).
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

# The dictionary ships as package data; a wrong copy would corrupt every header block
# silently (zlib only checks the Adler-32), so it is verified once when first loaded.
DICTIONARY_SHA256 = "51d27341373f923f3cd88e1eb7162aeaa3723d7585ff2399201dc06498407f02"
DICTIONARY_LENGTH = 1423
DICTIONARY_ADLER32 = 0xE3C6A7C2

VERSION = 3
MAX_FRAME_LENGTH = (1 << 24) - 1
# client-go writes 32 KiB chunks; sending the same size keeps latency and memory flat.
DATA_CHUNK = 32 * 1024

SYN_STREAM = 1
SYN_REPLY = 2
RST_STREAM = 3
SETTINGS = 4
PING = 6
GOAWAY = 7
HEADERS = 8
WINDOW_UPDATE = 9

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02

# RST_STREAM status codes
PROTOCOL_ERROR = 1
INVALID_STREAM = 2
REFUSED_STREAM = 3
CANCEL = 5
INTERNAL_ERROR = 6
FLOW_CONTROL_ERROR = 7

GOAWAY_OK = 0

# Limits spdystream enforces; a block beyond them is a protocol error on the peer.
MAX_HEADER_PAIRS = 1000
MAX_HEADER_FIELD = 1 << 20


class SpdyProtocolError(Exception):
    """The peer sent something that is not SPDY/3 as spdystream speaks it."""


@cache
def dictionary() -> bytes:
    data = resources.files(__package__).joinpath("spdy3-dictionary.bin").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != DICTIONARY_LENGTH or digest != DICTIONARY_SHA256:
        raise RuntimeError(f"spdy3-dictionary.bin is corrupt (sha256 {digest}, {len(data)} bytes)")
    return data


@dataclass(frozen=True)
class ControlFrame:
    type: int
    flags: int
    payload: bytes


@dataclass(frozen=True)
class DataFrame:
    stream_id: int
    flags: int
    data: bytes


Frame = ControlFrame | DataFrame


def parse_frame_header(header: bytes) -> tuple[bool, int, int, int]:
    """Split the 8-byte frame header: (is_control, type_or_stream_id, flags, length)."""
    first, flags_len = struct.unpack("!II", header)
    flags = flags_len >> 24
    length = flags_len & 0xFFFFFF
    if first & 0x80000000:
        version = (first >> 16) & 0x7FFF
        if version != VERSION:
            raise SpdyProtocolError(f"unsupported SPDY version {version}")
        return True, first & 0xFFFF, flags, length
    return False, first & 0x7FFFFFFF, flags, length


def encode_control(type_: int, flags: int, payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME_LENGTH:
        raise ValueError("control frame too large")
    return struct.pack("!HHI", 0x8000 | VERSION, type_, (flags << 24) | len(payload)) + payload


def encode_data(stream_id: int, data: bytes, fin: bool = False) -> bytes:
    if len(data) > MAX_FRAME_LENGTH:
        raise ValueError("data frame too large")
    flags = FLAG_FIN if fin else 0
    return struct.pack("!II", stream_id & 0x7FFFFFFF, (flags << 24) | len(data)) + data


def encode_rst(stream_id: int, status: int) -> bytes:
    return encode_control(RST_STREAM, 0, struct.pack("!II", stream_id & 0x7FFFFFFF, status))


def encode_ping(ping_id: int) -> bytes:
    return encode_control(PING, 0, struct.pack("!I", ping_id))


def encode_goaway(last_good: int, status: int = GOAWAY_OK) -> bytes:
    return encode_control(GOAWAY, 0, struct.pack("!II", last_good & 0x7FFFFFFF, status))


def encode_window_update(stream_id: int, delta: int) -> bytes:
    return encode_control(WINDOW_UPDATE, 0, struct.pack("!II", stream_id, delta))


def encode_settings(entries: list[tuple[int, int, int]], flags: int = 0) -> bytes:
    """``entries`` are (flags, id, value)."""
    body = struct.pack("!I", len(entries))
    for eflags, eid, value in entries:
        body += struct.pack("!II", (eflags << 24) | eid, value)
    return encode_control(SETTINGS, flags, body)


def encode_header_block(headers: dict[str, str]) -> bytes:
    """Uncompressed name/value block; names go lower-case as spdystream requires."""
    out = [struct.pack("!I", len(headers))]
    for name, value in headers.items():
        n = name.lower().encode()
        v = value.encode()
        out.append(struct.pack("!I", len(n)) + n + struct.pack("!I", len(v)) + v)
    return b"".join(out)


def decode_header_block(block: bytes) -> dict[str, str]:
    """Parse an uncompressed block; several values of one name arrive NUL-joined."""
    try:
        (count,) = struct.unpack_from("!I", block, 0)
        if count > MAX_HEADER_PAIRS:
            raise SpdyProtocolError(f"header block has {count} pairs")
        pos = 4
        headers: dict[str, str] = {}
        for _ in range(count):
            (nlen,) = struct.unpack_from("!I", block, pos)
            pos += 4
            if nlen > MAX_HEADER_FIELD or pos + nlen > len(block):
                raise SpdyProtocolError("header name length out of range")
            name = block[pos : pos + nlen].decode("utf-8", "replace").lower()
            pos += nlen
            (vlen,) = struct.unpack_from("!I", block, pos)
            pos += 4
            if vlen > MAX_HEADER_FIELD or pos + vlen > len(block):
                raise SpdyProtocolError("header value length out of range")
            headers[name] = block[pos : pos + vlen].decode("utf-8", "replace")
            pos += vlen
    except struct.error as e:
        raise SpdyProtocolError(f"truncated header block: {e}") from e
    if pos != len(block):
        raise SpdyProtocolError("header block size disagrees with its contents")
    return headers


class HeaderCompressor:
    """One direction's zlib stream: never reset, sync-flushed after every block."""

    def __init__(self) -> None:
        self._z = zlib.compressobj(
            9, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY, zdict=dictionary()
        )

    def compress(self, headers: dict[str, str]) -> bytes:
        block = encode_header_block(headers)
        return self._z.compress(block) + self._z.flush(zlib.Z_SYNC_FLUSH)


class HeaderDecompressor:
    """The receiving zlib stream; every block must pass through it to keep it in step."""

    # A sync-flushed block expands at most ~1000x; bound it so a hostile peer cannot make
    # us inflate gigabytes (a zlib bomb in a header block).
    MAX_BLOCK = 8 * 1024 * 1024

    def __init__(self) -> None:
        self._z = zlib.decompressobj(zdict=dictionary())

    def decompress(self, data: bytes) -> dict[str, str]:
        try:
            block = self._z.decompress(data, self.MAX_BLOCK)
        except zlib.error as e:
            raise SpdyProtocolError(f"bad header compression: {e}") from e
        if self._z.unconsumed_tail:
            raise SpdyProtocolError("header block too large")
        return decode_header_block(block)


def encode_syn_stream(
    compressor: HeaderCompressor, stream_id: int, headers: dict[str, str], flags: int = 0
) -> bytes:
    """Used by clients (the tests and the benchmark); the server never opens streams."""
    body = struct.pack("!IIBB", stream_id, 0, 0, 0) + compressor.compress(headers)
    return encode_control(SYN_STREAM, flags, body)


def encode_syn_reply(
    compressor: HeaderCompressor, stream_id: int, headers: dict[str, str]
) -> bytes:
    body = struct.pack("!I", stream_id) + compressor.compress(headers)
    return encode_control(SYN_REPLY, 0, body)


def parse_syn_stream(payload: bytes) -> tuple[int, int, bytes]:
    """(stream_id, assoc_id, compressed block) of a SYN_STREAM payload."""
    if len(payload) < 10:
        raise SpdyProtocolError("short SYN_STREAM")
    sid, assoc = struct.unpack_from("!II", payload, 0)
    return sid & 0x7FFFFFFF, assoc & 0x7FFFFFFF, payload[10:]


def parse_stream_id_block(payload: bytes) -> tuple[int, bytes]:
    """(stream_id, compressed block) of a SYN_REPLY or HEADERS payload."""
    if len(payload) < 4:
        raise SpdyProtocolError("short SYN_REPLY/HEADERS")
    (sid,) = struct.unpack_from("!I", payload, 0)
    return sid & 0x7FFFFFFF, payload[4:]


def parse_two_words(payload: bytes, what: str) -> tuple[int, int]:
    """RST_STREAM, GOAWAY and WINDOW_UPDATE all carry exactly two 32-bit words."""
    if len(payload) != 8:
        raise SpdyProtocolError(f"{what} length {len(payload)} != 8")
    a, b = struct.unpack("!II", payload)
    return a & 0x7FFFFFFF, b


def parse_ping(payload: bytes) -> int:
    if len(payload) != 4:
        raise SpdyProtocolError("PING length != 4")
    (pid,) = struct.unpack("!I", payload)
    return int(pid)
