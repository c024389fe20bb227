"""The STDIO frame codec (criv_agent/execframes.py) that the agent and criv share."""

from __future__ import annotations

import asyncio

import pytest

from criv_agent import execframes as ef


def test_frame_bytes_on_the_wire() -> None:
    assert ef.frame(1, b"ab") == b"\x01\x00\x00\x00\x02ab"
    assert ef.frame(3, b"\x00") == b"\x03\x00\x00\x00\x01\x00"
    assert ef.close_frame(ef.STDERR) == b"\x03\x00\x00\x00\x01\x02"
    assert ef.resize_frame(100, 40) == b"\x04\x00\x00\x00\x04\x00\x64\x00\x28"
    assert ef.exit_frame(-1) == b"\x05\x00\x00\x00\x04\xff\xff\xff\xff"


def test_parse_payloads() -> None:
    assert ef.parse_resize(b"\x00\x64\x00\x28") == (100, 40)
    assert ef.parse_resize(b"\x00\x64\x00\x28extra") == (100, 40)
    assert ef.parse_resize(b"\x00\x64") is None
    assert ef.parse_exit(b"\x00\x00\x00\x83") == 131
    assert ef.parse_exit(b"\x00\x00\x83") is None
    assert ef.parse_exit(b"\x00\x00\x00\x83\x00") is None


async def test_read_frame() -> None:
    r = asyncio.StreamReader()
    r.feed_data(ef.frame(ef.STDOUT, b"out") + ef.frame(ef.CLOSE) + ef.frame(9, b"x"))
    r.feed_data(b"\x01\x00\x10\x00\x01")  # 1 MiB + 1 announced
    r.feed_eof()
    assert await ef.read_frame(r) == (ef.STDOUT, b"out")
    assert await ef.read_frame(r) == (ef.CLOSE, b"")
    assert await ef.read_frame(r) == (9, b"x")  # unknown types are the caller's to skip
    with pytest.raises(ef.FrameTooLarge) as e:
        await ef.read_frame(r)
    assert e.value.size == ef.MAX_FRAME + 1
    with pytest.raises(asyncio.IncompleteReadError):
        await ef.read_frame(r)
