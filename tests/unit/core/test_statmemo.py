"""StatMemo: kept while the files it came from are unchanged, and never a racy stamp."""

from __future__ import annotations

import time
from pathlib import Path

from criv.statmemo import RACY_NS, StatMemo


def _later() -> int:
    return time.time_ns() + 10 * RACY_NS  # every stamp is old enough to trust


def _counting(path: Path, keep: bool = True) -> tuple[StatMemo[str], list[str]]:
    computed: list[str] = []

    def compute() -> tuple[str, list[str] | None]:
        text = path.read_text() if path.exists() else ""
        computed.append(text)
        return text, [str(path)] if keep else None

    return StatMemo(compute, _later), computed


def test_kept_until_the_file_changes(tmp_path: Path) -> None:
    f = tmp_path / "conf"
    f.write_text("one")
    memo, computed = _counting(f)
    assert [memo.get() for _ in range(3)] == ["one"] * 3
    assert computed == ["one"]
    f.write_text("two!")
    assert memo.get() == "two!"
    assert computed == ["one", "two!"]


def test_a_file_that_appears_or_goes_counts_as_a_change(tmp_path: Path) -> None:
    f = tmp_path / "conf"
    memo, computed = _counting(f)
    assert memo.get() == ""
    f.write_text("here")
    assert memo.get() == "here"
    f.unlink()
    assert memo.get() == ""
    assert len(computed) == 3


def test_a_rename_over_the_file_counts(tmp_path: Path) -> None:
    f = tmp_path / "conf"
    f.write_text("abc")
    memo, _ = _counting(f)
    memo.get()
    new = tmp_path / "conf.tmp"
    new.write_text("xyz")  # same size; a new inode
    new.rename(f)
    assert memo.get() == "xyz"


def test_nothing_kept_when_compute_says_so(tmp_path: Path) -> None:
    f = tmp_path / "conf"
    f.write_text("x")
    memo, computed = _counting(f, keep=False)
    memo.get()
    memo.get()
    assert len(computed) == 2


def test_a_fresh_stamp_is_not_trusted(tmp_path: Path) -> None:
    f = tmp_path / "conf"
    f.write_text("x")
    computed: list[str] = []

    def compute() -> tuple[str, list[str] | None]:
        computed.append("x")
        return "x", [str(f)]

    memo = StatMemo(compute)  # the real clock: the file was written just now
    memo.get()
    memo.get()
    assert len(computed) == 2
