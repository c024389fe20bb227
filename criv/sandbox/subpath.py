"""An image volume's ``image_sub_path``, resolved inside the image's root.

The image's content is not criv's: a symlink in it may point anywhere. So the sub-path
is walked one component at a time as the kernel would inside a chroot at the image root:
a link's target is followed inside the image (an absolute one from the image root), and
a ``..`` that would climb above the root, lexically or through a link, is refused (as a
``..`` in the request is refused before any lookup). What comes out is a chain of
components each of which was seen to be a directory (the last one: a directory or a
regular file), none a link, so joining them under the mounted image names exactly that
entry. The image tree is read-only and unpacked by criv: it cannot change under the walk.

``probe`` is how the walk sees the tree (a fake one in unit tests).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from criv.errors import InvalidArgument, NotFound

MAX_SUB_PATH = 4096
MAX_LINKS = 40  # the kernel's MAXSYMLINKS


@dataclass(frozen=True)
class Entry:
    kind: str  # "dir", "file", "link", "other"
    target: str = ""  # a link's target


Probe = Callable[[tuple[str, ...]], Entry | None]


def sub_path_problem(sub_path: str) -> str:
    """What is wrong with ``sub_path`` as the request gives it ("" if nothing)."""
    if not sub_path:
        return ""
    if len(sub_path.encode()) > MAX_SUB_PATH:
        return f"is longer than {MAX_SUB_PATH} bytes"
    if "\0" in sub_path:
        return "has a NUL byte"
    if sub_path.startswith("/"):
        return f"{sub_path[:200]!r} is not a relative path"
    depth = 0
    for part in sub_path.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return f"{sub_path[:200]!r} leads out of the image"
        elif part not in ("", "."):
            depth += 1
    return ""


def resolve(sub_path: str, probe: Probe) -> tuple[tuple[str, ...], str]:
    """The components of ``sub_path`` resolved inside the image, and the kind of what
    they name ("dir" or "file"). InvalidArgument for an escape, a link loop or an entry
    that is neither; NotFound for what does not exist."""
    shown = repr(sub_path[:200])
    if problem := sub_path_problem(sub_path):
        raise InvalidArgument(f"image sub-path {problem}")
    pending = [p for p in reversed(sub_path.split("/")) if p not in ("", ".")]
    done: list[str] = []
    kind = "dir"  # the image root
    links = 0
    while pending:
        part = pending.pop()
        if kind != "dir":
            raise NotFound(f"image sub-path {shown}: {'/'.join(done)} is not a directory")
        if part == "..":
            if not done:
                raise InvalidArgument(f"image sub-path {shown} leads out of the image root")
            done.pop()
            continue
        entry = probe((*done, part))
        if entry is None:
            raise NotFound(f"image sub-path {shown} does not exist in the image")
        if entry.kind == "link":
            links += 1
            if links > MAX_LINKS:
                raise InvalidArgument(f"image sub-path {shown}: too many levels of links")
            if entry.target.startswith("/"):
                done.clear()  # from the image root, as in the container
            pending.extend(p for p in reversed(entry.target.split("/")) if p not in ("", "."))
            continue
        if entry.kind not in ("dir", "file"):
            raise InvalidArgument(f"image sub-path {shown} is neither a directory nor a file")
        done.append(part)
        kind = entry.kind
    return tuple(done), kind


def disk_probe(root: Path) -> Probe:
    """Probe the tree under ``root`` (every prefix handed in was already seen to be a
    chain of directories, so ``lstat`` of the join goes through no link)."""

    def probe(parts: tuple[str, ...]) -> Entry | None:
        path = root.joinpath(*parts)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise InvalidArgument(f"image sub-path: {e.strerror}") from e
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(path)
            if len(target.encode()) > MAX_SUB_PATH:
                raise InvalidArgument("image sub-path: a link's target is too long")
            return Entry("link", target)
        if stat.S_ISDIR(st.st_mode):
            return Entry("dir")
        return Entry("file" if stat.S_ISREG(st.st_mode) else "other")

    return probe


def resolve_on_disk(root: Path, sub_path: str) -> Path:
    """``root`` joined with ``sub_path`` resolved inside it (blocking)."""
    parts, _ = resolve(sub_path, disk_probe(root))
    return root.joinpath(*parts)
