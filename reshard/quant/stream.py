"""The quantize transform the writer applies chunk by chunk (``TensorInfo.quant``).

The source tensor is read as float32 through ``reshard.transfer.cast.iter_tensor_bytes``
(its own extents, casts and permutations, in bounded chunks), regrouped into bands of
whole units (one row for GGUF blocks, 128 rows for FP8), and each band is quantized and
yielded. Memory is a band plus its quantized copy, whatever the tensor's size: a 500 MB
embedding goes through in ~4 MB pieces.

``FP8_SCALE_INV`` is a derived tensor: the scales of the FP8 weight it belongs to,
computed from the same source bytes (the weight's scales are recomputed rather than
kept, so the writer may lay the two out in any order).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

from reshard.errors import FormatError
from reshard.quant import UNIT_ROWS
from reshard.tensors import TensorInfo
from reshard.transfer.sources import SourceReader
from reshard.units import dtype_itemsize


def float_source(info: TensorInfo) -> TensorInfo:
    """The descriptor of ``info``'s stored tensor read as float32 (no quantization)."""
    assert info.quant is not None
    stored = info.stored_dtype
    shape = info.quant.source_shape
    n = 1
    for d in shape:
        n *= d
    return replace(
        info,
        dtype="F32",
        shape=shape,
        nbytes=4 * n,
        quant=None,
        src_dtype=None if stored == "F32" else stored,
    )


def iter_float_bands(info: TensorInfo, reader: SourceReader, chunk: int):
    """Yield ``(first_row, float32 tensor [rows, cols])`` bands of ``info``'s stored
    tensor, each a whole number of ``UNIT_ROWS[kind]`` rows (the last may be short) and
    about ``chunk`` source bytes."""
    import torch

    from reshard.transfer.cast import iter_tensor_bytes

    assert info.quant is not None
    src = float_source(info)
    shape = src.shape
    rows, cols = (1, shape[0]) if len(shape) == 1 else (shape[0], _prod(shape[1:]))
    unit = UNIT_ROWS[info.quant.kind]
    src_row = cols * dtype_itemsize(info.stored_dtype)
    band_rows = max(unit, (chunk // max(1, src_row)) // unit * unit)
    band_bytes = band_rows * cols * 4
    buffer = bytearray(band_bytes)
    fill = 0
    first = 0
    for piece in iter_tensor_bytes(src, reader, band_rows * src_row):
        view = memoryview(piece).cast("B")
        while len(view):
            take = min(len(view), band_bytes - fill)
            buffer[fill : fill + take] = view[:take]
            fill += take
            view = view[take:]
            if fill == band_bytes:
                yield first, torch.frombuffer(buffer, dtype=torch.float32).reshape(band_rows, cols)
                first += band_rows
                fill = 0
    if fill:
        if fill % (cols * 4):
            raise FormatError(f"tensor {info.name!r}: its bytes end inside a row")
        yield first, torch.frombuffer(buffer, dtype=torch.float32)[: fill // 4].reshape(-1, cols)
        first += fill // (cols * 4)
    if first != rows:
        raise FormatError(f"tensor {info.name!r}: read {first} rows, expected {rows}")


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def iter_quantized_bytes(info: TensorInfo, reader: SourceReader, chunk: int) -> Iterator[memoryview]:
    """Yield the written bytes of a quantized tensor, band by band."""
    import torch

    from reshard.quant.fp8 import fp8_scales, quantize_fp8_block
    from reshard.quant.ggml import QUANTIZERS

    assert info.quant is not None
    kind = info.quant.kind
    for _, band in iter_float_bands(info, reader, chunk):
        if kind in QUANTIZERS:
            out = QUANTIZERS[kind](band)
        elif kind == "FP8":
            out = quantize_fp8_block(band)[0].view(torch.uint8)
        elif kind == "FP8_SCALE_INV":
            out = fp8_scales(band).contiguous().view(torch.uint8)
        else:
            raise ValueError(f"unknown quantization kind {kind!r}")
        yield memoryview(out.contiguous().numpy().data).cast("B")
