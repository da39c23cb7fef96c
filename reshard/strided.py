"""Read a strided view (a tensor that is not one contiguous byte run) in bounded chunks.

Used for non-contiguous views in ``.bin`` storages and for column slices in
tensor-parallel splits. The innermost dimensions that are contiguous form a "block";
blocks are gathered with ``pread`` into chunks of about ``chunk`` bytes, so memory stays
bounded by the chunk, never by the tensor.

>>> import os, tempfile
>>> from pathlib import Path
>>> from reshard.tensors import TensorInfo
>>> fd, name = tempfile.mkstemp(); _ = os.write(fd, bytes(range(12)))
>>> cols = TensorInfo("w", "U8", (3, 2), Path(name), 1, 6, strides=(4, 1))  # [:, 1:3] of 3x4
>>> b"".join(iter_strided_bytes(cols, fd))
b'\\x01\\x02\\x05\\x06\\t\\n'
"""

from __future__ import annotations

import itertools
from typing import Iterator

from reshard.copy import read_exact
from reshard.tensors import TensorInfo
from reshard.units import dtype_itemsize

DEFAULT_CHUNK = 16 * 1024 * 1024


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
    Every chunk holds whole elements (dtype conversion relies on it)."""
    itemsize = dtype_itemsize(info.stored_dtype)
    shape, strides = info.shape, info.strides or ()
    if len(strides) != len(shape):
        raise ValueError(f"tensor {info.name!r}: {len(strides)} strides for {len(shape)} dims")
    if 0 in shape:
        return
    outer, block = contiguous_block(shape, strides)
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
