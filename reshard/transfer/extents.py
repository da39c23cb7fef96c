"""Assemble a tensor's stored bytes from its extents, in bounded chunks.

Two layouts cover every reader: *pieces* (contiguous extents one after another: ZeRO
partitions, dim-0 DCP chunks, row slices) and *blocks* (strided extents that share one
output row width: column slices, 2-D DCP chunks, per-rank KV heads of a fused matrix).
Blocks are read a band of rows at a time, one ``pread`` per extent and band where the
rows sit close together, and placed with numpy, so memory is about one band of
``chunk`` bytes whatever the tensor size. The tiling is checked first: a gap or an
overlap is a ``FormatError`` naming the tensor, never silently wrong bytes.

>>> import os, tempfile
>>> from pathlib import Path
>>> from reshard.tensors import Extent, TensorInfo
>>> from reshard.transfer.sources import FileSource, SourceReader
>>> fd, name = tempfile.mkstemp(); _ = os.write(fd, bytes(range(16))); os.close(fd)
>>> src = FileSource(Path(name))
>>> # a 2x4 U8 matrix: column 0-1 from bytes 0,1 / 4,5; columns 2-3 from 8,9 / 12,13
>>> t = TensorInfo("w", "U8", (2, 4), (Extent(src, 0, 2, 0, 2, 4, 4), Extent(src, 8, 2, 2, 2, 4, 4)), 8)
>>> with SourceReader() as reader:
...     b"".join(iter_assembled(t, reader))
b'\\x00\\x01\\x08\\t\\x04\\x05\\x0c\\r'
"""

from __future__ import annotations

from collections.abc import Iterator

from reshard.errors import FormatError
from reshard.tensors import Extent, TensorInfo
from reshard.transfer.sources import SourceReader

DEFAULT_CHUNK = 16 * 1024 * 1024
# Rows at least this long are read one pread each; shorter ones a band at a time.
LARGE_ROW = 64 * 1024


def iter_assembled(info: TensorInfo, reader: SourceReader, chunk: int = DEFAULT_CHUNK) -> Iterator[bytes]:
    """Yield the stored bytes of ``info`` in order; every chunk but the last holds a whole
    number of ``itemsize`` bytes when the extents do (casts rely on it).

    Raises:
        FormatError: the extents leave a gap, overlap, or use an unsupported layout.
    """
    info.check_extents()
    if all(e.is_contiguous for e in info.extents):
        yield from _iter_pieces(info, reader, chunk)
    else:
        yield from _iter_blocks(info, reader, chunk)


def contiguous_pieces(info: TensorInfo) -> list[Extent]:
    """The extents as contiguous pieces sorted by destination, checked to tile the
    stored bytes exactly (for kernel copies of each piece).

    Raises:
        FormatError: a gap or an overlap.
    """
    pieces = sorted((_as_range(e) for e in info.extents if e.nbytes), key=lambda e: e.dest)
    cursor = 0
    for e in pieces:
        if e.dest != cursor:
            what = "a gap" if e.dest > cursor else "an overlap"
            raise FormatError(
                f"tensor {info.name!r}: its pieces leave {what} at byte {min(e.dest, cursor)} "
                "of its stored bytes; the checkpoint metadata is inconsistent"
            )
        cursor += e.length
    return pieces


def _as_range(e: Extent) -> Extent:
    if e.rows == 1:
        return e
    return Extent(e.source, e.offset, e.nbytes, e.dest)


def _iter_pieces(info: TensorInfo, reader: SourceReader, chunk: int) -> Iterator[bytes]:
    buffer = bytearray()
    for e in contiguous_pieces(info):
        for start in range(0, e.length, chunk):
            buffer += reader.read(e.source, e.offset + start, min(chunk, e.length - start))
            if len(buffer) >= chunk:
                yield bytes(buffer)
                buffer.clear()
    if buffer:
        yield bytes(buffer)


def _row_blocks(info: TensorInfo) -> tuple[int, list[tuple[int, int, int, Extent]]]:
    """Every extent as ``(first row, rows, column byte, extent)`` over rows of a common
    width; contiguous extents that cover whole rows are cut into rows."""
    widths = {e.step_dest for e in info.extents if not e.is_contiguous}
    if len(widths) != 1:
        raise FormatError(
            f"tensor {info.name!r}: its strided pieces do not share one row width; "
            "this layout is not supported"
        )
    width = widths.pop()
    total = info.stored_nbytes
    if width <= 0 or total % width:
        raise FormatError(f"tensor {info.name!r}: row width {width} does not divide its {total} bytes")
    blocks = []
    for e in info.extents:
        if e.is_contiguous and e.rows == 1 and e.dest % width == 0 and e.length % width == 0:
            e = Extent(e.source, e.offset, width, e.dest, e.length // width, width, width)
        column = e.dest % width
        if e.step_dest != width and e.rows > 1 or column + e.length > width:
            raise FormatError(
                f"tensor {info.name!r}: a piece from {e.source.key} crosses its rows; "
                "this layout is not supported"
            )
        blocks.append((e.dest // width, e.rows, column, e))
    _check_block_tiling(info.name, blocks, width, total // width)
    return width, blocks


def _check_block_tiling(name: str, blocks: list, width: int, rows: int) -> None:
    """Between consecutive row boundaries the active blocks' columns must tile the row."""
    edges = sorted({0, rows, *(b[0] for b in blocks), *(b[0] + b[1] for b in blocks)})
    for lo, hi in zip(edges, edges[1:]):
        columns = sorted((c, c + e.length) for r, n, c, e in blocks if r <= lo and r + n >= hi)
        cursor = 0
        for start, end in columns:
            if start != cursor:
                cursor = -1
                break
            cursor = end
        if cursor != width:
            raise FormatError(
                f"tensor {name!r}: its pieces do not tile rows {lo}-{hi - 1} exactly; "
                "the checkpoint metadata is inconsistent"
            )


def _iter_blocks(info: TensorInfo, reader: SourceReader, chunk: int) -> Iterator[bytes]:
    import numpy as np
    from numpy.lib.stride_tricks import as_strided

    width, blocks = _row_blocks(info)
    rows = info.stored_nbytes // width
    band = max(1, chunk // width)
    for r0 in range(0, rows, band):
        r1 = min(rows, r0 + band)
        out = np.empty((r1 - r0, width), dtype=np.uint8)
        for first, count, column, e in blocks:
            k0, k1 = max(r0, first) - first, min(r1, first + count) - first
            if k1 <= k0:
                continue
            target = out[first + k0 - r0 : first + k1 - r0, column : column + e.length]
            span = (k1 - k0 - 1) * e.step_src + e.length
            if e.length >= LARGE_ROW or span > 4 * (k1 - k0) * e.length:
                for k in range(k0, k1):  # long or far-apart rows: one read each
                    raw = reader.read(e.source, e.offset + k * e.step_src, e.length)
                    target[k - k0] = np.frombuffer(raw, dtype=np.uint8)
                continue
            band_bytes = np.frombuffer(
                reader.read(e.source, e.offset + k0 * e.step_src, span), dtype=np.uint8
            )
            target[...] = as_strided(
                band_bytes, shape=(k1 - k0, e.length), strides=(e.step_src, 1), writeable=False
            )
        yield out.data.cast("B")  # no copy: each band is a fresh array
