"""KeyedStatMemo: a value is computed once while its files stay as they are."""

from __future__ import annotations

import os
from pathlib import Path

from criv.statmemo import KeyedStatMemo


def _counting(values: list[str]) -> tuple[list[int], object]:
    calls = [0]

    def compute() -> str:
        calls[0] += 1
        return values[calls[0] - 1]

    return calls, compute


def test_computed_once_while_the_files_are_unchanged(tmp_path: Path) -> None:
    f = tmp_path / "a"
    f.write_text("one")
    memo: KeyedStatMemo[str] = KeyedStatMemo()
    calls, compute = _counting(["x", "y"])
    assert memo.get("k", [f], compute) == "x"  # type: ignore[arg-type]
    assert memo.get("k", [f], compute) == "x"  # type: ignore[arg-type]
    assert calls == [1]


def test_a_changed_replaced_or_removed_file_computes_again(tmp_path: Path) -> None:
    f = tmp_path / "a"
    f.write_text("one")
    memo: KeyedStatMemo[str] = KeyedStatMemo()
    calls, compute = _counting(["1", "2", "3", "4"])
    memo.get("k", [f], compute)  # type: ignore[arg-type]
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert memo.get("k", [f], compute) == "2"  # type: ignore[arg-type]
    new = tmp_path / "b"
    new.write_text("two")
    new.replace(f)  # another inode at the same path
    assert memo.get("k", [f], compute) == "3"  # type: ignore[arg-type]
    f.unlink()
    assert memo.get("k", [f], compute) == "4"  # type: ignore[arg-type]
    assert calls == [4]


def test_keys_are_apart_and_old_values_go(tmp_path: Path) -> None:
    memo: KeyedStatMemo[int] = KeyedStatMemo(size=2)
    assert memo.get("a", [], lambda: 1) == 1
    assert memo.get("b", [], lambda: 2) == 2
    assert memo.get("a", [], lambda: 9) == 1
    memo.get("c", [], lambda: 3)  # drops the oldest entry
    assert memo.get("a", [], lambda: 10) == 10
