from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from criv.guestimage.slim import LIBDIR, gc_libraries, remove_unneeded, sourceless

HOST_LIB = Path("/usr/lib/x86_64-linux-gnu")


@pytest.mark.timeout(30)
def test_library_gc_keeps_the_needed_closure(tmp_path: Path) -> None:
    if shutil.which("readelf") is None or not (HOST_LIB / "libz.so.1").exists():
        pytest.skip("needs readelf and the host's libz")
    lib = tmp_path / LIBDIR
    lib.mkdir(parents=True)
    (tmp_path / "usr/bin").mkdir()
    shutil.copy(shutil.which("true") or "/usr/bin/true", tmp_path / "usr/bin/true")
    shutil.copy(HOST_LIB / "libc.so.6", lib / "libc.so.6")
    real = (HOST_LIB / "libz.so.1").resolve()
    shutil.copy(real, lib / real.name)
    (lib / "libz.so.1").symlink_to(real.name)
    shutil.copy(HOST_LIB / "libc.so.6", lib / "libnss_files.so.2")  # dlopen'd: kept by name
    removed = gc_libraries(tmp_path)
    assert sorted(removed) == sorted(["libz.so.1", real.name])
    assert (lib / "libc.so.6").exists() and (lib / "libnss_files.so.2").exists()


@pytest.mark.timeout(30)
def test_remove_unneeded_and_sourceless(tmp_path: Path) -> None:
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/dpkg").write_text("")
    (tmp_path / "usr/bin/python3").write_text("")
    remove_unneeded(tmp_path)
    assert not (tmp_path / "usr/bin/dpkg").exists() and (tmp_path / "usr/bin/python3").exists()
    pkg = tmp_path / "site/pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("X = 1\n")
    sourceless(tmp_path, [tmp_path / "site"], shutil.which("python3.11") or "python3")
    assert (pkg / "__init__.pyc").is_file() and not (pkg / "__init__.py").exists()
