"""Read a layer's tar stream with every quantity bounded.

CPython's ``tarfile`` reads a GNU long-name / long-link or a pax header body with one
``read(size)`` of the size the header declares, so a small gzip layer declaring a
multi-GiB header makes it allocate that much; it also reads sparse maps without
bound, nests header chains by recursion and keeps every member it returns. Here:

- :class:`LayerStream` is the decompressed stream: it hashes (the diff id), counts the
  expanded bytes against ``image_limits.max_layer_size_mib`` (and the image's budget),
  and while a header chain is parsed refuses to hand out more than the chain may need;
- :class:`_TarInfo` checks each extension header's declared body size against
  ``max_header_kib`` *before* tarfile reads it, caps the headers chained before one
  entry and the global pax headers of a layer;
- :func:`members` yields the entries without tarfile keeping them, up to
  ``max_entries_per_layer``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from collections.abc import Callable, Iterator
from typing import IO, Any

import zstandard

from criv.config import ImageLimitsConfig
from criv.image.limits import exceeded

CHUNK = 256 << 10  # tarfile's read size; also the slack of the header-chain ceiling
_META_TYPES = {
    tarfile.GNUTYPE_LONGNAME: "GNU long name",
    tarfile.GNUTYPE_LONGLINK: "GNU long link",
    tarfile.XHDTYPE: "pax",
    tarfile.SOLARIS_XHDTYPE: "pax (Solaris)",
    tarfile.XGLTYPE: "global pax",
}
# Extension headers before one entry: tar writers emit at most a few (pax, long name,
# long link); tarfile parses a chain by recursion, so it must stay short.
MAX_HEADER_CHAIN = 16


def open_decompressed(f: IO[bytes]) -> IO[bytes]:
    """Sniff gzip / zstd / plain tar by magic bytes (media types are not trusted)."""
    head = f.read(4)
    f.seek(0)
    if head[:2] == b"\x1f\x8b":
        gz: IO[bytes] = gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[assignment]
        return gz
    if head == b"\x28\xb5\x2f\xfd":
        reader: IO[bytes] = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
        return reader
    return f


class LayerStream(io.RawIOBase):
    """The decompressed tar stream: hashed, counted and bounded (see module doc)."""

    def __init__(
        self,
        inner: IO[bytes],
        limits: ImageLimitsConfig,
        what: str,
        charge: Callable[[int], None] | None = None,
    ) -> None:
        self._inner = inner
        self.limits = limits
        self.what = what
        self._charge = charge  # the image's budget (ExpandBudget.charge for this layer)
        self.hash = hashlib.sha256()
        self.count = 0  # bytes read from the tar stream
        self.expanded = 0  # count plus the sparse files' sizes
        self.ceiling: int | None = None  # while a header chain is parsed

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        want = len(b)
        if self.ceiling is not None:
            if self.count >= self.ceiling:
                raise exceeded(
                    self.what,
                    "tar extension headers need more than "
                    f"{self.limits.max_header_kib} KiB before one entry",
                    "max_header_kib",
                )
            want = min(want, self.ceiling - self.count)
        data = self._inner.read(want)
        n = len(data)
        b[:n] = data
        self.hash.update(data)
        self.count += n
        self.add(n)
        return n

    def add(self, n: int) -> None:
        """Count ``n`` expanded bytes (read, or a sparse file written out in full)."""
        self.expanded += n
        if self.expanded > self.limits.max_layer_bytes:
            raise exceeded(
                self.what,
                f"expands to more than {self.limits.max_layer_size_mib} MiB",
                "max_layer_size_mib",
            )
        if self._charge is not None and n:
            self._charge(n)

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


class _HeaderGuard:
    """Bounds on the extension headers of one tar stream (used by _TarInfo)."""

    def __init__(self, stream: LayerStream) -> None:
        self.stream = stream
        self.depth = 0
        self.global_bytes = 0

    def enter(self) -> None:
        s = self.stream
        if self.depth == 0:
            # what tarfile has buffered, its read-ahead, and sparse maps (which carry no
            # declared size) fit in this; each declared body raises it in body()
            s.ceiling = s.count + 2 * CHUNK + s.limits.max_header_bytes
        self.depth += 1
        if self.depth > MAX_HEADER_CHAIN:
            raise exceeded(
                s.what,
                f"more than {MAX_HEADER_CHAIN} tar extension headers before one entry",
                "max_header_kib",
            )
        assert s.ceiling is not None
        s.ceiling += tarfile.BLOCKSIZE

    def leave(self) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.stream.ceiling = None

    def body(self, ti: tarfile.TarInfo) -> None:
        s = self.stream
        limit = s.limits.max_header_bytes
        kind = _META_TYPES[ti.type]
        if ti.size > limit:
            raise exceeded(
                s.what,
                f"a {kind} tar header declares a {ti.size}-byte body, "
                f"more than {s.limits.max_header_kib} KiB",
                "max_header_kib",
            )
        if ti.type == tarfile.XGLTYPE:
            # global headers apply to every later entry: kept for the whole layer
            self.global_bytes += ti.size
            if self.global_bytes > limit:
                raise exceeded(
                    s.what,
                    f"global pax headers of more than {s.limits.max_header_kib} KiB",
                    "max_header_kib",
                )
        assert s.ceiling is not None
        s.ceiling += -(-ti.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


class _TarInfo(tarfile.TarInfo):
    """Checks a header chain before tarfile reads it (see module doc).

    tarfile builds entries through the class it is given, before it returns the
    archive; so each stream gets a subclass that carries its guard.
    """

    guard: _HeaderGuard

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> _TarInfo:
        cls.guard.enter()
        try:
            return super().fromtarfile(tar)
        finally:
            cls.guard.leave()

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _META_TYPES:
            self.guard.body(self)
        out: tarfile.TarInfo = super()._proc_member(tar)  # type: ignore[misc]
        return out


def members(stream: LayerStream) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """(archive, entry) for each entry of ``stream``; tarfile keeps none of them.

    Raises ImageLimitExceeded past ``max_entries_per_layer`` entries; tarfile's own
    errors (``tarfile.TarError``, ``EOFError``, decompressor errors) pass through.
    """
    info_cls = type("_StreamTarInfo", (_TarInfo,), {"guard": _HeaderGuard(stream)})
    limit = stream.limits.max_entries_per_layer
    with tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK, tarinfo=info_cls) as tar:
        kept: list[tarfile.TarInfo] = tar.members  # type: ignore[attr-defined]
        n = 0
        while True:
            m = tar.next()
            kept.clear()  # a stream is read once; a kept member per entry is a leak
            if m is None:
                return
            n += 1
            if n > limit:
                raise exceeded(
                    stream.what, f"more than {limit} tar entries", "max_entries_per_layer"
                )
            yield tar, m
