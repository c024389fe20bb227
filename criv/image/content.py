"""Content-addressed blobs under ``<state_dir>/images/blobs/sha256/<hex>``.

A blob becomes visible only complete and verified: it is written to a temp file in
``tmp/`` (same filesystem), hashed as it is written, fsynced, checked against its
digest and size, then renamed into place and the directory fsynced. A failed or
interrupted ingest leaves at most a temp file, which ``start()`` sweeps.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from pathlib import Path

from criv.atomicfile import rename_durable
from criv.errors import DigestMismatch
from criv.image.media import digest_hex, sha256_digest


def private_dir(path: Path) -> None:
    """Create ``path`` 0700, or tighten it to 0700 (blocking).

    Unpacked layers keep their setuid files and device nodes: as containerd does since
    CVE-2021-41103, no other user may traverse the store to reach them.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o7777 != 0o700:
        os.chmod(path, 0o700)


class BlobWriter:
    """One blob being ingested (blocking methods: call from a worker thread)."""

    def __init__(self, store: ContentStore, digest: str, size: int | None, what: str) -> None:
        self.store = store
        self.digest = digest
        self.size = size
        self.what = what
        self.tmp = store.tmp_dir / f"blob-{digest_hex(digest)[:16]}-{secrets.token_hex(6)}"
        self._f = open(self.tmp, "wb")  # noqa: SIM115 - closed in commit/abort
        self._hash = hashlib.sha256()
        self.written = 0

    def write(self, data: bytes) -> None:
        if self.size is not None and self.written + len(data) > self.size:
            # refused before it is written: the temp file never exceeds the declared size
            raise DigestMismatch(
                f"{self.what}: more data than the {self.size} bytes the descriptor says"
            )
        self._hash.update(data)
        self._f.write(data)
        self.written += len(data)

    def write_many(self, chunks: list[bytes]) -> None:
        for c in chunks:
            self.write(c)

    def commit(self) -> Path:
        got = "sha256:" + self._hash.hexdigest()
        if self.size is not None and self.written != self.size:
            raise DigestMismatch(
                f"{self.what}: got {self.written} bytes, the descriptor says {self.size}"
            )
        if got != self.digest:
            raise DigestMismatch(f"{self.what}: content is {got}, expected {self.digest}")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        dest = self.store.path(self.digest)
        rename_durable(self.tmp, dest)
        return dest

    def abort(self) -> None:
        self._f.close()
        self.tmp.unlink(missing_ok=True)


class ContentStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs_dir = root / "blobs" / "sha256"
        self.tmp_dir = root / "tmp"

    def setup(self) -> None:
        """Create the dirs and sweep temp files left by an interrupted run (blocking)."""
        private_dir(self.blobs_dir.parent)
        private_dir(self.blobs_dir)
        if self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir)
        private_dir(self.tmp_dir)

    def path(self, digest: str) -> Path:
        return self.blobs_dir / digest_hex(digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def usage(self, digest: str) -> int:
        try:
            return os.stat(self.path(digest)).st_blocks * 512
        except FileNotFoundError:
            return 0

    def writer(self, digest: str, size: int | None, what: str) -> BlobWriter:
        return BlobWriter(self, digest, size, what)

    def put(self, data: bytes, digest: str | None = None) -> str:
        """Store small content already in memory (verified when ``digest`` is given)."""
        got = sha256_digest(data)
        if digest is not None and got != digest:
            raise DigestMismatch(f"content is {got}, expected {digest}")
        dest = self.path(got)
        if not dest.exists():
            w = self.writer(got, len(data), got)
            try:
                w.write(data)
                w.commit()
            except BaseException:
                w.abort()
                raise
        return got

    def read(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def list(self) -> set[str]:
        try:
            return {"sha256:" + n for n in os.listdir(self.blobs_dir) if len(n) == 64}
        except FileNotFoundError:
            return set()

    def delete(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)
