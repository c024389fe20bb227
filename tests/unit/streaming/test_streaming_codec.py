"""SPDY/3 codec: the dictionary, the facts sheet's test vectors, frame round trips."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import pytest

from criv.streaming import spdy

REFERENCE = Path("/work/shared/reference/spdy3-zlib-dictionary.bin")


def hexbytes(s: str) -> bytes:
    return bytes.fromhex(s.replace("\n", " "))


SYN1 = hexbytes(
    "80 03 00 01 00 00 00 2a  00 00 00 01 00 00 00 00  00 00 78 f9 e3 c6 a7 c2"
    " 62 60 60 60 04 a7 b3 92  a2 d4 c4 5c 68 51 c2 9a  5a 54 94 5f 04 00 00 00  ff ff"
)
SYN3 = hexbytes(
    "80 03 00 01 00 00 00 19  00 00 00 03 00 00 00 00  00 00 c2 2a c5 56 5c 92"
    " 92 5f 5a 02 00 00 00 ff  ff"
)
PF_SYN1 = hexbytes(
    "80 03 00 01 00 00 00 43  00 00 00 01 00 00 00 00  00 00 78 f9 e3 c6 a7 c2"
    " 62 60 60 60 06 a7 b3 92  a2 d4 c4 5c 68 51 c2 9a  5a 54 94 5f 04 29 96 8b"
    " 4a 18 18 18 98 2c 0c 18  18 18 38 8b 20 91 98 99  c2 c0 c0 c0 68 00 00 00  00 ff ff"
)


def test_dictionary_matches_the_sheet() -> None:
    d = spdy.dictionary()
    assert len(d) == 1423
    assert hashlib.sha256(d).hexdigest() == spdy.DICTIONARY_SHA256
    assert zlib.adler32(d) == 0xE3C6A7C2
    assert d.startswith(bytes.fromhex("00000007") + b"options")
    assert d.endswith(b",utf-,*,enq=0.")
    if REFERENCE.exists():
        assert REFERENCE.read_bytes() == d


def _split(frame: bytes) -> tuple[bool, int, int, bytes]:
    is_control, kind, flags, length = spdy.parse_frame_header(frame[:8])
    assert length == len(frame) - 8
    return is_control, kind, flags, frame[8:]


def test_client_syn_stream_vectors_share_one_context() -> None:
    d = spdy.HeaderDecompressor()
    for frame, sid, value in ((SYN1, 1, "error"), (SYN3, 3, "stdout")):
        is_control, kind, flags, payload = _split(frame)
        assert (is_control, kind, flags) == (True, spdy.SYN_STREAM, 0)
        got_sid, assoc, block = spdy.parse_syn_stream(payload)
        assert (got_sid, assoc) == (sid, 0)
        assert d.decompress(block) == {"streamtype": value}


def test_portforward_vector_keeps_header_order() -> None:
    _, _, _, payload = _split(PF_SYN1)
    _, _, block = spdy.parse_syn_stream(payload)
    raw = zlib.decompressobj(zdict=spdy.dictionary()).decompress(block)
    assert raw == spdy.encode_header_block({"streamtype": "error", "port": "80", "requestid": "0"})
    assert spdy.HeaderDecompressor().decompress(block) == {
        "streamtype": "error",
        "port": "80",
        "requestid": "0",
    }


def test_syn_reply_decodes_with_an_independent_decompressor() -> None:
    c = spdy.HeaderCompressor()
    z = zlib.decompressobj(
        zdict=REFERENCE.read_bytes() if REFERENCE.exists() else spdy.dictionary()
    )
    for sid in (1, 3, 5):
        frame = spdy.encode_syn_reply(c, sid, {})
        is_control, kind, flags, payload = _split(frame)
        assert (is_control, kind, flags) == (True, spdy.SYN_REPLY, 0)
        (got,) = struct.unpack_from("!I", payload)
        assert got == sid
        assert z.decompress(payload[4:]) == b"\x00\x00\x00\x00"
    # The first block starts with a zlib header carrying the dictionary id.
    first = spdy.encode_syn_reply(spdy.HeaderCompressor(), 1, {})
    assert first[12:18] == bytes.fromhex("78f9e3c6a7c2")
    assert first.endswith(b"\x00\x00\xff\xff")


def test_sheet_frame_vectors() -> None:
    assert spdy.encode_data(3, b"hello\n") == hexbytes("00 00 00 03 00 00 00 06 68 65 6c 6c 6f 0a")
    assert spdy.encode_data(3, b"", fin=True) == hexbytes("00 00 00 03 01 00 00 00")
    assert spdy.encode_ping(1) == hexbytes("80 03 00 06 00 00 00 04 00 00 00 01")
    assert spdy.encode_rst(5, spdy.CANCEL) == hexbytes(
        "80 03 00 03 00 00 00 08 00 00 00 05 00 00 00 05"
    )
    assert spdy.encode_goaway(7) == hexbytes("80 03 00 07 00 00 00 08 00 00 00 07 00 00 00 00")
    assert spdy.encode_window_update(1, 65536) == hexbytes(
        "80 03 00 09 00 00 00 08 00 00 00 01 00 01 00 00"
    )
    assert spdy.encode_settings([(0, 7, 65536)]) == hexbytes(
        "80 03 00 04 00 00 00 0c 00 00 00 01 00 00 00 07 00 01 00 00"
    )


def test_round_trips() -> None:
    c, d = spdy.HeaderCompressor(), spdy.HeaderDecompressor()
    headers = {"streamtype": "data", "port": "8080", "requestid": "12"}
    frame = spdy.encode_syn_stream(c, 9, headers, flags=spdy.FLAG_FIN)
    is_control, kind, flags, payload = _split(frame)
    assert (is_control, kind, flags) == (True, spdy.SYN_STREAM, spdy.FLAG_FIN)
    sid, _, block = spdy.parse_syn_stream(payload)
    assert sid == 9 and d.decompress(block) == headers
    big = bytes(range(256)) * 512
    is_control, sid, flags, payload = _split(spdy.encode_data(11, big, fin=True))
    assert (is_control, sid, flags, payload) == (False, 11, spdy.FLAG_FIN, big)
    _, _, _, payload = _split(spdy.encode_rst(5, spdy.CANCEL))
    assert spdy.parse_two_words(payload, "RST") == (5, spdy.CANCEL)
    _, _, _, payload = _split(spdy.encode_ping(7))
    assert spdy.parse_ping(payload) == 7


def test_bad_frames_are_protocol_errors() -> None:
    with pytest.raises(spdy.SpdyProtocolError):
        spdy.parse_frame_header(struct.pack("!HHI", 0x8002, 1, 0))  # version 2
    with pytest.raises(spdy.SpdyProtocolError):
        spdy.parse_two_words(b"\0" * 4, "GOAWAY")
    with pytest.raises(spdy.SpdyProtocolError):
        spdy.decode_header_block(struct.pack("!II", 1, 50) + b"x")
    with pytest.raises(spdy.SpdyProtocolError):
        spdy.HeaderDecompressor().decompress(b"not zlib at all")
