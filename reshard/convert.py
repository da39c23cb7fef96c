"""Produce a tensor's output bytes in bounded chunks when they are not a plain byte copy:
dtype conversion while streaming (and, for ``.bin`` sources, strided views).

torch is imported here only, so the plain safetensors path never pays for it.
Conversion goes through torch's own ``Tensor.to`` on each chunk, so results are
bit-for-bit what ``tensor.to(dtype)`` gives on the whole tensor (casts are elementwise).
"""

from __future__ import annotations

import os
from typing import Iterator

from reshard.copy import read_exact
from reshard.tensors import TensorInfo
from reshard.units import dtype_itemsize

# Source bytes per chunk: peak extra memory is about this plus its converted copy.
CONVERT_CHUNK = 16 * 1024 * 1024

SAFETENSORS_TO_TORCH = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
    "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32",
    "C64": "complex64", "F64": "float64", "I64": "int64", "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu",
}


def torch_dtype(name: str):
    """The torch dtype for a safetensors dtype name (``"BF16"`` -> ``torch.bfloat16``)."""
    import torch

    return getattr(torch, SAFETENSORS_TO_TORCH[name])


def iter_tensor_bytes(info: TensorInfo, src_fd: int, chunk: int = CONVERT_CHUNK) -> Iterator[bytes]:
    """Yield the output bytes of ``info`` in order, at most about ``chunk`` source bytes
    at a time. Handles plain copies, dtype conversion and (via the ``.bin`` reader)
    strided views."""
    if info.strides is not None:
        from reshard.strided import iter_strided_bytes

        source_chunks = iter_strided_bytes(info, src_fd, chunk)
    else:
        source_chunks = _iter_contiguous(info, src_fd, chunk)
    if info.src_dtype is None:
        yield from source_chunks
        return
    import torch

    src, dst = torch_dtype(info.src_dtype), torch_dtype(info.dtype)
    for raw in source_chunks:
        if not raw:
            continue
        values = torch.frombuffer(bytearray(raw), dtype=src)
        yield values.to(dst).numpy().tobytes() if dst != torch.bfloat16 else \
            values.to(dst).view(torch.int16).numpy().tobytes()


def _iter_contiguous(info: TensorInfo, src_fd: int, chunk: int) -> Iterator[bytes]:
    itemsize = dtype_itemsize(info.stored_dtype)
    step = max(itemsize, chunk - chunk % itemsize)  # never split an element
    end = info.offset + info.stored_nbytes
    name = str(info.file)
    for start in range(info.offset, end, step):
        yield read_exact(src_fd, start, min(step, end - start), name)


def open_source(info: TensorInfo) -> int:
    """Open a tensor's source file read-only (the source is never modified)."""
    return os.open(info.file, os.O_RDONLY)
