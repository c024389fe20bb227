"""image_limits against hostile layers and manifests: header bombs (GNU long name and
long link, pax, global pax, sparse maps), layers that expand past the limit, too many
entries, too many layers, blobs longer than declared, paths too deep.

Each bomb must fail with ImageLimitExceeded naming its config key, while the memory
criv allocates stays far below what the layer declares, and leave nothing in the store.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from criv.config import ImageLimitsConfig
from criv.errors import DigestMismatch, ImageLimitExceeded, UnsafeLayer
from criv.image import unpack
from criv.image.content import ContentStore
from criv.image.layers import LayerStore, disk_usage
from criv.image.limits import ExpandBudget, check_manifest
from criv.image.media import Descriptor
from criv.image.tarstream import LayerStream, members, open_decompressed
from tests.support.images import (
    LayerBuilder,
    build_layer,
    gzip_chunks,
    raw_tar_header,
    sha256,
    zeros,
)

GiB = 1 << 30
MiB = 1 << 20


@pytest.fixture
def store(tmp_path: Path) -> LayerStore:
    s = LayerStore(tmp_path / "images")
    s.setup()
    return s


def peak_alloc(fn: Callable[[], object]) -> tuple[int, BaseException | None]:
    """Peak bytes Python allocated while ``fn`` ran, and what it raised."""
    tracemalloc.start()
    err: BaseException | None = None
    try:
        fn()
    except BaseException as e:
        err = e
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, err


def unpack_blob(store: LayerStore, tmp_path: Path, blob: bytes, diff_id: str = "") -> None:
    path = tmp_path / "blob"
    path.write_bytes(blob)
    store.unpack(diff_id or "sha256:" + "0" * 64, path, "hostile layer")


def assert_store_empty(store: LayerStore) -> None:
    assert list(store.dir.iterdir()) == [], "a half-unpacked layer was left"
    assert list(store.trash.iterdir()) == []


# -- header bombs -----------------------------------------------------------------

BOMBS = {
    "gnu-long-name": (b"././@LongLink", tarfile.GNUTYPE_LONGNAME),
    "gnu-long-link": (b"././@LongLink", tarfile.GNUTYPE_LONGLINK),
    "pax": (b"PaxHeaders/f", tarfile.XHDTYPE),
    "global-pax": (b"GlobalHead", tarfile.XGLTYPE),
}


@pytest.mark.parametrize("kind", sorted(BOMBS))
def test_header_bomb_refused_before_it_is_read(
    store: LayerStore, tmp_path: Path, kind: str
) -> None:
    """A header declaring 8 GiB, followed by 64 MiB of body (a 64 KiB gzip): tarfile
    alone reads the whole body in one read() before it fails."""
    name, typeflag = BOMBS[kind]
    blob = gzip_chunks([raw_tar_header(name, typeflag, 8 * GiB), *zeros(64 * MiB)])
    assert len(blob) < MiB
    peak, err = peak_alloc(lambda: unpack_blob(store, tmp_path, blob))
    assert isinstance(err, ImageLimitExceeded), err
    assert "image_limits.max_header_kib" in str(err) and "8589934592" in str(err)
    assert peak < 8 * MiB, f"{peak} bytes allocated for a refused header"
    assert_store_empty(store)


def test_sparse_map_bomb_refused(store: LayerStore, tmp_path: Path) -> None:
    """An old-GNU sparse entry whose map goes on for 32 MiB of extension blocks (the
    map has no declared size: tarfile reads blocks while each says 'more follows')."""
    block = bytearray(b"00000000001\0" * 42 + bytes(8))
    block[504] = 1  # isextended: another block follows
    head = raw_tar_header(b"sparse", tarfile.GNUTYPE_SPARSE, 0, {482: b"\x01"})
    blob = gzip_chunks([head, *(bytes(block) * 2048 for _ in range(32))])
    peak, err = peak_alloc(lambda: unpack_blob(store, tmp_path, blob))
    assert isinstance(err, ImageLimitExceeded), err
    assert "image_limits.max_header_kib" in str(err)
    assert peak < 16 * MiB, f"{peak} bytes allocated for a refused sparse map"
    assert_store_empty(store)


def test_header_chain_too_long(store: LayerStore, tmp_path: Path) -> None:
    pax = b"12 comment=\n"
    chain = b"".join(
        raw_tar_header(b"PaxHeaders/f", tarfile.XHDTYPE, len(pax)) + pax.ljust(512, b"\0")
        for _ in range(40)
    )
    tar = chain + raw_tar_header(b"f", tarfile.REGTYPE, 0) + bytes(1024)
    with pytest.raises(ImageLimitExceeded, match="extension headers before one entry"):
        unpack_blob(store, tmp_path, gzip_chunks([tar]), sha256(tar))
    assert_store_empty(store)


def test_large_headers_under_the_limit_unpack(store: LayerStore, tmp_path: Path) -> None:
    """A 900 KiB pax record and a 2.8 KiB name (GNU long name) are allowed."""
    ti = tarfile.TarInfo("big-pax")
    ti.size = 4
    ti.pax_headers = {"comment": "c" * (900 << 10)}
    long_name = "d/" + "/".join(["n" * 200] * 14) + "/f"
    t2 = tarfile.TarInfo(long_name)
    t2.size = 5
    tar = (
        ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        + b"pax\n".ljust(512, b"\0")
        + t2.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
        + b"long\n".ljust(512, b"\0")
        + bytes(1024)
    )
    path = tmp_path / "blob"
    path.write_bytes(gzip_chunks([tar]))
    info = store.unpack(sha256(tar), path, "big headers")
    assert (info.fs / "big-pax").read_bytes() == b"pax\n"
    assert (info.fs / long_name).read_bytes() == b"long\n"


# -- expanded size and entries ----------------------------------------------------


def test_layer_expanding_past_the_limit(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "images", ImageLimitsConfig(max_layer_size_mib=1))
    store.setup()
    small = build_layer(LayerBuilder().file("ok", bytes(MiB // 2)))
    path = tmp_path / "small"
    path.write_bytes(small.blob)
    store.unpack(small.diff_id, path, "small layer")
    big = build_layer(LayerBuilder().file("big", bytes(2 * MiB)))
    assert len(big.blob) < 16 << 10
    with pytest.raises(ImageLimitExceeded, match=r"image_limits\.max_layer_size_mib"):
        unpack_blob(store, tmp_path, big.blob, big.diff_id)
    assert [p.name for p in store.dir.iterdir()] == [small.diff_id[7:]]


def test_sparse_file_counts_its_full_size(tmp_path: Path) -> None:
    """A sparse entry stores no bytes but is written out in full: 2 MiB of holes."""
    store = LayerStore(tmp_path / "images", ImageLimitsConfig(max_layer_size_mib=1))
    store.setup()
    head = raw_tar_header(b"holes", tarfile.GNUTYPE_SPARSE, 0, {483: b"%011o\0" % (2 * MiB)})
    tar = head + bytes(1024)
    with pytest.raises(ImageLimitExceeded, match=r"image_limits\.max_layer_size_mib"):
        unpack_blob(store, tmp_path, gzip_chunks([tar]), sha256(tar))
    assert_store_empty(store)


def test_too_many_entries(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "images", ImageLimitsConfig(max_entries_per_layer=50))
    store.setup()
    ok = LayerBuilder()
    for i in range(50):
        ok.file(f"f{i}", "x")
    built = build_layer(ok)
    unpack_blob(store, tmp_path, built.blob, built.diff_id)
    bad = build_layer(ok.file("one-more", "x"))
    with pytest.raises(ImageLimitExceeded, match=r"image_limits\.max_entries_per_layer"):
        unpack_blob(store, tmp_path, bad.blob, bad.diff_id)
    assert [p.name for p in store.dir.iterdir()] == [built.diff_id[7:]]


def _stream(tar_chunks: Iterator[bytes], limits: ImageLimitsConfig) -> LayerStream:
    blob = gzip_chunks(tar_chunks)
    return LayerStream(open_decompressed(io.BytesIO(blob)), limits, "many entries")


def test_entries_are_not_kept_in_memory() -> None:
    """tarfile keeps every member it returns; 60,000 entries must not cost 60,000."""
    n = 60_000
    entry = raw_tar_header(b"f", tarfile.REGTYPE, 0)
    stream = _stream(iter([entry * n, bytes(1024)]), ImageLimitsConfig())
    count = 0

    def walk() -> None:
        nonlocal count
        for _ in members(stream):
            count += 1

    peak, err = peak_alloc(walk)
    assert err is None and count == n
    assert peak < 4 * MiB, f"{peak} bytes allocated to read {n} entries"


def test_image_budget_spans_layers(tmp_path: Path) -> None:
    limits = ImageLimitsConfig(max_layer_size_mib=1, max_image_size_mib=1)
    store = LayerStore(tmp_path / "images", limits)
    store.setup()
    budget = ExpandBudget(limits, "image test")
    layers = [build_layer(LayerBuilder().file(f"f{i}", bytes(MiB * 6 // 10))) for i in range(2)]
    for i, layer in enumerate(layers):
        path = tmp_path / f"l{i}"
        path.write_bytes(layer.blob)

        def charge(n: int, d: str = layer.diff_id) -> None:
            budget.charge(d, n)

        if i == 0:
            info = store.unpack(layer.diff_id, path, "first", charge)
            assert info.expanded_bytes == len(gzip.decompress(layer.blob))
            assert store.get(layer.diff_id) == info  # kept in meta.json
            budget.settle(layer.diff_id, info.expanded_bytes)  # charged already: no-op
            assert budget.total == info.expanded_bytes
        else:
            with pytest.raises(ImageLimitExceeded, match=r"image_limits\.max_image_size_mib"):
                store.unpack(layer.diff_id, path, "second", charge)
    assert len(list(store.dir.iterdir())) == 1
    # a layer another pull unpacked is charged by its recorded size
    other = ExpandBudget(limits, "other image")
    other.settle(layers[0].diff_id, 2 * MiB // 3)
    with pytest.raises(ImageLimitExceeded):
        other.settle(layers[1].diff_id, MiB // 2)


def test_directory_mtimes_past_the_memory_bound(
    store: LayerStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the bound a directory's mtime is set at once instead of remembered."""
    monkeypatch.setattr(unpack, "_MAX_DIR_TIMES_BYTES", 0)
    lb = LayerBuilder().dir("a", mtime=1_600_000_000).dir("b", mtime=1_500_000_000)
    built = build_layer(lb.file("b/f", "f"))
    path = tmp_path / "blob"
    path.write_bytes(built.blob)
    info = store.unpack(built.diff_id, path, "dir times")
    assert (info.fs / "a").stat().st_mtime == 1_600_000_000
    assert (info.fs / "b/f").read_text() == "f"


# -- paths ------------------------------------------------------------------------


def test_deep_paths(store: LayerStore, tmp_path: Path) -> None:
    deep = "/".join(["d"] * 255)
    built = build_layer(LayerBuilder().file(deep + "/f", "deep\n"))
    path = tmp_path / "deep"
    path.write_bytes(built.blob)
    info = store.unpack(built.diff_id, path, "deep")
    assert (info.fs / deep / "f").read_text() == "deep\n"
    assert disk_usage(info.fs)[1] == 257  # fs, 255 dirs and the file
    store.remove(built.diff_id)  # rmtree copes with it
    assert_store_empty(store)
    for name in ("/".join(["d"] * 257), "n" * 4097):
        bad = build_layer(LayerBuilder().file(name, "x"))
        with pytest.raises(UnsafeLayer):
            unpack_blob(store, tmp_path, bad.blob, bad.diff_id)
        assert_store_empty(store)


# -- manifests and blobs ------------------------------------------------------------


def _desc(size: int, n: int = 0) -> Descriptor:
    return Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", sha256(b"%d" % n), size)


def test_manifest_limits() -> None:
    limits = ImageLimitsConfig()
    config = _desc(100)
    check_manifest(limits, "m", config, [_desc(10, i) for i in range(128)])
    with pytest.raises(ImageLimitExceeded, match=r"500 layers.*image_limits\.max_layers"):
        check_manifest(limits, "m", config, [_desc(10, i) for i in range(500)])
    with pytest.raises(ImageLimitExceeded, match=r"image_limits\.max_config_kib"):
        check_manifest(limits, "m", _desc(17 * MiB), [])
    with pytest.raises(ImageLimitExceeded, match=r"image_limits\.max_blob_size_mib"):
        check_manifest(limits, "m", config, [_desc(65 * GiB)])


def test_blob_longer_than_its_descriptor(tmp_path: Path) -> None:
    """The writer refuses the chunk that would pass the declared size: the temp file
    never holds more than the descriptor says, and abort leaves nothing."""
    content = ContentStore(tmp_path / "images")
    content.setup()
    data = b"x" * 1000
    w = content.writer(sha256(data[:600]), 600, "blob")
    w.write_many([data[:500]])
    with pytest.raises(DigestMismatch, match="more data than the 600 bytes"):
        w.write_many([data[500:]])
    w._f.flush()
    assert w.tmp.stat().st_size == 500
    w.abort()
    assert list(content.tmp_dir.iterdir()) == [] and content.list() == set()
