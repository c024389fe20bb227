"""A vm-image container's console log across a criv restart (criv/sandbox/vmimage/
console.py, crilog.py): a clean stop leaves a line's start unwritten and the next criv
finishes it; after a kill (the mark older than the log), what came after the mark is cut
and written again as records of the same lengths, so the host's log follower, resuming
at its own offset, neither loses nor repeats a line."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from criv.sandbox.vmimage import console as console_mod
from criv.sandbox.vmimage.console import ConsoleLog
from criv.sandbox.vmimage.crilog import CriConsoleFile, cut_to
from criv.sandbox.vmimage.record import ConsoleMark
from criv.vmimage.sshkeys import generate_host_key

pytestmark = pytest.mark.timeout(30)


def contents(cri: Path) -> list[str]:
    """The log's lines, records joined (P + F) as kubelet reads them."""
    out, part = [], ""
    for line in cri.read_text().splitlines():
        _ts, stream, tag, content = [*line.split(" ", 3), ""][:4]
        assert stream == "stdout"
        part += content
        if tag == "F":
            out.append(part)
            part = ""
    return out + ([part] if part else [])


async def settle(log: ConsoleLog) -> None:
    for _ in range(50):
        await asyncio.sleep(console_mod.POLL)
        before = log.mark
        await asyncio.sleep(console_mod.POLL * 2)
        if log.mark == before:
            return


async def test_a_clean_stop_and_the_next_criv(tmp_path: Path) -> None:
    con, cri = tmp_path / "console.log", tmp_path / "serial.log"
    con.write_bytes(b"one\r\ntwo\nthr")
    marks: list[ConsoleMark] = []
    log: ConsoleLog | None = None

    async def on_mark() -> None:
        assert log is not None
        marks.append(log.mark)

    log = ConsoleLog(con, cri, on_mark)
    log.start()
    await settle(log)
    mark = await log.suspend()  # criv stops: "thr" is not written, the log is not complete
    assert not log.complete
    assert contents(cri) == ["one", "two"]
    assert mark == ConsoleMark(len(b"one\r\ntwo\n"), cri.stat().st_size)
    with con.open("ab") as f:
        f.write(b"ee\nfour\n")  # the VM goes on while criv is down
    log = await ConsoleLog.resume(con, cri, mark, None, on_mark)
    log.start()
    await settle(log)
    await log.finish()
    assert contents(cri) == ["one", "two", "three", "four"]


async def test_after_a_kill_the_lines_past_the_mark_are_written_again(tmp_path: Path) -> None:
    con, cri = tmp_path / "console.log", tmp_path / "serial.log"
    con.write_bytes(b"alpha\n" + b"x" * 40_000 + b"\nbeta\n")  # a long line: P records
    log = ConsoleLog(con, cri)
    log.start()
    await settle(log)
    old_mark = ConsoleMark(len(b"alpha\n"), len(cri.read_bytes().splitlines(True)[0]))
    with con.open("ab") as f:
        f.write(b"gamma\nhalf")
    await settle(log)
    before = cri.read_bytes()
    follower_at = len(before)  # a host follower had read all of it
    assert contents(cri) == ["alpha", "x" * 40_000, "beta", "gamma"]
    log._cri.detach()  # type: ignore[union-attr]  # kill -9: nothing more recorded
    await log.suspend()
    with con.open("ab") as f:
        f.write(b"-line\ndelta\n")
    log = await ConsoleLog.resume(con, cri, old_mark, None)
    log.start()
    await settle(log)
    await log.finish()
    after = cri.read_bytes()
    assert contents(cri) == ["alpha", "x" * 40_000, "beta", "gamma", "half-line", "delta"]
    # the records past the old mark came back at the same offsets (new timestamps)
    old_lens = [len(r) for r in before.splitlines(True)]
    new_lens = [len(r) for r in after.splitlines(True)]
    assert new_lens[: len(old_lens)] == old_lens
    assert contents_from(after, follower_at) == ["half-line", "delta"]


def contents_from(data: bytes, offset: int) -> list[str]:
    return [ln.split(b" ", 3)[3].decode() for ln in data[offset:].splitlines()]


async def test_the_pin_comes_from_the_record_or_the_console_head(tmp_path: Path) -> None:
    key = generate_host_key()
    con, cri = tmp_path / "console.log", tmp_path / "serial.log"
    con.write_bytes(b"boot\n" + key.public_line.encode() + b"\nready\n")
    mark = ConsoleMark(con.stat().st_size, 0)
    log = await ConsoleLog.resume(con, cri, mark, key.pin)  # as recorded: no scan
    assert log.pinned.is_set() and log.pin == key.pin
    await log.finish()
    # not recorded (criv died before it wrote the pin): found in what was copied already
    log = await ConsoleLog.resume(con, cri, mark, None)
    await asyncio.wait_for(log.pinned.wait(), 5)
    assert log.pin == key.pin
    await log.finish()


async def test_a_console_rotated_while_criv_was_down_is_read_from_its_start(
    tmp_path: Path,
) -> None:
    con, cri = tmp_path / "console.log", tmp_path / "serial.log"
    con.write_bytes(b"new file\n")
    log = await ConsoleLog.resume(con, cri, ConsoleMark(1 << 20, 0), None)
    log.start()
    await settle(log)
    await log.finish()
    assert contents(cri) == ["new file"]


def test_the_cri_file_and_cutting_it(tmp_path: Path) -> None:
    p = tmp_path / "serial.log"
    f = CriConsoleFile(p, clock=lambda: 0)
    f.write(b"a\nbc")
    assert (f.pending, f.size) == (2, p.stat().st_size)
    f.detach()
    assert p.read_bytes() == b"1970-01-01T00:00:00.000000000Z stdout F a\n"
    f = CriConsoleFile(p, clock=lambda: 0)
    assert f.size == p.stat().st_size
    f.write(b"bc")
    f.close()  # the end: the line's start as a P record
    assert p.read_bytes().endswith(b" stdout P bc\n")
    assert cut_to(p, 10) == 10 and p.stat().st_size == 10
    assert cut_to(p, 100) == 10  # never grows
    assert cut_to(tmp_path / "none", 5) == 0
    (tmp_path / "link").symlink_to(p)
    with pytest.raises(OSError):
        cut_to(tmp_path / "link", 0)
