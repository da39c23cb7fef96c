"""write_gathered (reshard.transfer.strided): tensors made of strided extents written into a
shard by pwritev from mapped sources must hold exactly the bytes the buffered path
(iter_assembled) produces, for every tiling, band size and short write; bad tilings and
truncated sources fail with one line naming the tensor or file."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from reshard.errors import FormatError
from reshard.tensors import Extent, TensorInfo
from reshard.transfer import ranges, strided
from reshard.transfer.extents import iter_assembled
from reshard.transfer.sources import FileSource, SourceReader
from reshard.transfer.strided import can_gather, write_gathered


def random_file(path: Path, size: int, seed: int) -> FileSource:
    path.write_bytes(random.Random(seed).randbytes(size))
    return FileSource(path)


def gathered(tmp_path: Path, t: TensorInfo, at: int = 0) -> bytes:
    out = tmp_path / "out.bin"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        with SourceReader() as reader:
            write_gathered(t, reader, fd, at)
    finally:
        os.close(fd)
    return out.read_bytes()[at:]


def assembled(t: TensorInfo) -> bytes:
    with SourceReader() as reader:
        return b"".join(bytes(c) for c in iter_assembled(t, reader))


def merged_columns(tmp_path: Path, widths: list[int], rows: int) -> TensorInfo:
    """A merge's tensor: rank r's file holds its rows x widths[r] slice contiguously (after
    a 100-byte header); the full rows interleave them."""
    full, extents, column = sum(widths), [], 0
    for r, width in enumerate(widths):
        src = random_file(tmp_path / f"rank-{r}.bin", 100 + rows * width, seed=r)
        extents.append(Extent(src, 100, width, column, rows, width, full))
        column += width
    return TensorInfo("w", "U8", (rows, full), tuple(extents), rows * full)


def column_slice(tmp_path: Path, full: int, start: int, width: int, rows: int) -> TensorInfo:
    """A split's rank tensor: columns [start, start + width) of a rows x full matrix."""
    src = random_file(tmp_path / "src.bin", 64 + rows * full, seed=7)
    e = Extent(src, 64 + start, width, 0, rows, full, width)
    return TensorInfo("w", "U8", (rows, width), (e,), rows * width)


@pytest.mark.parametrize("widths", [[4096, 4096], [14336, 14336], [1000, 3000, 600]])
def test_merged_rows_equal_the_buffered_path(tmp_path, widths):
    t = merged_columns(tmp_path, widths, rows=300)
    assert can_gather(t)
    expected = assembled(t)
    assert gathered(tmp_path, t, at=1234) == expected
    # the merged rows really interleave the ranks' slices
    rank1 = (tmp_path / "rank-1.bin").read_bytes()[100:]
    row = sum(widths)
    assert expected[row + widths[0] : row + widths[0] + widths[1]] == rank1[widths[1] : 2 * widths[1]]


@pytest.mark.parametrize("start,width,full", [(0, 4096, 8192), (14336, 14336, 28672), (700, 900, 3000)])
def test_column_slice_equals_the_buffered_path(tmp_path, start, width, full):
    t = column_slice(tmp_path, full, start, width, rows=257)
    assert can_gather(t)
    data = gathered(tmp_path, t)
    assert data == assembled(t)
    src = (tmp_path / "src.bin").read_bytes()[64:]
    assert data[width : 2 * width] == src[full + start : full + start + width]


def test_small_bands_and_iovec_limits_keep_the_bytes(tmp_path, monkeypatch):
    """Bands of a few rows, a few iovecs per pwritev, and the span limit all cut the work
    differently; the bytes must not change."""
    t = merged_columns(tmp_path, [1500, 2500], rows=97)
    expected = assembled(t)
    monkeypatch.setattr(strided, "GATHER_BAND", 5000)
    monkeypatch.setattr(strided, "IOV_MAX", 6)
    monkeypatch.setattr(strided, "GATHER_SPAN", 9000)
    monkeypatch.setattr(ranges, "IOV_MAX", 4)
    assert gathered(tmp_path, t, at=3) == expected


def test_irregular_tiling_is_merged_by_destination(tmp_path, monkeypatch):
    """Not a row grid: a row split across two files (a ZeRO/DCP chunk boundary) next to
    strided rows, and a contiguous piece covering whole rows, with small bands so long runs
    are cut."""
    a = random_file(tmp_path / "a.bin", 50_000, seed=1)
    b = random_file(tmp_path / "b.bin", 50_000, seed=2)
    row = 2048
    extents = (
        Extent(a, 10, 1024, 0, 3, 4096, row),  # left halves of rows 0-2, strided in a
        Extent(b, 0, 1024, 1024, 2, 1024, row),  # right halves of rows 0-1, contiguous in b
        Extent(a, 30_000, 512, 2 * row + 1024),  # right half of row 2: split over two files
        Extent(b, 40_000, 512, 2 * row + 1536),
        Extent(b, 5000, 2 * row, 3 * row),  # rows 3-4 whole, contiguous
    )
    t = TensorInfo("w", "U8", (5, row), extents, 5 * row)
    assert can_gather(t)
    expected = assembled(t)
    monkeypatch.setattr(strided, "GATHER_BAND", 1500)
    assert gathered(tmp_path, t) == expected


def test_short_writes_resume_inside_a_view(tmp_path, monkeypatch):
    """Near a full disk pwritev may write less than asked: the rest follows, in order."""
    t = merged_columns(tmp_path, [3000, 5000], rows=40)
    expected = assembled(t)
    real = os.pwritev

    def at_most_777(fd, buffers, offset):
        room, cut = 777, []
        for b in buffers:
            if room <= 0:
                break
            cut.append(memoryview(b)[:room])
            room -= len(cut[-1])
        return real(fd, cut, offset)

    monkeypatch.setattr(os, "pwritev", at_most_777)
    assert gathered(tmp_path, t) == expected


def test_gap_is_refused_naming_the_tensor(tmp_path):
    src = random_file(tmp_path / "a.bin", 10_000, seed=3)
    extents = (
        Extent(src, 0, 1000, 0, 2, 1000, 3000),
        Extent(src, 4000, 1000, 2000, 2, 1000, 3000),
        Extent(src, 7000, 1000, 4000),  # row 1's middle; row 0's is missing
        Extent(src, 8000, 1000, 4000),  # and row 1's again, so the sizes add up
    )
    t = TensorInfo("layers.0.w", "U8", (2, 3000), extents, 6000)
    with pytest.raises(FormatError, match="'layers.0.w'.*a gap"):
        gathered(tmp_path, t)


def test_truncated_source_fails_with_its_name(tmp_path):
    t = merged_columns(tmp_path, [2048, 2048], rows=64)
    with open(tmp_path / "rank-1.bin", "r+b") as f:
        f.truncate(100 + 30 * 2048)
    with pytest.raises(FormatError, match="rank-1.bin: ended early"):
        gathered(tmp_path, t)


def test_what_is_not_gathered(tmp_path):
    t = merged_columns(tmp_path, [1000, 1000], rows=4)
    assert can_gather(t)
    tiny = merged_columns(tmp_path, [8, 8], rows=4)  # one-element runs: the buffered path
    assert not can_gather(tiny)
    cast = TensorInfo(t.name, "F16", (4, 1000), t.extents, 8000, src_dtype="BF16")
    assert not can_gather(cast)
    whole = TensorInfo("w", "U8", (4000,), (Extent(t.extents[0].source, 100, 4000),), 4000)
    assert not can_gather(whole)  # one range: a kernel copy
