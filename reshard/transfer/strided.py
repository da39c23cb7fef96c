"""Read a strided view (a tensor that is not one contiguous byte run) in bounded chunks.

Used for non-contiguous views in ``.bin`` storages and for column slices in
tensor-parallel splits. The innermost dimensions that are contiguous form a "block";
blocks are gathered with ``pread`` into chunks of about ``chunk`` bytes, so memory stays
bounded by the chunk, never by the tensor.

>>> import os, tempfile
>>> from pathlib import Path
>>> from reshard.tensors import TensorInfo
>>> fd, name = tempfile.mkstemp(); _ = os.write(fd, bytes(range(12)))
>>> cols = TensorInfo.from_file("w", "U8", (3, 2), Path(name), 1, 6, strides=(4, 1))  # [:, 1:3] of 3x4
>>> b"".join(iter_strided_bytes(cols, fd))
b'\\x01\\x02\\x05\\x06\\t\\n'
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from reshard.tensors import TensorInfo
from reshard.transfer.ranges import read_exact
from reshard.units import dtype_itemsize, numel

DEFAULT_CHUNK = 16 * 1024 * 1024
# Blocks at least this long are read one pread each; shorter ones are gathered by spans.
LARGE_BLOCK = 64 * 1024
# A tile whose file span is this short is read whole even if it uses little of it:
# one short read costs less than the Python work of splitting further.
SHORT_SPAN = 64 * 1024
_NUMPY_BY_SIZE = {1: "u1", 2: "u2", 4: "u4", 8: "u8"}


def contiguous_block(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, int]:
    """Split dims into (number of outer dims, elements per contiguous inner block)."""
    block, k = 1, len(shape)
    while k > 0 and (shape[k - 1] == 1 or strides[k - 1] == block):
        block *= shape[k - 1]
        k -= 1
    return k, block


def iter_strided_bytes(info: TensorInfo, src_fd: int, chunk: int = DEFAULT_CHUNK) -> Iterator[bytes]:
    """Yield the bytes of ``info`` in C order. ``info.offset`` is the byte offset of
    element 0 in ``info.file`` and ``info.strides`` are in elements of ``stored_dtype``.
    Every chunk holds whole elements (dtype conversion relies on it).

    Views whose contiguous blocks are large (row or column slices) are read block by
    block with ``pread``. Views with tiny blocks (a transposed matrix has 1-element
    blocks) are gathered band by band with numpy from short spans of the file, so a
    transpose costs a few thousand reads, not one per element; memory stays about two
    bands of ``chunk`` bytes.
    """
    itemsize = dtype_itemsize(info.stored_dtype)
    shape, strides = info.shape, info.strides or ()
    if len(strides) != len(shape):
        raise ValueError(f"tensor {info.name!r}: {len(strides)} strides for {len(shape)} dims")
    if 0 in shape:
        return
    outer, block = contiguous_block(shape, strides)
    if block * itemsize >= LARGE_BLOCK or outer == 0:
        yield from _iter_blocks(info, src_fd, chunk, itemsize, outer, block)
        return
    for offset, band_shape in _bands(info.offset, shape, strides, itemsize, chunk):
        yield _gather(
            src_fd, str(info.file), offset, band_shape, strides[len(strides) - len(band_shape) :], itemsize
        ).tobytes()


def _iter_blocks(
    info: TensorInfo, src_fd: int, chunk: int, itemsize: int, outer: int, block: int
) -> Iterator[bytes]:
    shape, strides = info.shape, info.strides or ()
    block_bytes = block * itemsize
    piece = max(itemsize, chunk - chunk % itemsize)
    buffer = bytearray()
    name = str(info.file)
    for index in itertools.product(*(range(n) for n in shape[:outer])):
        start = info.offset + sum(i * s for i, s in zip(index, strides)) * itemsize
        for off in range(0, block_bytes, piece):
            buffer += read_exact(src_fd, start + off, min(piece, block_bytes - off), name)
            if len(buffer) >= chunk:
                yield bytes(buffer)
                buffer.clear()
    if buffer:
        yield bytes(buffer)


def _bands(
    offset: int, shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int, chunk: int
) -> Iterator[tuple[int, tuple[int, ...]]]:
    """Split the view along its leading dims into pieces of at most ``chunk`` output bytes
    (or one row of the innermost dim), in C order: ``(byte offset, shape)``."""
    row = numel(shape[1:]) * itemsize
    if row > chunk and len(shape) > 1:
        for i in range(shape[0]):
            yield from _bands(offset + i * strides[0] * itemsize, shape[1:], strides[1:], itemsize, chunk)
        return
    rows = max(1, chunk // max(row, 1))
    for i in range(0, shape[0], rows):
        yield offset + i * strides[0] * itemsize, (min(rows, shape[0] - i),) + shape[1:]


def _gather(fd: int, name: str, offset: int, shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int):
    """Read one band into a new C-ordered array: split it (along the dim that widens its
    file span most) until each tile's span is short or mostly used, then read each tile's
    span once and let numpy pick the elements."""
    import numpy as np
    from numpy.lib.stride_tricks import as_strided

    dtype = np.dtype(_NUMPY_BY_SIZE.get(itemsize, f"V{itemsize}"))
    out = np.empty(shape, dtype=dtype)
    tiles = [(offset, shape, out)]
    while tiles:
        off, shp, dst = tiles.pop()
        span = (sum((n - 1) * s for n, s in zip(shp, strides)) + 1) * itemsize
        used = numel(shp) * itemsize
        if span <= max(2 * used, SHORT_SPAN) or used == itemsize:
            raw = np.frombuffer(read_exact(fd, off, span, name), dtype=dtype)  # span: whole elements
            dst[...] = as_strided(
                raw, shape=shp, strides=tuple(s * itemsize for s in strides), writeable=False
            )
            continue
        d = max((k for k in range(len(shp)) if shp[k] > 1), key=lambda k: (shp[k] - 1) * strides[k])
        half = shp[d] // 2
        head = tuple(slice(None) for _ in range(d))
        tiles.append(
            (
                off + half * strides[d] * itemsize,
                shp[:d] + (shp[d] - half,) + shp[d + 1 :],
                dst[head + (slice(half, None),)],
            )
        )
        tiles.append((off, shp[:d] + (half,) + shp[d + 1 :], dst[head + (slice(0, half),)]))
    return out
