"""The CRI log writer: F/P records, 16 KiB splits, EOF, timestamps."""

from __future__ import annotations

import re
from pathlib import Path

from criv_agent.logs import MAX_LINE, CriLogFile, LineSplitter, format_record, rfc3339nano


def test_full_lines_and_chunk_boundaries() -> None:
    s = LineSplitter()
    assert s.feed(b"he") == []
    assert s.feed(b"llo\nwor") == [(b"F", b"hello")]
    assert s.feed(b"ld\n\n") == [(b"F", b"world"), (b"F", b"")]
    assert s.finish() == []


def test_crlf_is_stripped_like_go_readline() -> None:
    assert LineSplitter().feed(b"dos\r\n") == [(b"F", b"dos")]


def test_long_line_split_at_16k() -> None:
    s = LineSplitter()
    line = b"x" * (2 * MAX_LINE + 5)
    assert s.feed(line + b"\n") == [
        (b"P", b"x" * MAX_LINE), (b"P", b"x" * MAX_LINE), (b"F", b"x" * 5)]  # fmt: skip


def test_exactly_16k_is_one_full_record() -> None:
    s = LineSplitter()
    assert s.feed(b"y" * MAX_LINE) == []  # not yet longer than the limit
    assert s.feed(b"\n") == [(b"F", b"y" * MAX_LINE)]


def test_partial_emitted_before_newline_arrives() -> None:
    s = LineSplitter()
    assert s.feed(b"z" * (MAX_LINE + 1)) == [(b"P", b"z" * MAX_LINE)]
    assert s.feed(b"end\n") == [(b"F", b"zend")]


def test_eof_without_newline_is_partial() -> None:
    s = LineSplitter()
    assert s.feed(b"a\nb") == [(b"F", b"a")]
    assert s.finish() == [(b"P", b"b")]
    assert s.finish() == []


def test_timestamp_format() -> None:
    assert rfc3339nano(1_700_000_000_000_000_123) == b"2023-11-14T22:13:20.000000123Z"
    assert rfc3339nano(0) == b"1970-01-01T00:00:00.000000000Z"
    rec = format_record(1_000_000_000, "stderr", b"F", b"msg")
    assert rec == b"1970-01-01T00:00:01.000000000Z stderr F msg\n"


def test_log_file_interleaves_streams_and_closes(tmp_path: Path) -> None:
    changes: list[int] = []
    clock = iter(range(1, 100)).__next__
    f = CriLogFile(str(tmp_path / "log"), clock=clock, on_change=lambda: changes.append(1))
    f.write("stdout", b"one\ntw")
    f.write("stderr", b"err\n")
    f.close_stream("stdout")
    assert f.open_streams == 1
    f.close_stream("stderr")
    assert f.open_streams == 0
    lines = (tmp_path / "log").read_text().splitlines()
    pat = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z (stdout|stderr) [PF] .*$")
    assert all(pat.match(x) for x in lines)
    assert [x.split(" ", 1)[1] for x in lines] == [
        "stdout F one", "stderr F err", "stdout P tw"]  # fmt: skip
    assert len(changes) == 4  # three writes and the final close
    f.close()  # idempotent


def test_log_file_appends(tmp_path: Path) -> None:
    p = tmp_path / "log"
    p.write_text("existing\n")
    f = CriLogFile(str(p), clock=lambda: 0)
    f.write("stdout", b"new\n")
    f.close()
    assert p.read_text().splitlines()[1].endswith("stdout F new")
